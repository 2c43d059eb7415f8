"""lipsync_client.livekit's VideoGenerator driven directly against the server (no LiveKit server)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

rtc = pytest.importorskip("livekit.rtc",
                          reason="livekit-agents is not installed (pip install './clients/python[livekit]')")
import lipsync_client as ls  # noqa: E402
from lipsync_client.livekit import LipsyncVideoGenerator  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd  # noqa: E402

RATE = 16000


def test_video_generator_speaks_ends_its_segment_and_clears(target, model, speech):
    pcm, fmt = speech
    segment = np.frombuffer(ls.MonoResampler(RATE)(pcm, fmt.sample_rate), np.int16)
    short, long = segment[:12000], segment

    def frames(samples: np.ndarray) -> list[rtc.AudioFrame]:
        return [rtc.AudioFrame(samples[k:k + 320].tobytes(), RATE, 1, len(samples[k:k + 320]))
                for k in range(0, len(samples), 320)]

    async def main():
        generator = LipsyncVideoGenerator(target, model, sample_rate=RATE)
        session = await generator.start()
        out: list = []
        ended, speaking = asyncio.Event(), asyncio.Event()

        async def consume():
            async for item in generator:
                out.append(item)
                (ended if isinstance(item, AudioSegmentEnd) else speaking if isinstance(item, rtc.AudioFrame)
                 else asyncio.Event()).set()
        reader = asyncio.ensure_future(consume())

        async def until(condition, timeout_s: float = 120) -> None:
            async def poll():
                while not condition():
                    if reader.done():
                        reader.result()
                        raise AssertionError("the generator ended")
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(poll(), timeout_s)
        await until(lambda: sum(isinstance(x, rtc.VideoFrame) for x in out) >= 5)
        for frame in frames(short):
            await generator.push_audio(frame)
        await generator.push_audio(AudioSegmentEnd())
        await until(ended.is_set)
        first = list(out)
        speaking.clear()
        for frame in frames(long):
            await generator.push_audio(frame)
        await until(speaking.is_set)
        generator.clear_buffer()
        cleared = len(out)
        await until(lambda: sum(isinstance(x, rtc.VideoFrame) for x in out[cleared:]) >= 12)
        await generator.aclose()
        reader.cancel()
        return session, generator, first, out, cleared
    session, generator, first, out, cleared = asyncio.run(main())

    videos = [x for x in first if isinstance(x, rtc.VideoFrame)]
    assert session.fps == 25 and {(v.width, v.height) for v in videos} == {(generator.width, generator.height)}
    # its own audio, 40 ms a frame, then silence; a held frame (not rendered in time) carries 40 ms of silence and
    # moves the rest one frame later, as its video
    pieces = [bytes(x.data.cast("B")) for x in first if isinstance(x, rtc.AudioFrame)]
    size, pushed = len(pieces[0]), short.tobytes()
    sent = [pushed[k:k + size].ljust(size, b"\0") for k in range(0, len(pushed), size)]
    assert [p for p in pieces if any(p)] == [p for p in sent if any(p)] and len(pieces) >= len(sent)
    assert isinstance(first[-1], AudioSegmentEnd)
    assert not any(isinstance(x, AudioSegmentEnd) for x in out[len(first):])  # none for the cleared segment
