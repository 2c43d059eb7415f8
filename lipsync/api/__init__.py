"""The gRPC protocol: services, the one error mapping and call wrapper, proto conversions, request limits,
security and metrics. Imports runtime and the layers below it."""
