"""Cross-request batching for one loaded model (SPEC §10).

Requests, streams and live sessions submit frames (audio features + avatar frames). The model's batching runs on
the device's inference thread, not on the event loop: each step there encodes every session's waiting mel windows
in one audio-encoder call, then packs frames from all jobs into a generator batch of up to `max_batch`, waiting at
most `max_delay_ms` for a batch to fill. Frames are served by deadline: live slots first, then Stream, then
Synthesize; within a class the earliest deadline first, where a request's frame k is due k × 40 ms after it arrived
(so jobs of the same class share the generator fairly instead of the first one draining). Compositing and JPEG run
on the device's encode thread, so batch k+1 infers while batch k encodes. The event loop only submits work and is
woken once per finished batch (and once per audio step), however many jobs and sessions the batch served: the
thread hand-offs, not the math, were the loop's cost per frame. The queue is bounded in frames. A failing batch
fails exactly the requests in it; batching goes on.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable

import torch
from torch import Tensor

from lipsync import timebase
from lipsync.codec import jpeg
from lipsync.errors import ResourceExhausted
from lipsync.model import audio_features
from lipsync.model.audio_features import FeatureStream
from lipsync.model.pipeline import Pipeline, StageClock
from lipsync.model.transfer import index_tensor, to_device
from lipsync.runtime.feature_sources import Part, Silence, Source, frames_of
from lipsync.threads import named_pool

log = logging.getLogger(__name__)
# Batches timed when a model's capacity is first measured (the fastest counts). Two left a CPU model's first figure
# at two thirds of its steady rate (70 ms against 45 ms a batch: OpenVINO and the JPEG encoder were still warming),
# so the first utterance of the first live session buffered 4.7 s instead of about 1.
CALIBRATION_BATCHES = 4


class QueueFull(ResourceExhausted):
    """The model's frame queue is at its bound."""


class Priority(IntEnum):
    """Service classes, most urgent first."""
    LIVE = 0       # a live session's frame slots
    STREAM = 1     # Stream RPCs
    BATCH = 2      # Synthesize and the compatibility service


# The serving capacity (generator, compositing and JPEG) below this share of the engine decision's generator-only
# figure means the machine is busier than when it was tuned (the demo on 2 cores serves ~0.8 of it on a quiet one).
SHORTFALL = 0.5
IDLE_QUALITIES = 4  # JPEG qualities of the avatar's idle frames kept per model (least recently used dropped)
JOB_FRAMES = 256  # `render` splits longer requests into jobs of this many frames (two in flight)


def _device_call(stream: Any, fn: Callable, *args: Any) -> Any:
    """Run on a device thread, on `stream` (CUDA) if given. StopIteration cannot cross into an asyncio future (it
    would never resolve): turn it, like any escape, into an ordinary error."""
    try:
        if stream is None:
            return fn(*args)
        with torch.cuda.stream(stream):
            return fn(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} raised StopIteration") from exc


