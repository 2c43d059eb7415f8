"""LiveKit Agents: the VideoGenerator for AvatarRunner, driven directly against a real server (no LiveKit server)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from test_server import ServerProcess, model_override

rtc = pytest.importorskip("livekit.rtc", reason="livekit-agents is not installed (the livekit extra)")
from livekit.agents.voice.avatar import AudioSegmentEnd  # noqa: E402

from lipsync.integrations.livekit import LipsyncVideoGenerator  # noqa: E402

RATE = 16000


@pytest.fixture(scope="module")
def server(weights, tiny_avatar, tmp_path_factory):
    # the live clock at real time: the exact-audio check below needs the sender ahead of the player, which a
    # loaded CI machine did not always keep at 3× (an underrun pads the utterance with silence, as it should)
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160")],
                        tmp_path_factory.mktemp("livekit"))
    yield srv
    srv.stop()


def audio_frames(pcm: np.ndarray, ms: int = 20) -> list[rtc.AudioFrame]:
    step = RATE * ms // 1000
    return [rtc.AudioFrame(pcm[k:k + step].tobytes(), RATE, 1, len(pcm[k:k + step]))
            for k in range(0, len(pcm), step)]


@pytest.mark.parametrize("output", ["full", "square"])
def test_video_generator_speaks_ends_segments_and_clears(server, speech, output):
    speech_pcm = (speech[:12000].numpy() * 32767).astype(np.int16)  # 0.75 s
    long_pcm = (speech[:40000].numpy() * 32767).astype(np.int16)   # 2.5 s

    async def main():
        generator = LipsyncVideoGenerator(server.target, "tiny", sample_rate=RATE, output=output)
        session = await generator.start()
        assert (generator.width, generator.height) == (256, 192)  # for AvatarOptions
        out: list = []
        events = {"segment_end": asyncio.Event(), "speaking": asyncio.Event()}
        ended_at: list[int] = []  # len(out) at each segment end: what came before it, whatever arrives meanwhile

        async def consume():
            async for item in generator:
                out.append(item)
                if isinstance(item, AudioSegmentEnd):
                    ended_at.append(len(out))
                    events["segment_end"].set()
                elif isinstance(item, rtc.AudioFrame):
                    events["speaking"].set()
        reader = asyncio.ensure_future(consume())

        async def until(condition, timeout_s: float = 120) -> None:
            async def poll():
                while not condition():
                    if reader.done():
                        reader.result()  # the generator failed: say how
                        raise AssertionError("the generator ended")
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(poll(), timeout_s)
        await until(lambda: sum(isinstance(x, rtc.VideoFrame) for x in out) >= 5)  # idle before anyone speaks
        assert not any(isinstance(x, rtc.AudioFrame) for x in out)
        for frame in audio_frames(speech_pcm):
            await generator.push_audio(frame)
        await generator.push_audio(AudioSegmentEnd())
        await until(events["segment_end"].is_set)
        first = out[:ended_at[0]]
        # a second, longer segment, cleared as soon as it is heard
        events["speaking"].clear()
        for frame in audio_frames(long_pcm):
            await generator.push_audio(frame)
        await until(events["speaking"].is_set)
        generator.clear_buffer()
        cleared_at = len(out)
        await until(lambda: sum(isinstance(x, rtc.VideoFrame) for x in out[cleared_at:]) >= 12)
        await generator.aclose()
        reader.cancel()
        return session, first, out, cleared_at
    session, first, out, cleared_at = asyncio.run(main())

    videos = [x for x in first if isinstance(x, rtc.VideoFrame)]
    assert session.fps == 25 and {(v.width, v.height, v.type) for v in videos} == \
        {(256, 192, rtc.VideoBufferType.RGB24)}
    # the segment's own audio, sample for sample, 40 ms a frame, then silence to the frame's end; a frame not
    # rendered in time (held) carries 40 ms of silence and moves the rest of the segment one frame later, as its video
    pieces = [bytes(x.data.cast("B")) for x in first if isinstance(x, rtc.AudioFrame)]
    size, pushed = len(pieces[0]), speech_pcm.tobytes()
    sent = [pushed[k:k + size].ljust(size, b"\0") for k in range(0, len(pushed), size)]
    assert {len(p) for p in pieces} == {size} and len(pieces) >= len(sent)
    assert [p for p in pieces if any(p)] == [p for p in sent if any(p)]
    assert isinstance(first[-1], AudioSegmentEnd) and sum(isinstance(x, AudioSegmentEnd) for x in first) == 1
    # cleared: within a few frames no more audio, idle video goes on, no segment end for the interrupted one
    tail = out[cleared_at:]
    last_audio = max((k for k, x in enumerate(tail) if isinstance(x, rtc.AudioFrame)), default=-1)
    assert sum(isinstance(x, rtc.VideoFrame) for x in tail[:last_audio + 1]) <= 4
    assert not any(isinstance(x, AudioSegmentEnd) for x in out[len(first):])


def test_audio_at_another_rate_is_refused(server):
    async def main():
        generator = LipsyncVideoGenerator(server.target, "tiny", sample_rate=RATE)
        await generator.start()
        try:
            with pytest.raises(ValueError, match="this session takes 16000 Hz"):
                await generator.push_audio(rtc.AudioFrame(bytes(960), 48000, 1, 480))
        finally:
            await generator.aclose()
    asyncio.run(main())
