"""Cross-request batching (SPEC §10) in process: shared encoder and generator calls, the same results as
running each request alone, and the bounded queue."""
from __future__ import annotations

import asyncio

import pytest
import torch

from lipsync.model import audio_features
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler, QueueFull


def test_sessions_share_encoder_and_generator_calls(pipeline, speech):
    waves = [speech[:4000], speech[3000:9000], speech[8000:11000]]

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4, max_delay_ms=20)
        scheduler.start()
        steps = await asyncio.gather(*[scheduler.features(audio_features.FeatureStream(None), w, end=True)
                                       for w in waves])
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
        torch.testing.assert_close(f, audio_features.frame_features(wave, pipeline.encoder), atol=1e-5, rtol=0)
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


def test_idle_jpegs_are_a_small_lru_encoded_off_the_encode_thread(pipeline, monkeypatch):
    """Asking for every JPEG quality keeps only the last IDLE_QUALITIES; concurrent askers of one quality share
    one encode, which does not run on the encode pool (the live frames' thread)."""
    import threading

    from torchvision.io import decode_jpeg

    from lipsync.codec import jpeg as jpeg_module
    from lipsync.runtime.scheduler import IDLE_QUALITIES

    encodes, threads = [], set()
    real = jpeg_module.encode_frames

    def counting(frames, quality):
        encodes.append(quality)
        threads.add(threading.current_thread().name)
        return real(frames, quality)
    monkeypatch.setattr(jpeg_module, "encode_frames", counting)

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers())
        same = await asyncio.gather(*(scheduler.idle_jpegs(50) for _ in range(5)))
        for quality in range(1, 101, 10):
            await scheduler.idle_jpegs(quality)
        return scheduler, same
    scheduler, same = asyncio.run(main())
    batches = -(-pipeline.avatar.frame_count // scheduler.max_batch)
    assert encodes.count(50) == batches and all(s is same[0] for s in same)  # one encode, shared
    assert list(scheduler._idle_jpegs) == list(range(1, 101, 10))[-IDLE_QUALITIES:]
    assert not any(name.startswith("encode") for name in threads), threads
    first = decode_jpeg(torch.frombuffer(bytearray(same[0][0]), dtype=torch.uint8))
    assert first.shape[1:] == pipeline.avatar.frames.shape[2:]


def test_concurrent_first_sessions_share_one_capacity_measurement(pipeline):
    """Live sessions that open together on a fresh model wait for one calibration: each timing its own batch
    behind the others' measured a fraction of the capacity (50 idle sessions, 4 admitted, before the fix)."""
    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4, max_delay_ms=0)
        scheduler.start()
        alone = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4, max_delay_ms=0)
        alone.start()
        rates = await asyncio.gather(*(scheduler.calibrate() for _ in range(8)))
        await alone.calibrate()
        await scheduler.stop()
        await alone.stop()
        return scheduler, alone, rates
    scheduler, alone, rates = asyncio.run(main())
    assert scheduler.batches == alone.batches == 2  # one measurement: its two full batches
    assert len(set(rates)) == 1 and rates[0] > 0


def test_device_threads_carry_their_names_to_the_os(pipeline):
    """`top -H`, py-spy and the benchmarks' per-thread CPU tell the device threads apart by the OS's name."""
    from lipsync.threads import os_name

    workers = DeviceWorkers()
    infer, encode = workers.get(pipeline.device)
    try:
        names = infer.submit(os_name).result(), encode.submit(os_name).result()
    finally:
        workers.shutdown()
    assert names == (f"infer-{pipeline.device}", f"encode-{pipeline.device}")


def test_engine_workers_are_renamed_only_where_they_inherited_the_loaders_name():
    """Threads an engine starts inherit the loading thread's name; those are renamed for the device's engine, a
    thread its library named itself keeps its name."""
    import threading

    from lipsync.threads import name_this_thread, name_threads, os_name

    seen = {}

    def worker(name: str) -> None:
        name_this_thread(name)
        name_threads({threading.get_native_id()}, "engine-cpu", only_named="blocking")
        seen[name] = os_name()
    for name in ("blocking", "cuda-EvtHandlr"):
        t = threading.Thread(target=worker, args=(name,))
        t.start()
        t.join()
    assert seen == {"blocking": "engine-cpu", "cuda-EvtHandlr": "cuda-EvtHandlr"}
