"""Pipecat: LipsyncVideoService inside a real Pipecat pipeline (PipelineWorker, pipecat's QueuedFrameProcessor as
the sink, no transport) against a real server: TTS audio in → RGB image frames at 25 fps with pts and the speech
audio out; an InterruptionFrame stops the utterance within one batch."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from test_server import ServerProcess, model_override

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (the pipecat extra)")
from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection  # noqa: E402
from pipecat.tests.utils import QueuedFrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from lipsync.codec.audio import encode_s16, resample  # noqa: E402
from lipsync.integrations.pipecat import LipsyncVideoService  # noqa: E402

RATE = 16000  # the pipeline's audio output rate and the session's


@pytest.fixture(scope="module")
def server(weights, tiny_avatar, tmp_path_factory):
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160")],
                        tmp_path_factory.mktemp("pipecat"))
    yield srv
    srv.stop()


def tts_frames(pcm: bytes, rate: int, ms: int = 20) -> list[TTSAudioRawFrame]:
    step = 2 * rate * ms // 1000
    return [TTSAudioRawFrame(audio=pcm[k:k + step], sample_rate=rate, num_channels=1)
            for k in range(0, len(pcm), step)]


@pytest.mark.parametrize("output", ["full", "square"])
def test_video_service_in_a_pipeline(server, speech, output):
    first_pcm = encode_s16(speech[:12000])                              # 0.75 s at the session rate
    second_pcm = encode_s16(resample(speech[:48000], RATE, 24000))      # 3 s from a 24 kHz TTS: resampled

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        service = LipsyncVideoService(server=server.target, model="tiny", output=output)
        sink = QueuedFrameProcessor(queue=received, queue_direction=FrameDirection.DOWNSTREAM)
        worker = PipelineWorker(Pipeline([service, sink]), cancel_on_idle_timeout=False,
                                params=PipelineParams(audio_out_sample_rate=RATE))
        runner = WorkerRunner()
        await runner.add_workers(worker)
        running = asyncio.ensure_future(runner.run())
        out: list = []

        async def until(condition, timeout_s: float = 120) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert not running.done(), "the pipeline ended"
                assert time.monotonic() < deadline, f"timed out with {len(out)} frames"
                try:
                    out.append(await asyncio.wait_for(received.get(), 0.5))
                except asyncio.TimeoutError:
                    pass

        def audio_after(k: int) -> bytes:
            return b"".join(f.audio for f in out[k:] if isinstance(f, TTSAudioRawFrame))
        await until(lambda: sum(isinstance(f, OutputImageRawFrame) for f in out) >= 5)  # idle before any speech
        for frame in [TTSStartedFrame(), *tts_frames(first_pcm, RATE), TTSStoppedFrame()]:
            await worker.queue_frame(frame)
        await until(lambda: len(audio_after(0)) >= len(first_pcm))
        first = len(out)
        for frame in [TTSStartedFrame(), *tts_frames(second_pcm, 24000), TTSStoppedFrame()]:
            await worker.queue_frame(frame)
        await until(lambda: len(audio_after(first)) > 0)
        await worker.queue_frame(InterruptionFrame())
        await until(lambda: any(isinstance(f, InterruptionFrame) for f in out[first:]))
        interrupted_at = next(k for k in range(first, len(out)) if isinstance(out[k], InterruptionFrame))
        await until(lambda: sum(isinstance(f, OutputImageRawFrame) for f in out[interrupted_at:]) >= 12)
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(running, 60)
        return out, first, interrupted_at
    out, first, interrupted_at = asyncio.run(main())

    images = [f for f in out if isinstance(f, OutputImageRawFrame)]
    assert {(f.size, f.format, len(f.image)) for f in images} == {((256, 192), "RGB", 256 * 192 * 3)}
    pts = np.array([f.pts for f in images])
    assert (np.diff(pts) == 40_000_000).all()  # 25 fps in ns, consecutive from the session's clock
    speech_frames = [f for f in out[:first] if isinstance(f, TTSAudioRawFrame)]
    assert {(f.sample_rate, f.num_channels) for f in speech_frames} == {(RATE, 1)}
    assert set(f.pts for f in speech_frames) <= set(pts.tolist())  # each with the image it plays with
    # the utterance's own audio, sample for sample, 40 ms a frame, then silence; a frame not rendered in time (held)
    # carries 40 ms of silence and moves the rest of the utterance one frame later, as its video
    pieces = [f.audio for f in speech_frames]
    size = len(pieces[0])
    sent = [first_pcm[k:k + size].ljust(size, b"\0") for k in range(0, len(first_pcm), size)]
    assert [p for p in pieces if any(p)] == [p for p in sent if any(p)]
    # interrupted: the speech audio stops within one batch (4 frames on CPU) of the InterruptionFrame
    tail = out[interrupted_at:]
    last_audio = max((k for k, f in enumerate(tail) if isinstance(f, TTSAudioRawFrame)), default=-1)
    assert sum(isinstance(f, OutputImageRawFrame) for f in tail[:last_audio + 1]) <= 4
    assert any(isinstance(f, TTSStoppedFrame) for f in out)  # TTS control frames pass on downstream
