"""Cross-request batching (SPEC §10) in process: shared encoder and generator calls, the same results as
running each request alone, and the bounded queue."""
from __future__ import annotations

import asyncio

import pytest
import torch

from lipsync.model import audio_features
from lipsync.runtime.scheduler import CALIBRATION_BATCHES, DeviceWorkers, ModelScheduler, QueueFull


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


def test_idle_jpegs_are_a_small_lru_encoded_by_the_encode_thread_a_batch_at_a_time(pipeline, monkeypatch):
    """Asking for every JPEG quality keeps only the last IDLE_QUALITIES; concurrent askers of one quality share
    one encode. It runs on the device's encode thread, the one thread that calls the JPEG encoder (nvJPEG on a
    GPU), a batch of frames per task, so served batches queued meanwhile take their turns between them."""
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
    assert scheduler.cached_idle_qualities() == list(range(1, 101, 10))[-IDLE_QUALITIES:]
    assert threads and all(name.startswith("encode-cpu") for name in threads), threads
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
    assert scheduler.batches == alone.batches == CALIBRATION_BATCHES  # one measurement: its full batches
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


def _reference_batches(jobs: list[dict], max_batch: int) -> list[list[tuple[int, int, int]]]:
    """The batcher's rule written out plainly, as a sort of every job per slice: take from the job whose next frame
    is first by (class, due time, submission order) while its frames stay no later than the runner-up's next."""
    batches = []
    while any(j["next"] < j["size"] for j in jobs):
        batch, room = [], max_batch
        while room:
            waiting = sorted((j for j in jobs if j["next"] < j["size"]),
                             key=lambda j: (j["priority"], j["deadline"] + j["next"] * j["step"], j["seq"]))
            if not waiting:
                break
            best = waiting[0]
            runner_up = (waiting[1]["priority"], waiting[1]["deadline"] + waiting[1]["next"] * waiting[1]["step"]) \
                if len(waiting) > 1 else None
            take = 1
            while take < min(room, best["size"] - best["next"]) and (
                    runner_up is None or (best["priority"], best["deadline"] + (best["next"] + take) * best["step"])
                    <= runner_up):
                take += 1
            if batch and batch[-1][0] == best["seq"] and batch[-1][2] == best["next"]:
                batch[-1] = (best["seq"], batch[-1][1], best["next"] + take)
            else:
                batch.append((best["seq"], best["next"], best["next"] + take))
            best["next"] += take
            room -= take
        batches.append(batch)
    return batches


@pytest.mark.parametrize("seed", range(6))
def test_the_batchers_heap_picks_what_a_full_sort_would(pipeline, seed):
    """Slices by (class, deadline) from the heap equal a sort of every job per slice, with cancelled jobs
    dropped and their frames leaving the queue count at once."""
    import random

    from lipsync.runtime.scheduler import Priority

    rng = random.Random(seed)

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=rng.choice([1, 3, 8]))  # never started
        specs, futures = [], []
        for seq in range(rng.randint(5, 40)):
            size = rng.randint(1, 12)
            spec = {"seq": seq, "size": size, "next": 0, "priority": rng.choice(list(Priority)),
                    "deadline": rng.choice([0.0, 0.04, 0.08]) + rng.randint(0, 5) * 0.04,
                    "step": rng.choice([0.04, 0.12])}
            futures.append(scheduler.submit(torch.zeros(size, 32, 16, 16), [0] * size, 75,
                                            priority=spec["priority"], deadline=spec["deadline"], step=spec["step"]))
            specs.append(spec)
        for k in rng.sample(range(len(specs)), len(specs) // 5):
            futures[k].cancel()
            specs[k]["next"] = specs[k]["size"]  # nothing of it is taken
        await asyncio.sleep(0)  # the cancellations' callbacks
        assert scheduler.queued_frames == sum(s["size"] - s["next"] for s in specs)
        expected = _reference_batches(specs, scheduler.max_batch)
        got = []
        while True:
            batch = scheduler._take_batch()
            if not batch:
                break
            got.append([(s.job.seq, s.lo, s.hi) for s in batch])
        assert scheduler.queued_frames == 0 and not scheduler._live_due()
        await scheduler.stop()
        return expected, got
    expected, got = asyncio.run(main())
    assert got == expected


def test_batching_runs_on_the_inference_thread_and_wakes_the_loop_once_per_completed_job(pipeline):
    """Batches are taken and inferred on the device's inference thread, not the event loop's; a job spread over
    three batches wakes the loop once, when it completes (the loop's cost per frame was its wake-ups)."""
    import threading

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=2, max_delay_ms=0)
        infer, delivered = scheduler._infer, scheduler._delivered
        threads, completions = set(), []

        def infer_spy(batch):
            threads.add(threading.current_thread().name)
            return infer(batch)

        def delivered_spy(slices, completed):
            threads.add("loop" if threading.current_thread() is threading.main_thread() else "elsewhere")
            completions.append(len(completed))
            delivered(slices, completed)
        scheduler._infer, scheduler._delivered = infer_spy, delivered_spy
        scheduler.start()
        ids = pipeline.avatar.frames_for(0, 0, 6)
        jpegs, timings = await scheduler.submit(torch.zeros(6, 32, 16, 16), ids, 75)
        await scheduler.stop()
        return scheduler, threads, completions, jpegs, timings

    scheduler, threads, completions, jpegs, timings = asyncio.run(main())
    assert scheduler.batches == 3 and timings["batch_size"] == 2
    assert len(jpegs) == 6 and all(j[:2] == b"\xff\xd8" for j in jpegs)
    assert completions == [1]  # one wake-up of the loop for three batches
    assert {t for t in threads if t.startswith("infer-")} and "loop" in threads and "elsewhere" not in threads
    assert not any(t.startswith("MainThread") for t in threads)


