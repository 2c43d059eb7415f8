"""Generated from protos/ by lipsync.protos; do not edit."""
PROTO_DIGEST = "f3ca5d738e69b8ffb865384aa4b8a996dc866f47a7987e70f9f8e0ac1ccc6f5c"