PENDING = object()  # a device call's return value meaning "the future was handed on; do not settle it here"


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """On the loop: a device call's outcome into its future, unless the caller gave up on it meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(outcomes: list[tuple[asyncio.Future, Any]]) -> None:
    """On the loop: several futures at once (an exception as the result is that future's failure)."""
    for future, result in outcomes:
        if isinstance(result, BaseException):
            _settle(future, None, result)
        else:
            _settle(future, result, None)


class _Inline(concurrent.futures.Executor):
    """Runs work in the calling thread (DeviceWorkers(inline=True)): for checks that must see every tensor
    operation of the device path, such as the host-copy guard, which is thread-local."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class DeviceWorkers:
    """One inference thread and one encode thread per device (nvJPEG serialises on a global lock anyway), named
    `infer-<device>` and `encode-<device>` for the OS (lipsync.threads). On CUDA each has its own stream, so
    encoding batch k never waits for the inference of batch k+1 (nvJPEG synchronises the stream it runs on); work
    passes from one to the other with events. The threads make their device current, so events and allocations
    land on it."""

    def __init__(self, inline: bool = False) -> None:
        self._pools: dict[str, tuple[Any, Any]] = {}
        self._streams: dict[str, tuple[Any, Any]] = {}
        self.inline = inline

    def get(self, device: torch.device) -> tuple[Any, Any]:
        key = str(device)
        if self.inline:
            return _Inline(), _Inline()
        if key not in self._pools:
            init = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
            self._pools[key] = (named_pool(1, f"infer-{key}", init), named_pool(1, f"encode-{key}", init))
        return self._pools[key]

    def streams(self, device: torch.device) -> tuple[Any, Any]:
        """(inference stream, encode stream) of a CUDA device; (None, None) elsewhere."""
        key = str(device)
        if key not in self._streams:
            self._streams[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device)) if device.type == "cuda" \
                else (None, None)
        return self._streams[key]

    def shutdown(self) -> None:
        for infer, encode in self._pools.values():
            infer.shutdown(wait=False, cancel_futures=True)
            encode.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class Job:
    """Frames of one request (or one stream step) waiting for the generator. Its features (and visual inputs)
    are sources the inference thread reads when the frames are batched (runtime.feature_sources)."""
    features: Source
    frame_ids: list[int]
    quality: int | None  # None: raw frames, not JPEG
    visual: Source | None
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)
    next: int = 0  # frames handed to batches so far
    done: int = 0
    results: list[bytes | None] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {"queue": 0.0, "inference": 0.0, "composite": 0.0,
                                                               "encode": 0.0})
    batch_size: int = 0
    started: float | None = None
    priority: Priority = Priority.BATCH
    deadline: float = 0.0  # when frame 0 is due (perf_counter clock); frame k is due deadline + k * step
    step: float = timebase.FRAME_S
    on_frames: Callable[[int, int, list[bytes]], None] | None = None  # per delivered slice: (lo, hi, jpegs)
    seq: int = 0  # submission order: ties of (class, deadline) go to the job submitted first
    queued: bool = True  # frames of it wait in the scheduler's queue (counted in queued_frames)
    square: bool = False  # SQUARE output: JPEGs of the crop rectangles only

    def due(self, k: int) -> tuple[int, float]:
        return self.priority, self.deadline + k * self.step

    @property
    def size(self) -> int:
        return len(self.frame_ids)

    @property
    def cancelled(self) -> bool:
        return self.future.done()


def _next_due(job: Job) -> tuple[int, float]:
    return job.due(job.next)


@dataclass
class BatchSlice:
    job: Job
    lo: int
    hi: int


class ModelScheduler:
    """Batches the audio encoder (mel windows from every session) and the generator (frames) for one model.

    Shared between the event loop and the device threads: the job heap, its counters and the waiting mel windows,
    under `_lock`. Futures are created and settled on the loop only (`_post`)."""

    def __init__(self, pipeline: Pipeline, workers: DeviceWorkers, max_batch: int = 32, max_delay_ms: float = 2.0,
                 max_queue_frames: int = 4096, max_encodes_in_flight: int = 2, max_encoder_batch: int = 1024):
        self.pipeline = pipeline
        self.infer_pool, self.encode_pool = workers.get(pipeline.device)
        self.inline = workers.inline
        self.infer_stream, self.encode_stream = workers.streams(pipeline.device)
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1e3
        self.max_queue_frames = max_queue_frames
        # Jobs with frames waiting, as a heap by (class, due time of their next frame, submission order): picking
        # the next slice costs log(jobs), not a pass over every queued job (a deep Stream queue holds hundreds).
        # A cancelled job's frames leave the count at once; its entry is dropped when it reaches the top.
        self._heap: list[tuple[int, float, int, Job]] = []
        self._seq = itertools.count()
        self.queued_frames = 0
        self._live_jobs = 0  # queued LIVE jobs (a step does not wait for company while one is due)
        self.windows: deque[tuple[Tensor, Callable[[Tensor], Any], asyncio.Future]] = deque()  # encoder work
        self.max_encoder_batch = max_encoder_batch
        self._lock = threading.Lock()
        self._company = threading.Condition(self._lock)  # a step waiting for a fuller batch hears submissions
        self._in_flight = threading.Semaphore(max_encodes_in_flight)  # batches between inference and delivery
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple[Callable, tuple]] = []  # work for the loop from the device threads (_post)
        self._outbox_lock = threading.Lock()
        self._flush_queued = False
        self._running = False
        self._step_queued = False  # a step of this model waits on the inference thread
        self.batches = 0  # generator calls
        self.encoder_calls = 0
        # Measured service: seconds from a batch leaving the queue to its JPEGs (EWMA), and frames/s at full batches.
        self.batch_latency_s: float | None = None
        self.capacity_fps: float | None = None
        self._calibration: asyncio.Future | None = None  # the one measurement in progress (calibrate)
        self._idle_jpegs: collections.OrderedDict[int, asyncio.Future] = collections.OrderedDict()
        self._idle_askers: collections.Counter[asyncio.Future] = collections.Counter()  # callers awaiting each
        self._frames_out: Tensor | None = None  # whole frames composited for JPEG on the CPU (_frames_buffer)
        self._idle_lock = asyncio.Lock()
        self.live_sessions: set[Any] = set()  # open live sessions of this model (admission control)

    def start(self) -> None:
        if not self._running:
            self._loop = asyncio.get_running_loop()
            self._running = True
            self._kick()

    async def stop(self) -> None:
        with self._lock:
            self._running = False
            jobs = [job for *_, job in self._heap if job.queued]
            futures = [job.future for job in jobs] + [f for *_, f in self.windows]
            for job in jobs:
                job.queued = False  # their frames leave the count here, not again in _leave
            self._heap.clear()
            self.windows.clear()
            self.queued_frames = self._live_jobs = 0
            self._company.notify_all()
        for future in futures:
            if not future.done():
                future.set_exception(RuntimeError("model unloaded"))
                future.exception()  # expected at unload: an awaiter still gets it, an abandoned one is not logged

    # -- measured service rate
    def _measured(self, frames: int, seconds: float, weight: float = 0.2) -> None:
        if seconds <= 0:
            return
        self.batch_latency_s = seconds if self.batch_latency_s is None else \
            (1 - weight) * self.batch_latency_s + weight * seconds
        if frames >= self.max_batch:  # throughput is only meaningful for full batches
            rate = frames / seconds
            self.capacity_fps = rate if self.capacity_fps is None else (1 - weight) * self.capacity_fps + weight * rate
        elif self.capacity_fps is None:
            self.capacity_fps = frames / seconds  # a first, pessimistic figure

    async def calibrate(self) -> float:
        """Measure frames/s of one full batch through generator, compositing and JPEG (once per model: callers that
        arrive while it runs share that one measurement, rather than each timing its batch behind the others)."""
        if self.capacity_fps is None:
            if self._calibration is None or (self._calibration.done() and self._calibration.exception()):
                self._calibration = asyncio.ensure_future(self._calibrate())
            await asyncio.shield(self._calibration)
        assert self.capacity_fps is not None
        return self.capacity_fps

    async def _calibrate(self) -> None:
        n = self.max_batch
        ids = self.pipeline.avatar.frames_for(0, 0, n)
        features = Silence(tuple(self.pipeline.generator_audio_shape), self.pipeline.device)
        seconds = math.inf
        for _ in range(CALIBRATION_BATCHES):  # the first calls still pay one-time costs: the fastest is the speed
            t0 = time.perf_counter()
            await self.submit(features, ids, 75)
            seconds = min(seconds, time.perf_counter() - t0)
        self.batch_latency_s = self.capacity_fps = None
        self._measured(n, seconds, weight=1.0)
        log.info("model %s: measured %.1f frames/s at batch %d (%.0f ms per batch)", self.pipeline.name,
                 self.capacity_fps, n, seconds * 1e3)
        decision = self.pipeline.decision
        if decision is not None and self.capacity_fps < SHORTFALL * decision.frames_per_s:
            log.warning("model %s serves %.1f frames/s, under %.0f %% of the %.1f its engine decision measured "
                        "(%s%s): the machine is busier now than then; `lipsync tune --model %s` measures again",
                        self.pipeline.name, self.capacity_fps, 100 * SHORTFALL, decision.frames_per_s,
                        decision.describe(), ", provisional" if decision.provisional else "", self.pipeline.name)

    async def idle_jpegs(self, quality: int) -> list[bytes]:
        """The avatar's own frames as JPEG at `quality`, encoded once and kept for the IDLE_QUALITIES qualities
        used last (each is a full copy of the avatar as JPEG). Encoded by the device's encode thread, the one
        thread that calls the JPEG encoder (nvJPEG), on its stream, a batch of frames at a time: served batches
        queued meanwhile take their turns between them. One quality at a time, concurrent askers sharing it; when
        every asker has gone (cancelled GetAvatar calls), the encode stops after its current batch and is not
        kept."""
        task = self._idle_jpegs.get(quality)
        if task is not None:
            self._idle_jpegs.move_to_end(quality)
        else:
            frames = self.pipeline.avatar.frames
            loop = asyncio.get_running_loop()

            def encode(lo: int) -> list[bytes]:
                return _device_call(self.encode_stream, jpeg.encode_frames, frames[lo:lo + self.max_batch], quality)

            async def build() -> list[bytes]:
                async with self._idle_lock:
                    found: list[bytes] = []
                    for lo in range(0, self.pipeline.avatar.frame_count, self.max_batch):
                        found += await loop.run_in_executor(self.encode_pool, encode, lo)
                    return found
            task = self._idle_jpegs[quality] = asyncio.ensure_future(build())
            while len(self._idle_jpegs) > IDLE_QUALITIES:
                self._idle_jpegs.popitem(last=False)
        self._idle_askers[task] += 1
        try:
            return await asyncio.shield(task)  # one asker going away never cancels the others' encode
        except asyncio.CancelledError:
            if self._idle_askers[task] == 1 and not task.done():  # the last asker: nobody wants it any more
                task.cancel()
                if self._idle_jpegs.get(quality) is task:
                    del self._idle_jpegs[quality]
            raise
        except BaseException:
            if task.done() and self._idle_jpegs.get(quality) is task and not task.cancelled() and task.exception():
                del self._idle_jpegs[quality]  # a failed encode is not kept
            raise
        finally:
            self._idle_askers[task] -= 1
            if not self._idle_askers[task]:
                del self._idle_askers[task]

    def cached_idle_qualities(self) -> list[int]:
        """The JPEG qualities whose idle frames are kept (or being encoded), least recently used first."""
        return list(self._idle_jpegs)

    def feature_stream(self, lookahead: int = audio_features.LOOKAHEAD) -> FeatureStream:
        """A fresh feature stream for one utterance on this model's device (encoder calls go through `features`;
        its buffers are made there, on the first step)."""
        return FeatureStream(None, self.pipeline.device, lookahead)

    # -- hand-offs between the event loop and the device threads
    def _post(self, fn: Callable, *args: Any) -> None:
        """Run `fn(*args)` on the event loop (from any thread). Posts that come before the loop has run the last
        ones share its wake-up: an encoder result and a batch's frames arriving together cost one."""
        with self._outbox_lock:
            self._outbox.append((fn, args))
            if self._flush_queued:
                return
            self._flush_queued = True
        loop = self._loop or asyncio.get_running_loop()
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for the result any more

    def _flush(self) -> None:
        with self._outbox_lock:
            work, self._outbox, self._flush_queued = self._outbox, [], False
        for fn, args in work:
            try:
                fn(*args)
            except Exception:
                log.exception("delivering results of %s failed", self.pipeline.name)

    def _on_device(self, fn: Callable[[], Any], future: asyncio.Future) -> asyncio.Future:
        """Run `fn` on the inference thread (in order with the batching steps); its return value or exception
        settles `future` on the loop, unless it returns PENDING (it handed `future` on, to the encoder)."""
        def run() -> None:
            try:
                result = _device_call(self.infer_stream, fn)
            except BaseException as exc:  # noqa: BLE001 - it belongs to the caller, on the loop
                self._post(_settle, future, None, exc)
                return
            if result is not PENDING:
                self._post(_settle, future, result, None)
        self._loop = self._loop or asyncio.get_running_loop()
        self.infer_pool.submit(run)
        return future

    async def run_on_device(self, fn, *args):
        """Run device work (mel spectrogram, windows) on this device's inference thread, in order with batches."""
        return await self._on_device(lambda: fn(*args), asyncio.get_running_loop().create_future())

    async def features(self, stream: FeatureStream, wave: Tensor | None, end: bool,
                       decode: Callable[[], Tensor | None] | None = None,
                       then: Callable[[int, Tensor], Any] | None = None) -> Any:
        """One step of a session's audio: new samples (and/or end of audio) → (first frame index, features of
        the frames that became final), or what `then(first, features)` makes of them on the device thread (a live
        session stores them there and gets counts back). The encoder call is shared with every other session of
        the model. `decode`, given instead of `wave`, makes the samples on the device thread; the mel windows go
        straight to the model's encoder queue there and the session's `accept` runs right after the encoder: one
        hand-off to the device and one wake-up back per step."""
        step = stream.end_windows if end else stream.windows
        future = asyncio.get_running_loop().create_future()

        def accept(embeddings: Tensor) -> Any:
            found = stream.accept(embeddings)
            return then(*found) if then is not None else found

        def windows() -> Any:
            found = step(decode() if decode is not None else wave)
            if not found.shape[0]:
                return accept(found.new_zeros(0, 512))
            self._queue_windows(found, accept, future)
            return PENDING
        return await self._on_device(windows, future)

    def encode(self, windows: Tensor, accept: Callable[[Tensor], Any]) -> asyncio.Future:
        """Queue mel windows [n,1,80,16] (n ≥ 1) for the audio encoder; resolves to `accept(embeddings [n,512])`,
        run on the device thread right after the encoder. Windows from all sessions waiting at the same time go
        through the encoder in one call."""
        future = asyncio.get_running_loop().create_future()
        self._queue_windows(windows, accept, future)
        return future

    def _queue_windows(self, windows: Tensor, accept: Callable[[Tensor], Any], future: asyncio.Future) -> None:
        with self._lock:
            self.windows.append((windows, accept, future))
        self._kick()

    def _run_encoder(self, work: list[tuple[Tensor, Callable[[Tensor], Any], asyncio.Future]]) -> list[Any]:
        """Every waiting session's windows through the encoder at once; each session's embeddings to its
        `accept` (a failure there is that session's result, not the others')."""
        self.encoder_calls += 1
        embeddings = self.pipeline.encoder(torch.cat([w for w, _, _ in work]))
        results: list[Any] = []
        for (_, accept, _), mine in zip(work, embeddings.split([w.shape[0] for w, _, _ in work])):
            try:
                results.append(accept(mine))
            except Exception as exc:
                results.append(exc)
        return results

    def _encode_pending(self) -> None:
        """On the inference thread: the waiting windows through the encoder; every session's result settled
        in one wake-up of the loop."""
        work, size = [], 0
        with self._lock:
            while self.windows and size < self.max_encoder_batch:
                windows, accept, future = self.windows.popleft()
                if not future.done():
                    work.append((windows, accept, future))
                    size += windows.shape[0]
        if not work:
            return
        try:
            results = _device_call(self.infer_stream, self._run_encoder, work)
        except Exception as exc:
            log.error("audio encoder batch for %s failed: %s", self.pipeline.name, exc)
            results = [exc] * len(work)
        self._post(_settle_all, [(future, result) for (_, _, future), result in zip(work, results)])

    def submit(self, features: Source, frame_ids: list[int], quality: int | None, visual: Source | None = None,
               priority: Priority = Priority.BATCH, deadline: float | None = None, step: float = timebase.FRAME_S,
               on_frames: Callable[[int, int, list[bytes]], None] | None = None, square: bool = False
               ) -> asyncio.Future:
        """Queue frames; the future resolves to (list of JPEG bytes, timings dict). Frame k is due at
        `deadline + k*step` (default: now + k × 40 ms); `on_frames(lo, hi, jpegs)` sees each slice as soon as it
        is encoded; `square`: JPEGs of each frame's crop rectangle only (SQUARE output). Cancelling the future
        drops the frames not yet in a batch."""
        n = len(frame_ids)
        future = asyncio.get_running_loop().create_future()
        if n == 0:
            future.set_result(([], {"queue": 0.0, "inference": 0.0, "composite": 0.0, "encode": 0.0,
                                    "batch_size": 0}))
            return future
        job = Job(features, frame_ids, quality, visual, future, results=[None] * n, priority=priority,
                  deadline=time.perf_counter() if deadline is None else deadline, step=step, on_frames=on_frames,
                  square=square and quality is not None)
        with self._lock:
            # Live frames are bounded by admission control and each session's own limits, and refusing them would
            # break a conversation's video: the queue bound applies to the other classes.
            if priority != Priority.LIVE and self.queued_frames + n > self.max_queue_frames:
                raise QueueFull(f"model {self.pipeline.name}: queue holds {self.queued_frames} frames; "
                                f"{n} more would exceed its bound of {self.max_queue_frames}")
            job.seq = next(self._seq)
            self._push(job)
            self.queued_frames += n
            self._live_jobs += priority == Priority.LIVE
            self._company.notify()
        future.add_done_callback(lambda _, j=job: self._leave(j))  # cancelled or failed: its frames leave now
        self._kick()
        return future

    async def render(self, features: Source, frame_ids: list[int], quality: int | None,
                     visual: Source | None = None, priority: Priority = Priority.BATCH, due: float | None = None,
                     square: bool = False) -> tuple[list[Any], dict[str, float]]:
        """JPEG bytes (or, with quality None, uint8 RGB frames [3,H,W] on the host) of any number of frames, as
        jobs of at most JOB_FRAMES (and half the queue bound), two in flight: a long request never exceeds the
        queue bound, and its virtual deadlines run on across its jobs. `due`: when the first frame is due
        (perf_counter clock; default now), for callers that split one timeline into several requests."""
        n = len(frame_ids)
        step = max(1, min(JOB_FRAMES, self.max_queue_frames // 2))
        arrived = time.perf_counter() if due is None else due
        jobs: deque[asyncio.Future] = deque()
        jpegs: list[bytes] = []
        timings = {"queue": 0.0, "inference": 0.0, "composite": 0.0, "encode": 0.0, "batch_size": 0}
        starts = iter(range(0, n, step))

        def submit(lo: int) -> asyncio.Future:
            hi = lo + step
            return self.submit(Part(features, lo, hi), frame_ids[lo:hi], quality,
                               None if visual is None else Part(visual, lo, hi), priority,
                               deadline=arrived + lo * timebase.FRAME_S, square=square)
        try:
            for lo in itertools.islice(starts, 2):
                jobs.append(submit(lo))
            first = True
            while jobs:
                got, t = await jobs.popleft()
                lo = next(starts, None)
                if lo is not None:
                    jobs.append(submit(lo))
                jpegs.extend(got)
                for stage in ("inference", "composite", "encode"):
                    timings[stage] += t.get(stage, 0.0)
                timings["batch_size"] = max(timings["batch_size"], t.get("batch_size", 0))
                if first:
                    timings["queue"], first = t.get("queue", 0.0), False
        finally:
            for job in jobs:
                job.cancel()
        return jpegs, timings

    # -- the job heap (callers hold _lock, except the two that take it themselves)
    def _push(self, job: Job) -> None:
        heapq.heappush(self._heap, (*job.due(job.next), job.seq, job))

    def _leave(self, job: Job) -> None:
        """The job's frames no longer wait: all taken, or it was cancelled or failed (idempotent; takes _lock)."""
        with self._lock:
            self._left(job)

    def _left(self, job: Job) -> None:
        if job.queued:
            job.queued = False
            self.queued_frames -= job.size - job.next
            self._live_jobs -= job.priority == Priority.LIVE

    def _first(self) -> Job | None:
        """The queued job whose next frame is first by (class, deadline), left on the heap; entries of jobs that
        left the queue are dropped on the way."""
        while self._heap:
            job = self._heap[0][-1]
            if job.queued and not job.cancelled:
                return job
            heapq.heappop(self._heap)
            self._left(job)
        return None

    def _take_batch(self) -> list[BatchSlice]:
        """Up to max_batch frames, earliest (class, deadline) first; runs of one job stay together (takes _lock)."""
        batch, room = [], self.max_batch
        with self._lock:
            while room:
                best = self._first()
                if best is None:
                    break
                heapq.heappop(self._heap)
                runner = self._first()
                runner_up = _next_due(runner) if runner is not None else None
                take = 1
                while take < min(room, best.size - best.next) and (
                        runner_up is None or best.due(best.next + take) <= runner_up):
                    take += 1
                if batch and batch[-1].job is best and batch[-1].hi == best.next:
                    batch[-1].hi += take
                else:
                    batch.append(BatchSlice(best, best.next, best.next + take))
                best.next += take
                room -= take
                self.queued_frames -= take
                if best.next < best.size:
                    self._push(best)
                else:
                    self._left(best)
        return batch

    def _live_due(self) -> bool:
        """A live frame is waiting: do not hold the batch back for company."""
        return self._live_jobs > 0

    # -- the batching step, on the inference thread
    def _kick(self) -> None:
        """Queue one batching step of this model on the inference thread, unless one is queued already (any
        thread). Steps of every model on the device, and other device work, take turns there in order."""
        with self._lock:
            if self._step_queued or not self._running:
                return
            self._step_queued = True
        try:
            self.infer_pool.submit(self._step)
        except RuntimeError:  # the device's threads have shut down
            with self._lock:
                self._step_queued = False

    def _has_work(self) -> bool:
        return bool(self.windows) or self.queued_frames > 0

    def _step(self) -> None:
        """Audio first (it gates the frames of every session), then one generator batch; queued again while work
        is left, so other device work interleaves between batches (inline: loops here instead). While
        `max_encodes_in_flight` batches wait for the encode thread, no batch is taken and the thread stays free for
        the sessions' audio; the encode thread queues the next step when it finishes one."""
        while True:
            with self._lock:
                self._step_queued = False
                if not self._running:
                    return
            encoder_busy = False
            try:
                self._encode_pending()
                if self.queued_frames > 0:
                    if self._in_flight.acquire(blocking=False):
                        self._wait_for_company()
                        batch = self._take_batch()
                        if batch:
                            self._run_batch(batch)  # the slot is released once the batch is encoded
                        else:
                            self._in_flight.release()
                    else:
                        encoder_busy = True
            except Exception:  # a bug in one step fails nothing else: batching goes on
                log.exception("batching step of %s failed", self.pipeline.name)
            if encoder_busy or not self._has_work():
                return
            if not self.inline:
                self._kick()
                return

    def _wait_for_company(self) -> None:
        """Hold a batch that is not full for up to max_delay_ms, so concurrent requests join it; a live frame, a
        full batch or unloading ends the wait."""
        if self.max_delay <= 0:
            return
        with self._lock:
            until = time.perf_counter() + self.max_delay
            while (0 < self.queued_frames < self.max_batch and not self._live_jobs and self._running
                   and (left := until - time.perf_counter()) > 0):
                self._company.wait(left)

    def _run_batch(self, batch: list[BatchSlice]) -> None:
        now = time.perf_counter()
        for s in batch:
            if s.job.started is None:
                s.job.started = now
                s.job.timings["queue"] = (now - s.job.submitted) * 1e3
        try:  # the caller holds an in-flight slot: released once the batch is encoded (or failed)
            clock, predictions, ids, ready = _device_call(self.infer_stream, self._infer, batch)
            self.batches += 1
            self.encode_pool.submit(self._encode_batch, batch, clock, predictions, ids, ready, now)
        except BaseException as exc:  # noqa: BLE001 - this batch's requests fail, the others go on
            self._in_flight.release()
            self._post(self._fail, batch, exc)

    def _encode_batch(self, batch: list[BatchSlice], clock: StageClock, predictions: Tensor, ids: list[int],
                      ready: Any, started: float) -> None:
        """On the encode thread: composite and JPEG, then hand the whole batch to the loop in one wake-up."""
        try:
            result, error = _device_call(self.encode_stream, self._finish, batch, clock, predictions, ids,
                                         ready), None
        except BaseException as exc:  # noqa: BLE001 - delivered as this batch's failure
            result, error = None, exc
        finally:
            self._in_flight.release()
        self._deliver(batch, len(ids), started, result, error)
        if self._has_work():
            self._kick()  # a step may have left frames waiting for this slot

    def _infer(self, batch: list[BatchSlice]) -> tuple[StageClock, Tensor, list[int], Any]:
        """Generator predictions of a batch, on the inference stream; the event marks when they are ready."""
        clock = StageClock(self.pipeline.device)
        device = self.pipeline.device
        ids = [i for s in batch for i in s.job.frame_ids[s.lo:s.hi]]
        features = torch.cat([to_device(frames_of(s.job.features, s.lo, s.hi), device) for s in batch])
        visual = None
        if any(s.job.visual is not None for s in batch):
            visual = torch.cat([to_device(frames_of(s.job.visual, s.lo, s.hi), device) if s.job.visual is not None
                                else self.pipeline.avatar.model_inputs(s.job.frame_ids[s.lo:s.hi]) for s in batch])
        with clock.stage("inference"):
            predictions = self.pipeline.infer(features, ids, visual)
        ready = None
        if self.infer_stream is not None:
            ready = torch.cuda.Event()
            ready.record(self.infer_stream)
        return clock, predictions, ids, ready

    def _finish(self, batch: list[BatchSlice], clock: StageClock, predictions: Tensor, ids: list[int],
                ready: Any = None) -> tuple[list[bytes], dict[str, float]]:
        """Composite and JPEG-encode a batch, on the encode stream once the predictions are ready."""
        if ready is not None:
            self.encode_stream.wait_event(ready)
            predictions.record_stream(self.encode_stream)  # the allocator must not reuse it before we are done
        offset, groups = 0, {}
        for s in batch:  # rows by (JPEG quality, SQUARE output)
            groups.setdefault((s.job.quality, s.job.square), []).extend(range(offset, offset + s.hi - s.lo))
            offset += s.hi - s.lo
        # batch rows in batch order: `frames` and `squares` are indexed through them, never by a group's order
        whole = sorted(row for (_, square), rows in groups.items() if not square for row in rows)
        parts = sorted(row for (_, square), rows in groups.items() if square for row in rows)
        # JPEG-bound whole frames on the CPU are composited into one buffer reused batch after batch (frames for
        # offline rendering, quality None, leave with the caller: those get their own)
        reuse = self.pipeline.device.type == "cpu" and all(q is not None for q, square in groups if not square)
        with clock.stage("composite"):  # whole frames where asked, crop rectangles only (SQUARE) where asked
            frames = self.pipeline.compose(*self._rows(predictions, ids, whole),
                                           out=self._frames_buffer(len(whole)) if reuse else None) if whole else None
            squares = dict(zip(parts, self.pipeline.squares(*self._rows(predictions, ids, parts)))) if parts else {}
        at = {row: k for k, row in enumerate(whole)}  # a batch row → its row in `frames`
        jpegs: list[Any] = [b""] * len(ids)
        with clock.stage("encode"):
            for (quality, square), rows in groups.items():
                if square:
                    out = jpeg.encode_images([squares[row] for row in rows], quality)
                else:
                    chosen = frames if len(rows) == len(whole) else \
                        frames.index_select(0, index_tensor([at[row] for row in rows], frames.device))
                    # quality None: the frames themselves (offline rendering to video or PNG), on the host
                    out = jpeg.encode_frames(chosen, quality) if quality is not None else chosen.cpu()
                for row, data in zip(rows, out):
                    jpegs[row] = data
        return jpegs, clock.result()

    def _frames_buffer(self, frames: int) -> Tensor:
        """Whole frames for `_finish` to composite into, on the encode thread only (one per device, so one batch
        at a time uses it): [≥frames,3,H,W] uint8, laid out as the avatar's frames are."""
        if self._frames_out is None or self._frames_out.shape[0] < frames:
            self._frames_out = self.pipeline.avatar.empty_frames(max(frames, self.max_batch))
        return self._frames_out

    @staticmethod
    def _rows(predictions: Tensor, ids: list[int], rows: list[int]) -> tuple[Tensor, list[int]]:
        """Predictions and frame ids of some rows of a batch (all of them without a copy)."""
        if len(rows) == len(ids):
            return predictions, ids
        return predictions.index_select(0, index_tensor(rows, predictions.device)), [ids[row] for row in rows]

    def _deliver(self, batch: list[BatchSlice], batch_size: int, started: float,
                 result: tuple[list[bytes], dict[str, float]] | None, error: BaseException | None) -> None:
        """On the encode thread: a finished batch's frames into their jobs. The loop hears of it only where it
        has something to do (a job complete, a slice for a live session's callback), in one wake-up for the
        whole batch: a Stream chunk spread over several batches wakes it once."""
        if error is not None or result is None:
            self._post(self._fail, batch, error or RuntimeError("encode failed"))
            return
        jpegs, timings = result
        self._measured(batch_size, time.perf_counter() - started)
        slices, completed, offset = [], [], 0
        for s in batch:
            job = s.job
            n = s.hi - s.lo
            job.results[s.lo:s.hi] = jpegs[offset:offset + n]
            if job.on_frames is not None:
                slices.append((job, s.lo, s.hi, jpegs[offset:offset + n]))
            offset += n
            for stage in ("inference", "composite", "encode"):
                job.timings[stage] += timings.get(stage, 0.0)
            job.batch_size = max(job.batch_size, batch_size)
            job.done += n
            if job.done == job.size:
                completed.append(job)
        if slices or completed:
            self._post(self._delivered, slices, completed)

    def _delivered(self, slices: list[tuple[Job, int, int, list[bytes]]], completed: list[Job]) -> None:
        """On the loop: frame callbacks, then the futures of the jobs that are complete."""
        for job, lo, hi, jpegs in slices:
            if not job.cancelled:
                try:
                    job.on_frames(lo, hi, jpegs)
                except Exception:
                    log.exception("frame callback of %s failed", self.pipeline.name)
        for job in completed:
            if not job.future.done():
                job.future.set_result((job.results, {**job.timings, "batch_size": job.batch_size}))

    def _fail(self, batch: list[BatchSlice], exc: BaseException) -> None:
        log.error("batch for %s failed: %s", self.pipeline.name, exc)
        for s in batch:
            if not s.job.future.done():
                s.job.future.set_exception(exc)
