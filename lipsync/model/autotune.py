"""Engine selection by measurement (`engine.backend: auto`).

Each candidate backend/precision that exists on the device is built (with its accuracy gate against eager fp32 on
the model's reference input) and probed with one call; those whose probe comes close to the best one's are timed
for a few seconds at each tuning batch, and the fastest (backend, precision, batch) wins; a larger batch or a later
candidate must beat the incumbent by `tune_margin` (latency and preference win ties). The decision is stored per
machine (CPU model and features or GPU, library versions, model digest, candidates), so the next load builds only
the winner.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lipsync.model.engines import (
    BUILD_REVISION,
    ONNX_RUNTIMES,
    Calibration,
    Engine,
    EngineConfig,
    EngineError,
    build_engine,
    cache_key,
    cpu_bf16_supported,
    cpu_int8_dot_product,
    onnx_runtime_available,
    quiet_builds,
    sized,
    tensorrt_available,
    unique_tmp,
)

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """What `auto` chose for one network on one machine, and the measurements behind it."""
    backend: str
    precision: str
    batch: int
    frames_per_s: float
    key: str
    measured: list[dict[str, Any]] = field(default_factory=list)  # every candidate: timings or why it was refused
    machine_load: float | None = None  # share of the CPUs other processes used while it was measured (Linux)
    provisional: bool = False  # measured on a busy machine: measured again at a later load if the machine is quiet

    def describe(self) -> str:
        return f"{self.backend}/{self.precision} at batch {self.batch} ({self.frames_per_s:.1f} frames/s)"


def cpu_name() -> str:
    """The CPU model as the kernel reports it (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device) -> dict[str, Any]:
    """Everything about this machine a measurement depends on."""
    versions: dict[str, Any] = {"torch": torch.__version__}
    for module in (*ONNX_RUNTIMES, "torch_tensorrt"):
        versions[module] = _installed_version(module)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"gpu": props.name, "capability": f"{props.major}.{props.minor}", **versions}
    return {"cpu": cpu_name(), "isa": torch.backends.cpu.get_cpu_capability(), "bf16": cpu_bf16_supported(),
            "threads": torch.get_num_threads(), **versions}


# The distributions that may provide each optional engine module (onnxruntime ships CPU and GPU builds).
DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
                 "openvino": ("openvino",), "torch_tensorrt": ("torch-tensorrt", "torch_tensorrt")}


def _installed_version(module: str) -> str | None:
    """The installed version of an engine module, read from its distribution's metadata: importing onnxruntime
    only to read `__version__` cost 0.3 s of every warm load (2-core EPYC), and this runs on each one."""
    for distribution in DISTRIBUTIONS.get(module, (module,)):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    loaded = sys.modules.get(module)  # a module on the path without metadata (a source build)
    return getattr(loaded, "__version__", None) if loaded is not None else None


def available(candidate: str, device: torch.device) -> tuple[bool, str]:
    """Whether a "backend/precision" candidate can run on `device`, and why not."""
    backend, _, precision = candidate.partition("/")
    if backend == "tensorrt":
        return tensorrt_available()
    if backend in ONNX_RUNTIMES:
        ok, why = onnx_runtime_available(backend) if device.type == "cpu" else (False, "CPU only")
        if not ok:
            return False, why
        if precision not in ONNX_RUNTIMES[backend]:
            return False, f"{backend} computes in {' or '.join(ONNX_RUNTIMES[backend])} only"
    if device.type == "cpu" and precision == "bf16" and not cpu_bf16_supported():
        return False, "this CPU has no native bf16 (AVX512-BF16/AMX)"
    if device.type == "cpu" and precision == "fp16":
        return False, "no fp16 kernels on CPU"
    if precision == "int8":
        if importlib.util.find_spec("nncf") is None:
            return False, "nncf is not installed (pip install nncf)"
        if not cpu_int8_dot_product():
            # measured on a 2-core AVX2 EPYC: 1.3-1.5x the fp32 speed but 38 dB in the mouth zone (below the gate),
            # and ~20 s of quantization on a first load
            return False, "this CPU has no int8 dot-product instructions (AVX512-VNNI/AVX-VNNI/AMX-INT8)"
    return True, "available"


