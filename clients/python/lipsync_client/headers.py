"""The metadata headers lipsync's server and clients exchange (the server imports these names from here)."""
MODEL_HEADER = "x-model-id"  # every client call: the model it is for (a proxy such as Envoy routes on it)
WORKER_HEADER = "x-lipsync-worker"  # every admitted RPC's response headers name the worker that serves it
ACCEPTED_HEADER = "lipsync-accepted"  # Stream/Converse: sent once the config is accepted (see open_stream)
