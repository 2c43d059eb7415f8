"""Pipecat: `LipsyncVideoService`, the client package's (`lipsync_client.pipecat`; see its docstring), under the
server's name. Needs `pip install 'lipsync[pipecat]'` here, or `'lipsync-client[pipecat]'` without the server."""
from lipsync_client.pipecat import LipsyncVideoService

__all__ = ["LipsyncVideoService"]
