"""lipsync_client: talk to a lipsync server from any Python program, without torch.

    import asyncio, lipsync_client as ls

    async def main():
        pcm, fmt = ls.read_wav("speech.wav")
        async with ls.channel("127.0.0.1:50051") as ch:
            result = await ls.converse(ls.LipSyncStub(ch), "demo", [ls.Say(pcm, fmt, at=0.5)], duration_s=5)
        print(result.summary())

    asyncio.run(main())

The stubs are `lipsync_client.LipSyncStub` and `lipsync_client.pb` (the lipsync.v1 messages). Pipecat and LiveKit
integrations: `lipsync_client.pipecat` and `lipsync_client.livekit` (extras `[pipecat]`, `[livekit]`).
"""
from lipsync_client._proto import lipsync_pb2 as pb
from lipsync_client._proto.lipsync_pb2_grpc import LipSyncStub
from lipsync_client.audio import AudioFormat, AudioFormatError, MonoResampler, format_message, parse_wav, read_wav
from lipsync_client.avatar import Avatar, Compositor, get_avatar
from lipsync_client.connection import (
    Credentials,
    channel,
    explain,
    is_local_target,
    open_stream,
    routing,
    worker_lost,
    worker_of,
)
from lipsync_client.headers import ACCEPTED_HEADER, MODEL_HEADER, WORKER_HEADER
from lipsync_client.jpeg import decode_rgb
from lipsync_client.sessions import (
    ConverseResult,
    Say,
    SessionResult,
    converse,
    percentile,
    stream,
    summarize,
    synthesize,
)
from lipsync_client.timing import FPS, FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME

__version__ = "0.1.0"
__all__ = [
    "pb", "LipSyncStub", "AudioFormat", "AudioFormatError", "MonoResampler", "format_message", "parse_wav", "read_wav",
    "Credentials", "channel", "explain", "is_local_target", "open_stream", "routing", "worker_lost", "worker_of",
    "ACCEPTED_HEADER", "MODEL_HEADER", "WORKER_HEADER", "decode_rgb", "ConverseResult", "Say", "SessionResult",
    "converse", "percentile", "stream", "summarize", "synthesize", "FPS", "FRAME_MS", "SAMPLE_RATE",
    "SAMPLES_PER_FRAME", "Avatar", "Compositor", "get_avatar", "__version__",
]
