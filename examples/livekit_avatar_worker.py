"""A LiveKit avatar worker whose video comes from a lipsync server.

    pip install "./clients/python[livekit]"    # or, with the server: pip install -e ".[livekit]"
    LIVEKIT_URL=wss://… LIVEKIT_API_KEY=… LIVEKIT_API_SECRET=… LIPSYNC_SERVER=127.0.0.1:50051 LIPSYNC_MODEL=demo \
        python examples/livekit_avatar_worker.py dev

The agent (another participant) streams its TTS audio to this worker with livekit-agents' DataStreamAudioOutput;
AvatarRunner feeds it to a lipsync live session and publishes the avatar's video and audio to the room.
"""
from __future__ import annotations

import os

from lipsync_client import Credentials
from lipsync_client.livekit import LipsyncVideoGenerator
from livekit.agents import JobContext, WorkerOptions, cli
from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner, DataStreamAudioReceiver

SAMPLE_RATE = 24000  # the agent's TTS rate; any multiple of 25 Hz


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    generator = LipsyncVideoGenerator(os.environ.get("LIPSYNC_SERVER", "127.0.0.1:50051"),
                                      os.environ.get("LIPSYNC_MODEL", "demo"), sample_rate=SAMPLE_RATE,
                                      credentials=Credentials(token=os.environ.get("LIPSYNC_TOKEN")))
    session = await generator.start()
    runner = AvatarRunner(ctx.room, audio_recv=DataStreamAudioReceiver(ctx.room), video_gen=generator,
                          options=AvatarOptions(video_width=generator.width, video_height=generator.height,
                                                video_fps=session.fps, audio_sample_rate=SAMPLE_RATE,
                                                audio_channels=1))
    await runner.start()
    try:
        await runner.wait_for_complete()
    finally:
        await runner.aclose()
        await generator.aclose()


if __name__ == "__main__":
    cli.run_app(WorkerOptions(entrypoint_fnc=entrypoint))
