"""Pipecat: `LipsyncVideoService`, the client package's (`lipsync_client.pipecat`; see its docstring), under the
server's name. Needs `pip install -e '.[pipecat]'` from a checkout, or `pip install './clients/python[pipecat]'`
without the server."""
from lipsync_client.pipecat import LipsyncVideoService

__all__ = ["LipsyncVideoService"]
