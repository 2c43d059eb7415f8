"""Cross-request batching (SPEC §10) in process: shared encoder and generator calls, the same results as
running each request alone, and the bounded queue."""
from __future__ import annotations

import asyncio

import pytest
import torch

from lipsync import audio
from lipsync.scheduler import DeviceWorkers, ModelScheduler, QueueFull


def test_sessions_share_encoder_and_generator_calls(pipeline, speech):
    waves = [speech[:4000], speech[3000:9000], speech[8000:11000]]

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4, max_delay_ms=20)
        scheduler.start()
        steps = await asyncio.gather(*[scheduler.features(audio.FeatureStream(None), w, end=True) for w in waves])
        feats = [f for _, f in steps]
        ids = [pipeline.avatar.frames_for(0, 0, f.shape[0]) for f in feats]
        rendered = await asyncio.gather(*[scheduler.submit(f, i, 80) for f, i in zip(feats, ids)])
        await scheduler.stop()
        return scheduler, feats, rendered

    scheduler, feats, rendered = asyncio.run(main())
    assert scheduler.encoder_calls == 1  # three sessions' windows in one encoder call
    total = sum(f.shape[0] for f in feats)
    assert scheduler.batches == -(-total // 4)  # frames of all requests packed into full batches
    for wave, f, (jpegs, timings) in zip(waves, feats, rendered):
        torch.testing.assert_close(f, audio.frame_features(wave, pipeline.encoder), atol=1e-5, rtol=0)
        assert len(jpegs) == f.shape[0] and all(j[:2] == b"\xff\xd8" for j in jpegs)
        assert timings["batch_size"] == 4 and timings["inference"] > 0


def test_queue_is_bounded(pipeline):
    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_queue_frames=8)  # not started: nothing drains
        scheduler.submit(torch.zeros(6, 32, 16, 16), [0] * 6, 75)
        with pytest.raises(QueueFull, match="bound of 8"):
            scheduler.submit(torch.zeros(3, 32, 16, 16), [0] * 3, 75)
        await scheduler.stop()
    asyncio.run(main())
