"""Names of the metadata headers lipsync's server and clients exchange (a module of its own so that a client
needs nothing else of the server to speak them)."""
MODEL_HEADER = "x-model-id"  # every client call: the model it is for (Envoy routes on it)
WORKER_HEADER = "x-lipsync-worker"  # every admitted RPC's response headers name the worker that serves it
ACCEPTED_HEADER = "lipsync-accepted"  # Stream/Converse: sent once the config is accepted (see client.open_stream)
