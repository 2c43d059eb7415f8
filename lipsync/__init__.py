"""lipsync: speech audio → lip-synced talking-head JPEG frames with SyncTalk_2D models, on CUDA or CPU."""

__version__ = "0.1.0"
