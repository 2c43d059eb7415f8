"""Model registry (SPEC §10): declared models, loading on demand or at start, placement across devices,
memory budgets measured at load, LFU/LRU eviction of idle models, pinning, idle unload, statistics."""
from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from lipsync import threads
from lipsync.config import ConfigError, Section, limit, setting
from lipsync.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted, clip
from lipsync.model.demo import ensure_demo_model
from lipsync.model.engines import CacheUnusable, EngineConfig, EngineError
from lipsync.model.pipeline import (
    ModelFileError,
    ModelSpec,
    Pipeline,
    PipelineConfig,
    check_model_files,
    load_pipeline,
    micro_batch_setting,
    pick_device,
)
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler

log = logging.getLogger(__name__)
LATENCY_WINDOW = 1000  # recent requests kept per stage for percentiles


class UnknownModel(NotFound):
    """A model id that is not declared (or, for a token scoped to other models, not one it may see: the same
    message either way)."""

    def __init__(self, model_id: str):
        super().__init__(f"unknown model {clip(model_id)} (ListModels lists the models of this server)")


class ModelFilesError(FailedPrecondition):
    """A declared model whose files are missing or corrupt."""


class CapacityError(ResourceExhausted):
    """No room for the model within the configured limits."""


class ModelBusy(FailedPrecondition):
    """The model has requests in flight."""


@dataclass
class RegistryConfig(Section):
    """`registry`: which models are loaded where, memory, eviction, batching across requests."""
    WHERE = "registry"
    max_models: int = limit(8, low=1, help="loaded models per device")
    memory_budget_mb: float = limit(0.0, low=0, help="per device, measured at load; 0 = unlimited")
    eviction: str = setting("lfu", "lfu | lru, among models with no request in flight; pinned models never",
                            choices=("lfu", "lru"))
    idle_unload_s: float = limit(0.0, low=0, help="unload models idle this long; 0 = never")
    devices: list[str] | str = setting("auto", "auto = every CUDA device (else the CPU), or a list like [cuda:0, "
                                               "cuda:1]")
    max_batch: int = limit(32, low=1, high=1024, help="frames per generator batch across requests and streams")
    max_delay_ms: float = limit(2.0, low=0, high=10000, help="wait at most this long for a batch to fill")
    max_queue_frames: int = limit(4096, low=1, help="bounded queue per model: beyond it requests get "
                                                    "RESOURCE_EXHAUSTED")


