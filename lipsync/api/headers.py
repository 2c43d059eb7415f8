"""Names of the metadata headers lipsync's server and clients exchange; defined once, by the client package."""
from lipsync_client.headers import ACCEPTED_HEADER, MODEL_HEADER, WORKER_HEADER

__all__ = ["ACCEPTED_HEADER", "MODEL_HEADER", "WORKER_HEADER"]
