"""Offline rendering through the serving path: the same scheduler, batching and stages as `lipsync serve`, run
in process. `lipsync render`, the benchmarks and the Python API use it, so they measure what the server runs."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from lipsync.model.pipeline import Pipeline
from lipsync.runtime.feature_sources import Part
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler
from lipsync.timebase import FRAME_S


@dataclass
class RenderedFrame:
    index: int  # output frame index
    avatar_frame: int
    jpeg: bytes


@dataclass
class RenderResult:
    frames: list[RenderedFrame]
    timings_ms: dict[str, float] = field(default_factory=dict)


def _add(total: dict[str, float], timings: dict[str, float]) -> None:
    """Sum the device stages over chunks; the queue wait counts once (the first frame's)."""
    for stage, ms in timings.items():
        if stage == "queue":
            total.setdefault(stage, ms)
        elif stage != "batch_size":
            total[stage] = total.get(stage, 0.0) + ms


async def render_wave(scheduler: ModelScheduler, wave: Tensor, start_frame: int, quality: int | None,
                      on_frames: Callable[[int, list[int], list[Any]], None], chunk: int = 0) -> dict[str, float]:
    """All D+2 frames of a 16 kHz waveform, handed to `on_frames(first_index, avatar_frames, outputs)` in order,
    `chunk` frames at a time (default: the scheduler's batch); outputs are JPEG bytes, or uint8 RGB frames
    [3,H,W] on the host when `quality` is None. Returns per-stage milliseconds."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _, features = await scheduler.features(scheduler.feature_stream(), wave, end=True)  # moved there, on its thread
    timings["audio"] = (time.perf_counter() - t0) * 1e3
    step = chunk or scheduler.max_batch
    avatar = scheduler.pipeline.avatar
    pending: list[tuple[int, list[int], asyncio.Task]] = []
    for lo in range(0, features.shape[0], step):  # two chunks in flight: the device never waits for the writer
        ids = avatar.frames_for(start_frame, lo, min(step, features.shape[0] - lo))
        # One timeline: chunk k's frames are due after chunk k-1's, so batches never interleave two chunks.
        rendering = scheduler.render(Part(features, lo, lo + len(ids)), ids, quality, due=t0 + lo * FRAME_S)
        pending.append((lo, ids, asyncio.ensure_future(rendering)))
        if len(pending) > 1:
            await _deliver(pending.pop(0), on_frames, timings)
    for item in pending:
        await _deliver(item, on_frames, timings)
    timings["total"] = (time.perf_counter() - t0) * 1e3
    return timings


async def _deliver(item, on_frames, timings) -> None:
    lo, ids, task = item
    outputs, stage_ms = await task
    _add(timings, stage_ms)
    on_frames(lo, ids, outputs)


def synthesize(pipeline: Pipeline, wave: Tensor, start_frame: int = 0, quality: int = 75,
               inline: bool = False) -> RenderResult:
    """A whole utterance (16 kHz mono waveform) → all D+2 JPEG frames with per-stage timings. `inline` runs the
    device work in this thread (for checks that must see every tensor operation)."""
    frames: list[RenderedFrame] = []

    async def main() -> dict[str, float]:
        scheduler = ModelScheduler(pipeline, DeviceWorkers(inline=inline), max_batch=pipeline.micro_batch,
                                   max_delay_ms=0)
        scheduler.start()
        try:
            return await render_wave(scheduler, wave, start_frame, quality, lambda lo, ids, out: frames.extend(
                RenderedFrame(lo + k, f, j) for k, (f, j) in enumerate(zip(ids, out))))
        finally:
            await scheduler.stop()
    timings = asyncio.run(main())
    return RenderResult(frames, timings)