@dataclass
class ModelEntry:
    spec: ModelSpec
    pinned: bool = False
    preload: bool = False
    device_pref: str | None = None
    synthetic: bool = False
    pipeline: Pipeline | None = None
    scheduler: ModelScheduler | None = None
    device: str = ""
    memory_bytes: int = 0
    load_ms: float = 0.0
    in_flight: int = 0
    requests: int = 0
    frames: int = 0
    uses: int = 0
    last_used: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loading: asyncio.Task | None = None  # the one load in progress, shared by every caller
    latencies: dict[str, deque] = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None

    def record(self, frames: int, timings: dict[str, float]) -> None:
        self.requests += 1
        self.frames += frames
        for stage, ms in timings.items():
            if stage != "batch_size":
                self.latencies.setdefault(stage, deque(maxlen=LATENCY_WINDOW)).append(ms)

    def latency_summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, values in self.latencies.items():
            ordered = sorted(values)
            out[stage] = {"mean": statistics.fmean(ordered), "p50": ordered[len(ordered) // 2],
                          "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "count": len(ordered)}
        return out


def _configured_device(key: str, name: Any) -> str:
    """A device named in the config, checked: one line naming the key when it is not a device of this machine."""
    try:
        return str(pick_device(str(name)))
    except RuntimeError as exc:
        why = " (CUDA is not available here)" if "CUDA" in str(exc) else ""
        raise ConfigError(f"{key}={name!r}: must be auto, cpu, cuda or cuda:N of this machine{why}") from None


class Registry:
    def __init__(self, models: dict[str, Any], config: RegistryConfig, engine: EngineConfig,
                 pipeline_cfg: PipelineConfig | Any, default_device: str = "auto"):
        pipeline_cfg = pipeline_cfg if isinstance(pipeline_cfg, PipelineConfig) else \
            PipelineConfig.from_dict(pipeline_cfg)
        self.config, self.engine, self.pipeline_cfg = config, engine, pipeline_cfg
        self.entries: dict[str, ModelEntry] = {}
        for name, cfg in (models or {}).items():
            cfg = dict(cfg)
            self.entries[name] = ModelEntry(ModelSpec.from_dict(name, cfg), pinned=bool(cfg.get("pinned", False)),
                                            preload=bool(cfg.get("preload", False)),
                                            device_pref=cfg.get("device"), synthetic=bool(cfg.get("synthetic")))
        self.devices = self._devices(config.devices, default_device)
        self.workers = DeviceWorkers()
        self._load_lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None
        self.on_evict = None  # optional callback(model_id, reason)
        log.info("registry: %d declared models on devices %s (max %d models, budget %s per device, %s eviction)",
                 len(self.entries), self.devices, config.max_models,
                 f"{config.memory_budget_mb:g} MB" if config.memory_budget_mb else "unlimited", config.eviction)

    @staticmethod
    def _devices(devices: list[str] | str, default: str) -> list[str]:
        if devices == "auto":
            if default != "auto":
                return [_configured_device("device", default)]
            if torch.cuda.is_available():
                return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            return ["cpu"]
        if isinstance(devices, str):
            raise ConfigError(f"registry.devices={devices!r}: must be auto or a list like [cuda:0, cuda:1]")
        return [_configured_device("registry.devices", d) for d in devices]

    # -- lifecycle
    async def start(self) -> None:
        for name, entry in self.entries.items():
            if entry.preload:
                await self.load(name)
        if self.config.idle_unload_s > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for name in list(self.entries):
            await self._unload(self.entries[name], "shutdown")
        self.workers.shutdown()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.config.idle_unload_s / 4))
            now = time.monotonic()
            for name, e in self.entries.items():
                if e.loaded and not e.pinned and not e.in_flight and now - e.last_used > self.config.idle_unload_s:
                    await self._unload(e, f"idle for {now - e.last_used:.0f} s")

    # -- queries
    def entry(self, model_id: str) -> ModelEntry:
        if not model_id:
            raise InvalidRequest("model_id is required")
        if model_id not in self.entries:
            raise UnknownModel(model_id)
        return self.entries[model_id]

    def used_bytes(self, device: str) -> int:
        return sum(e.memory_bytes for e in self.entries.values() if e.loaded and e.device == device)

    def loaded_on(self, device: str) -> list[ModelEntry]:
        return [e for e in self.entries.values() if e.loaded and e.device == device]

    @property
    def queued_frames(self) -> int:
        return sum(e.scheduler.queued_frames for e in self.entries.values() if e.scheduler)

    # -- use
    async def acquire(self, model_id: str) -> tuple[ModelEntry, bool, float]:
        """Mark a request in flight on the model, loading it first if needed: (entry, loaded_now, load_ms)."""
        entry = self.entry(model_id)
        entry.in_flight += 1
        try:
            loaded_now, ms = False, 0.0
            if not entry.loaded:
                _, already, ms = await self.load(model_id)
                loaded_now = not already
            entry.uses += 1
            entry.last_used = time.monotonic()
            return entry, loaded_now, ms
        except BaseException:
            entry.in_flight -= 1
            raise

    def release(self, entry: ModelEntry) -> None:
        entry.in_flight -= 1
        entry.last_used = time.monotonic()

    async def load(self, model_id: str, device: str | None = None) -> tuple[ModelEntry, bool, float]:
        """Load a model: (entry, already, ms). Every caller shares one load task per model, which runs to its end
        even if the callers go away (a cancelled request never leaves a half-load that the next one repeats)."""
        entry = self.entry(model_id)
        if device:
            self._check_device(device)
        if entry.loaded:
            return entry, True, entry.load_ms
        if entry.loading is None:
            entry.loading = asyncio.ensure_future(self._load(entry, device))
            entry.loading.add_done_callback(lambda task, e=entry: self._loaded(e, task))
        await asyncio.shield(entry.loading)
        return entry, False, entry.load_ms

    @staticmethod
    def _loaded(entry: ModelEntry, task: asyncio.Task) -> None:
        entry.loading = None
        if not task.cancelled():
            task.exception()  # retrieved here; the waiters got it too

    async def _load(self, entry: ModelEntry, device: str | None) -> None:
        # Loads run one at a time: each is counted against the limits before it starts, and the memory it
        # measures is its own.
        async with self._load_lock, entry.lock:
            if entry.loaded:
                return
            target = self._place(entry, device)
            await self._make_room(target, entry)
            started = time.perf_counter()
            log.info("loading model %s on %s", entry.spec.name, target)
            try:
                pipeline, memory_bytes = await self._run_load(entry, target)
            except ModelFileError as exc:
                log.error("model %s cannot be loaded: %s", entry.spec.name, exc)
                raise ModelFilesError(f"model {entry.spec.name!r} cannot be loaded: its {exc.role} is "
                                      f"{exc.reason} (the server log has the details)") from exc
            except CacheUnusable as exc:
                log.error("model %s cannot be loaded: %s", entry.spec.name, exc)
                raise ModelFilesError(f"model {entry.spec.name!r} cannot be loaded: engine.cache_dir cannot hold its "
                                      "engine (the server log says why; engine=eager needs no cache)") from exc
            except EngineError as exc:
                log.error("model %s: engine build failed: %s", entry.spec.name, exc)
                raise ModelFilesError(f"model {entry.spec.name!r} cannot be loaded: its engine could not be "
                                      "built (the server log has the details)") from exc
            entry.memory_bytes = memory_bytes
            entry.pipeline, entry.device = pipeline, target
            entry.load_ms = (time.perf_counter() - started) * 1e3
            # On CPU the pipeline's micro-batch is smaller than max_batch: large batches lose there.
            entry.scheduler = ModelScheduler(pipeline, self.workers, min(self.config.max_batch, pipeline.micro_batch),
                                             self.config.max_delay_ms, self.config.max_queue_frames)
            entry.scheduler.start()
            log.info("model %s loaded on %s in %.0f ms, %.1f MB measured", entry.spec.name, target, entry.load_ms,
                     entry.memory_bytes / 2**20)
            budget = self.config.memory_budget_mb * 2**20
            if budget and self.used_bytes(target) > budget:
                try:
                    await self._make_room(target, entry, after_load=True)
                except CapacityError:
                    await self._unload(entry, "over the memory budget on its own")
                    raise

    async def _run_load(self, entry: ModelEntry, device: str) -> tuple[Pipeline, int]:
        """Build the pipeline off the event loop, with its device memory: (pipeline, bytes). With CUDA graphs it is
        built on the device's inference thread, the thread that records and replays them (their state is per
        thread)."""
        if device.startswith("cuda") and self.engine.cuda_graphs:
            infer_pool, _ = self.workers.get(torch.device(device))
            return await asyncio.get_running_loop().run_in_executor(infer_pool, self._load_measured, entry, device)
        return await asyncio.to_thread(self._load_measured, entry, device)

    def _load_measured(self, entry: ModelEntry, device: str) -> tuple[Pipeline, int]:
        """On the loading thread (never the event loop: synchronising a device there would stall every session):
        the pipeline and what its load allocated on the device, at least its own tensors. Loads run one at a
        time; batches of other models running meanwhile reuse cached blocks, so the difference is the model's."""
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
        pipeline = self._load_pipeline(entry, device)
        if not cuda:
            return pipeline, pipeline.memory_bytes
        torch.cuda.synchronize(device)
        return pipeline, max(torch.cuda.memory_allocated(device) - before, pipeline.memory_bytes)

    def check(self) -> dict[str, str]:
        """Problems of the declared models' files, by model (nothing is put on a device). A synthetic model's
        avatar is drawn on its first load, so only its weights must be there."""
        problems = {}
        for name, entry in self.entries.items():
            try:
                check_model_files(entry.spec, avatar_drawn_on_load=entry.synthetic)
            except ModelFileError as exc:
                problems[name] = str(exc)
            if entry.device_pref:
                try:
                    self._check_device(entry.device_pref)
                except InvalidRequest as exc:
                    problems[name] = str(exc)
        return problems

    def _check_device(self, device: str) -> str:
        """A device named by a request or a model config, normalised ("cuda" → "cuda:0"); it must be served."""
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidRequest(f"device {clip(device)} is not a device name (cpu, cuda, cuda:N)") from None
        name = "cuda:0" if parsed.type == "cuda" and parsed.index is None else str(parsed)
        if name not in self.devices:
            raise InvalidRequest(f"device {clip(device)} is not served here; devices: {', '.join(self.devices)}")
        return name

    def _load_pipeline(self, entry: ModelEntry, device: str) -> Pipeline:
        if device.startswith("cuda"):
            torch.cuda.set_device(pick_device(device))
        if entry.synthetic:
            if not (entry.spec.avatar / "crop_rects.json").is_file():
                log.info("drawing the demo presenter's avatar into %s", entry.spec.avatar)
            ensure_demo_model(entry.spec.checkpoint, entry.spec.audio_encoder, entry.spec.avatar)
        micro = micro_batch_setting(self.pipeline_cfg, self.engine, torch.device(device).type)
        before, loader = threads.native_thread_ids(), threads.os_name()
        try:
            return load_pipeline(entry.spec, self.engine, device, micro, progress=True)  # bars on a terminal only
        finally:  # workers the engine started (OpenVINO's, for one) show as the device's engine, not as the loader
            threads.name_threads(threads.native_thread_ids() - before, f"engine-{device}", only_named=loader)

    def _place(self, entry: ModelEntry, requested: str | None) -> str:
        wanted = requested or entry.device_pref
        if wanted:
            return self._check_device(wanted)
        budget = self.config.memory_budget_mb * 2**20

        def free(device: str) -> float:
            if budget:
                return budget - self.used_bytes(device)
            if device.startswith("cuda"):
                return torch.cuda.mem_get_info(device)[0]
            return -len(self.loaded_on(device))
        return max(self.devices, key=free)

    async def _make_room(self, device: str, incoming: ModelEntry, after_load: bool = False) -> None:
        budget = self.config.memory_budget_mb * 2**20
        while True:
            others = [e for e in self.loaded_on(device) if e is not incoming]
            count = len(others) + 1
            need = self.used_bytes(device) + (0 if after_load else incoming.memory_bytes)
            over_count = count > self.config.max_models
            over_memory = bool(budget) and need > budget
            if not (over_count or over_memory):
                return
            victims = [e for e in others if not e.pinned and not e.in_flight]
            if not victims:
                raise CapacityError(f"no room for model {incoming.spec.name!r} on {device}: "
                                    f"{len(others)} models loaded (max {self.config.max_models}), "
                                    f"{need / 2**20:.0f} MB needed of a {budget / 2**20:.0f} MB budget, and every "
                                    "loaded model is pinned or busy")
            key = (lambda e: (e.uses, e.last_used)) if self.config.eviction == "lfu" else (lambda e: e.last_used)
            victim = min(victims, key=key)
            reason = (f"{self.config.eviction.upper()} eviction to make room for {incoming.spec.name} "
                      f"({'model count' if over_count else 'memory budget'})")
            await self._unload(victim, reason)

    async def unload(self, model_id: str) -> bool:
        entry = self.entry(model_id)
        async with entry.lock:
            if not entry.loaded:
                return False
            if entry.in_flight:
                raise ModelBusy(f"model {model_id!r} has {entry.in_flight} requests in flight")
            await self._unload(entry, "requested")
            return True

    async def _unload(self, entry: ModelEntry, reason: str) -> None:
        if not entry.loaded:
            return
        log.info("unloading model %s from %s: %s", entry.spec.name, entry.device, reason)
        # Mark it unloaded before awaiting anything, so a request arriving meanwhile loads it afresh.
        scheduler, device = entry.scheduler, entry.device
        entry.pipeline, entry.scheduler, entry.device, entry.uses = None, None, "", 0
        if scheduler:
            await scheduler.stop()
        if device.startswith("cuda"):  # on the device's thread, after the batches it still ran
            infer_pool, _ = self.workers.get(torch.device(device))
            await asyncio.get_running_loop().run_in_executor(infer_pool, torch.cuda.empty_cache)
        if self.on_evict and reason != "shutdown":
            self.on_evict(entry.spec.name, reason)
