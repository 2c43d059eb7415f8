"""lipsync_client.pipecat in a real Pipecat pipeline (no transport) against the server: TTS audio in → RGB frames at
25 fps and the speech audio back; an InterruptionFrame stops the utterance."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (pip install './clients/python[pipecat]')")
import lipsync_client as ls  # noqa: E402
from lipsync_client.pipecat import LipsyncVideoService  # noqa: E402
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

RATE = 16000


def tts_frames(pcm: bytes, rate: int, ms: int = 20) -> list[TTSAudioRawFrame]:
    step = 2 * rate * ms // 1000
    return [TTSAudioRawFrame(audio=pcm[k:k + step], sample_rate=rate, num_channels=1)
            for k in range(0, len(pcm), step)]


def test_video_service_in_a_pipeline(target, model, speech):
    pcm, fmt = speech  # a 22.05 kHz TTS: the first utterance resampled here, the second by the service
    first_pcm = ls.MonoResampler(RATE)(pcm[:fmt.sample_rate * 3 // 4 * 2], fmt.sample_rate)  # 0.75 s

    async def main():
        received: asyncio.Queue = asyncio.Queue()
        service = LipsyncVideoService(server=target, model=model)
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
        await until(lambda: sum(isinstance(f, OutputImageRawFrame) for f in out) >= 5)
        for frame in [TTSStartedFrame(), *tts_frames(first_pcm, RATE), TTSStoppedFrame()]:
            await worker.queue_frame(frame)
        await until(lambda: len(audio_after(0)) >= len(first_pcm))
        first = len(out)
        for frame in [TTSStartedFrame(), *tts_frames(pcm, fmt.sample_rate), TTSStoppedFrame()]:
            await worker.queue_frame(frame)
        await until(lambda: len(audio_after(first)) > 0)
        await worker.queue_frame(InterruptionFrame())
        await until(lambda: any(isinstance(f, InterruptionFrame) for f in out[first:]))
        cut = next(k for k in range(first, len(out)) if isinstance(out[k], InterruptionFrame))
        await until(lambda: sum(isinstance(f, OutputImageRawFrame) for f in out[cut:]) >= 12)
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(running, 60)
        return out, first, cut
    out, first, cut = asyncio.run(main())

    images = [f for f in out if isinstance(f, OutputImageRawFrame)]
    width, height = images[0].size
    assert {(f.format, len(f.image)) for f in images} == {("RGB", width * height * 3)}
    assert (np.diff([f.pts for f in images]) == 40_000_000).all()  # 25 fps in ns
    # the utterance's own audio, sample for sample, 40 ms a frame, then silence; a frame not rendered in time (held)
    # carries 40 ms of silence and moves the rest of the utterance one frame later, as its video
    pieces = [f.audio for f in [f for f in out[:first] if isinstance(f, TTSAudioRawFrame)]]
    size = len(pieces[0])
    sent = [first_pcm[k:k + size].ljust(size, b"\0") for k in range(0, len(first_pcm), size)]
    assert [p for p in pieces if any(p)] == [p for p in sent if any(p)]
    tail = out[cut:]
    last_audio = max((k for k, f in enumerate(tail) if isinstance(f, TTSAudioRawFrame)), default=-1)
    assert sum(isinstance(f, OutputImageRawFrame) for f in tail[:last_audio + 1]) <= 4
