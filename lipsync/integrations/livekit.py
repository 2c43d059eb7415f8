"""LiveKit Agents: `LipsyncVideoGenerator`, the client package's (`lipsync_client.livekit`; see its docstring), under
the server's name. Needs `pip install -e '.[livekit]'` from a checkout, or `pip install './clients/python[livekit]'`
without the server."""
from lipsync_client.livekit import LipsyncVideoGenerator

__all__ = ["LipsyncVideoGenerator"]