def test_a_busy_encode_thread_leaves_the_inference_thread_free_for_audio(pipeline):
    """While the batches allowed in flight wait for the encode thread, no step blocks the inference thread: a
    session's audio work there runs at once, not after the encode (which here takes a second)."""
    import time

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=1, max_delay_ms=0, max_encodes_in_flight=1)
        finish = scheduler._finish

        def slow_finish(*args):
            time.sleep(1.0)
            return finish(*args)
        scheduler._finish = slow_finish
        scheduler.start()
        job = scheduler.submit(torch.zeros(3, 32, 16, 16), pipeline.avatar.frames_for(0, 0, 3), 75)
        await asyncio.sleep(0.3)  # the first batch is encoding, the second waits for its slot
        t0 = time.perf_counter()
        await scheduler.run_on_device(lambda: None)
        waited = time.perf_counter() - t0
        jpegs, _ = await job
        await scheduler.stop()
        return waited, jpegs, scheduler.batches
    waited, jpegs, batches = asyncio.run(main())
    assert waited < 0.5 and len(jpegs) == 3 and batches == 3


def test_square_output_is_the_rectangle_of_the_full_frame(pipeline):
    """A batch mixing FULL_FRAME and SQUARE jobs: each square JPEG is the crop rectangle's size and, pasted onto
    the avatar frame, gives the full-frame job's frame (JPEG apart: PSNR >= 40 dB); it is a fraction of its bytes."""
    from conftest import decoded, psnr

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4, max_delay_ms=20)
        scheduler.start()
        features = torch.rand(6, 32, 16, 16, generator=torch.Generator().manual_seed(2))
        ids = pipeline.avatar.frames_for(0, 0, 6)
        full, square = await asyncio.gather(scheduler.submit(features, ids, 90),
                                            scheduler.submit(features, ids, 90, square=True))
        await scheduler.stop()
        return ids, full[0], square[0], scheduler.batches
    ids, full, square, batches = asyncio.run(main())
    assert batches == 3  # the two jobs shared batches
    avatar = pipeline.avatar
    for f, whole, part in zip(ids, full, square):
        x1, y1, x2, y2 = avatar.rects[f]
        patch = decoded(part)
        assert patch.shape == (3, y2 - y1, x2 - x1) and len(part) < len(whole) / 2
        pasted = avatar.frames[f].float().clone()
        pasted[:, y1:y2, x1:x2] = patch
        assert psnr(pasted, decoded(whole)) >= 40


def test_a_batch_of_several_qualities_gives_each_job_its_own_frames(pipeline):
    """Jobs at JPEG qualities 90, 60, 90 share one batch (the 90s' rows are not adjacent): every job gets the
    frames of its own features and avatar frames, as when rendered alone (PSNR >= 40 dB), at its own quality."""
    from conftest import decoded, psnr

    features = [torch.rand(2, 32, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    ids = [pipeline.avatar.frames_for(k, 0, 2) for k in range(3)]
    qualities = [90, 60, 90]

    async def render(together: bool):
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=6 if together else 2, max_delay_ms=50)
        scheduler.start()
        if together:
            out = await asyncio.gather(*[scheduler.submit(f, i, q) for f, i, q in zip(features, ids, qualities)])
        else:
            out = [await scheduler.submit(f, i, q) for f, i, q in zip(features, ids, qualities)]
        await scheduler.stop()
        return [jpegs for jpegs, _ in out], scheduler.batches
    (together, batches), (alone, _) = asyncio.run(render(True)), asyncio.run(render(False))
    assert batches == 1
    for mine, reference in zip(together, alone):
        for a, b in zip(mine, reference):
            assert psnr(decoded(a), decoded(b)) >= 40


def test_an_idle_encode_stops_when_its_last_asker_goes_and_not_before(pipeline, monkeypatch):
    """GetAvatar calls share one encode of the avatar per quality: one asker cancelled leaves the other's encode
    running to the end; the last asker cancelled stops it after its current batch, and nothing half-done is kept."""
    import threading

    from lipsync.codec import jpeg as jpeg_module

    batches, release = [], threading.Event()
    real = jpeg_module.encode_frames

    def slow(frames, quality):  # one batch at a time, held until the test lets it go
        batches.append(quality)
        release.wait(5)
        return real(frames, quality)
    monkeypatch.setattr(jpeg_module, "encode_frames", slow)
    per_quality = pipeline.avatar.frame_count  # max_batch 1: a batch per frame

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=1)
        # two askers of quality 60, one cancelled: the other gets every frame
        first, second = (asyncio.ensure_future(scheduler.idle_jpegs(60)) for _ in range(2))
        await asyncio.sleep(0.1)
        first.cancel()
        release.set()
        shared = await second
        # one asker of quality 30, cancelled while its first batch runs: the rest is never encoded
        release.clear()
        alone = asyncio.ensure_future(scheduler.idle_jpegs(30))
        while batches.count(30) < 1:
            await asyncio.sleep(0.02)
        alone.cancel()
        release.set()
        await asyncio.sleep(0.5)
        return shared, 30 in scheduler.cached_idle_qualities()
    shared, kept = asyncio.run(main())
    assert len(shared) == per_quality and batches.count(60) == per_quality
    assert batches.count(30) == 1 and not kept