TUNE_ROUNDS = 3  # each candidate and batch is timed in this many interleaved rounds (A B A B …): the best counts


def _cpu_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy since boot (every core; steal included), from /proc/stat; None
    where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """The share of the machine's CPUs that other processes (and the hypervisor's steal) used from construction
    to `share()`: what spoils a timing. This process's own threads do not count."""

    def __init__(self) -> None:
        self.busy, self.own, self.started = _cpu_busy_s(), time.process_time(), time.perf_counter()

    def share(self) -> float | None:
        busy = _cpu_busy_s()
        wall = time.perf_counter() - self.started
        if busy is None or self.busy is None or wall <= 0:
            return None
        others = (busy - self.busy) - (time.process_time() - self.own)
        return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def machine_load_now(seconds: float = 0.5) -> float | None:
    """Other processes' share of the CPUs over the next `seconds` (None where it cannot be read)."""
    probe = MachineLoad()
    time.sleep(seconds)
    return probe.share()


def time_engine(engine: Engine, sample_shapes: list[tuple[int, ...]], batch: int, seconds: float,
                warm_up: bool = True, min_calls: int = 2) -> float:
    """Steady-state frames/s of `engine` at `batch` (same seeded inputs each time; one warm-up call unless this
    engine already ran at this batch)."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(batch, *s, generator=generator).to(engine.device) for s in sample_shapes]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    if warm_up:
        engine(*inputs)
        sync()
    calls, started = 0, time.perf_counter()
    while True:
        engine(*inputs)
        calls += 1
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= min_calls:
            return calls * batch / elapsed


def probe_engine(engine: Engine, sample_shapes: list[tuple[int, ...]], batch: int) -> float:
    """Frames/s of one call at `batch` after one untimed call: cheap, and enough to tell a candidate that cannot
    win from one worth timing."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.rand(batch, *s, generator=generator).to(engine.device) for s in sample_shapes]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    engine(*inputs)
    sync()
    started = time.perf_counter()
    engine(*inputs)
    sync()
    return batch / max(time.perf_counter() - started, 1e-9)


def decide(rows: list[dict[str, Any]], margin: float) -> dict[str, Any] | None:
    """The winning measurement: rows are in preference order (candidate, then batch); a row replaces the
    incumbent only when it is faster by more than `margin`."""
    best = None
    for row in rows:
        if row.get("frames_per_s") and (best is None or row["frames_per_s"] > best["frames_per_s"] * (1 + margin)):
            best = row
    return best


class DecisionCache:
    """Decisions as JSON files under `<cache_dir>/decisions/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve() / "decisions"

    def get(self, key: str) -> Decision | None:
        file = self.root / f"{key}.json"
        try:
            return Decision(**json.loads(file.read_text()))
        except FileNotFoundError:
            return None
        except Exception as exc:
            log.warning("engine decision %s is unreadable (%s); measuring again", file, exc)
            return None

    def put(self, decision: Decision) -> None:
        """Keep a decision (written to a temporary name, renamed); a cache that cannot hold it is said once."""
        file = self.root / f"{decision.key}.json"
        tmp = unique_tmp(file)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(dataclasses.asdict(decision), indent=2))
            tmp.replace(file)
        except OSError as exc:
            log.warning("the engine decision cannot be kept under %s (%s): it is measured again at the next load",
                        self.root, exc.strerror or exc)
        finally:
            tmp.unlink(missing_ok=True)


def _config_for(config: EngineConfig, candidate: str, batch: int) -> EngineConfig:
    backend, _, precision = candidate.partition("/")
    return dataclasses.replace(sized(config, batch), backend=backend, precision=precision)


def _calibrated(candidate: str, calibration: Calibration | None) -> dict[str, Any]:
    """The calibration argument of an int8 candidate's build (its inputs computed only if it quantizes)."""
    return {"calibration": calibration} if candidate.endswith("/int8") and calibration else {}


def tuned_engine(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig, device: torch.device,
                 name: str, key_parts: dict[str, Any], probe: list[Tensor] | None = None,
                 batches: list[int] | None = None, progress: bool = False,
                 build: Callable[..., Engine] = build_engine,
                 calibration: Calibration | None = None) -> tuple[Engine, Decision]:
    """The fastest engine for `net` on `device` that passes the accuracy gate, and the decision behind it (reused
    from the cache when this machine, model and candidate list were measured before). `calibration` gives the
    inputs an int8 candidate is quantized on; it is called only when one is built."""
    device = torch.device(device)
    candidates = list(config.candidates.get(device.type, []))
    batches = sorted(batches or config.tune_batches.get(device.type, [config.max_batch]))
    if not candidates:
        raise EngineError(f"{name}: no engine candidates configured for {device.type} (engine.candidates)")
    key = cache_key(machine=machine_key(device), builds=BUILD_REVISION, model=key_parts, shapes=sample_shapes,
                    candidates=candidates,
                    batches=batches, margin=[config.tune_margin, config.probe_margin],
                    gates=[config.tolerance, config.min_psnr_db],
                    options=[config.channels_last, config.onnxruntime_threads, config.onnxruntime_spinning,
                             config.openvino_threads])
    cache = DecisionCache(config.cache_dir)
    decision = None if config.retune else cache.get(key)
    if decision is not None and (f"{decision.backend}/{decision.precision}" not in candidates
                                 or decision.batch not in batches):  # readable but not a choice this load can make
        log.warning("%s: the cached decision %s is not one of the candidates %s at batches %s; measuring again", name,
                    f"{decision.backend}/{decision.precision} at batch {decision.batch}", candidates, batches)
        decision = None
    if decision is not None and decision.provisional:
        load = machine_load_now()
        if load is not None and load <= config.tune_max_load:
            log.info("%s: the decision measured on a busy machine (%.0f %% of its CPUs used by other processes) "
                     "is measured again now that it is quiet", name, 100 * (decision.machine_load or 0))
            decision = None
    if decision is not None:
        log.info("%s: %s, measured earlier on this machine%s (decision %s)", name, decision.describe(),
                 " while it was busy (provisional)" if decision.provisional else "", key)
        try:
            chosen = f"{decision.backend}/{decision.precision}"
            return build(net, sample_shapes, _config_for(config, chosen, decision.batch), device, name, key_parts,
                         progress=progress, probe=probe, **_calibrated(chosen, calibration)), decision
        except EngineError as exc:
            log.warning("%s: the cached choice no longer builds (%s); measuring again", name, exc)
    tuning_started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    engines: dict[str, Engine] = {}
    probes: dict[str, float] = {}
    steps = tqdm(total=len(candidates), desc=f"{name}: tuning", unit="step", leave=False,
                 disable=None if progress else True)
    # 1. Build each candidate (its accuracy gate included) and probe it with one call at the smallest batch.
    for candidate in candidates:
        steps.set_postfix_str(f"building {candidate}")
        ok, why = available(candidate, device)
        if not ok:
            rows.append({"candidate": candidate, "refused": why})
            log.debug("%s: skipping %s (%s)", name, candidate, why)
            steps.update()
            continue
        started = time.perf_counter()
        try:
            with quiet_builds():
                engine = build(net, sample_shapes, _config_for(config, candidate, batches[-1]), device, name,
                               key_parts, progress=False, probe=probe, **_calibrated(candidate, calibration))
        except Exception as exc:  # accuracy gate, a compiler error, a missing library: never fatal here
            rows.append({"candidate": candidate, "refused": f"{type(exc).__name__}: {exc}"})
            # the gate refusing a reduced precision is an outcome of the measurement; anything else is worth a look
            log.log(logging.INFO if isinstance(exc, EngineError) else logging.WARNING, "%s: not %s: %s", name,
                    candidate, exc)
            steps.update()
            continue
        engine.build_s = time.perf_counter() - started
        probes[candidate] = probe_engine(engine, sample_shapes, batches[0])
        log.debug("%s: %s built in %.1f s, probe %.2f frames/s at batch %d", name, candidate, engine.build_s,
                  probes[candidate], batches[0])
        engines[candidate] = engine
        steps.update()
    # 2. Time, at every tuning batch, only the candidates whose probe is close to the best one's.
    fastest = max(probes.values(), default=0.0)
    close = [c for c in engines if probes[c] >= fastest * (1 - config.probe_margin)]
    for candidate in [c for c in engines if c not in close]:
        best = max(probes, key=probes.get)
        rows.append({"candidate": candidate, "probe_frames_per_s": round(probes[candidate], 3),
                     "skipped": f"probe {probes[candidate]:.2f} frames/s at batch {batches[0]} against "
                                f"{fastest:.2f} for {best} (more than {config.probe_margin:.0%} slower)"})
        del engines[candidate]
    # In interleaved rounds (every candidate and batch once per round, then again): a burst of other work spoils
    # one round of each, not every timing of one candidate; the best round counts, and the machine's load over the
    # whole timing decides whether the decision is kept as final.
    steps.total = len(candidates) + len(close) * len(batches) * TUNE_ROUNDS
    timings: dict[tuple[str, int], list[float]] = {(c, b): [] for c in close for b in batches}
    load = MachineLoad()
    for round_ in range(TUNE_ROUNDS):
        for candidate, batch in timings:
            steps.set_postfix_str(f"timing {candidate} at batch {batch}")
            timings[candidate, batch].append(time_engine(engines[candidate], sample_shapes, batch,
                                                         config.tune_seconds / TUNE_ROUNDS, warm_up=round_ == 0,
                                                         min_calls=1))
            steps.update()
    machine_load = load.share()
    for (candidate, batch), rounds in timings.items():
        engine, fps = engines[candidate], max(rounds)
        rows.append({"candidate": candidate, "batch": batch, "frames_per_s": round(fps, 3),
                     "rounds_frames_per_s": [round(r, 3) for r in rounds],
                     "probe_frames_per_s": round(probes[candidate], 3), "build_s": round(engine.build_s, 2),
                     "max_error": engine.max_error, "psnr_db": engine.psnr_db, "mouth_psnr_db": engine.mouth_psnr_db})
        log.debug("%s: %s at batch %d: %.2f frames/s (rounds %s)", name, candidate, batch, fps,
                  ", ".join(f"{r:.2f}" for r in rounds))
    steps.close()
    best_row = decide(rows, config.tune_margin)
    best_engine = engines.get(best_row["candidate"]) if best_row else None
    if best_row is None or best_engine is None:
        raise EngineError(f"{name}: no engine candidate could be built on {device}: "
                          + "; ".join(f"{r['candidate']}: {r['refused']}" for r in rows if "refused" in r))
    backend, _, precision = best_row["candidate"].partition("/")
    busy = machine_load is not None and machine_load > config.tune_max_load
    decision = Decision(backend, precision, best_row["batch"], best_row["frames_per_s"], key, rows,
                        None if machine_load is None else round(machine_load, 3), busy)
    runner_up = decide([r for r in rows if r.get("candidate") != best_row["candidate"]], config.tune_margin)
    skipped = [r["candidate"] for r in rows if "skipped" in r]
    log.info("%s: chose %s in %.1f s%s%s", name, decision.describe(), time.perf_counter() - tuning_started,
             f"; next best {runner_up['candidate']} at batch {runner_up['batch']} "
             f"({runner_up['frames_per_s']:.1f} frames/s)" if runner_up else "",
             f"; not timed (slower at the probe): {', '.join(skipped)}" if skipped else "")
    if busy:
        log.warning("%s: measured while other processes used %.0f %% of this machine's CPUs: the choice is kept as "
                    "provisional and measured again at a later load on a quiet machine (or now: lipsync tune --model "
                    "NAME)", name, 100 * machine_load)
    cache.put(decision)
    best_engine.max_batch = decision.batch
    return best_engine, decision
