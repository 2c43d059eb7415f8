"""Engines: every network runs through one interface, `build_engine(net, sample_shapes, config, ...)`.

Backends: `tensorrt` (torch_tensorrt dynamo IR, explicit fp16 typing, dynamic batch, cached on disk),
`compile` (torch.compile with fixed batch buckets, optional CUDA graphs), `onnxruntime` and `openvino` (CPU, from
our own ONNX export, cached on disk; OpenVINO also runs bf16 on CPUs with AMX/AVX512-BF16), `eager` (fp32/bf16 on
CPU, fp16/bf16 on CUDA, channels_last where it helps) and `auto` (`lipsync.autotune` measures the candidates).
Compilation and warm-up happen here, at model load.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lipsync.config import ConfigError, Section, limit, section, setting, settings

log = logging.getLogger(__name__)
# The level of a build's routine lines (backend, cache hit, saved, ready): INFO, or DEBUG while autotune builds its
# candidates (`quiet_builds`: one progress line says what tuning does; the winner's line says what was chosen)
DETAIL: contextvars.ContextVar[int] = contextvars.ContextVar("lipsync_engine_detail", default=logging.INFO)


@contextlib.contextmanager
def quiet_builds() -> Any:
    """Builds inside log their routine lines at DEBUG (autotune's candidates)."""
    token = DETAIL.set(logging.DEBUG)
    try:
        yield
    finally:
        DETAIL.reset(token)


GRAPH_WARMUP_CALLS = 3  # calls per batch bucket at load when CUDA graphs are on (run, record, replay)

BACKENDS = ("auto", "tensorrt", "compile", "onnxruntime", "openvino", "eager")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
              "int8": torch.float32}  # int8: OpenVINO's quantized graph, fed and read in fp32
BUILDS: Counter[str] = Counter()  # compilations performed in this process, by backend (cache hits excluded)


class EngineError(RuntimeError):
    """An engine that cannot be built or fails its accuracy gate."""


class CacheUnusable(EngineError):
    """`engine.cache_dir` cannot hold what an engine needs to write (a file, not writable, full)."""


MIN_CACHE_FREE_MB = 256  # an export of the 328 generator is ~50 MB, an int8 model and its blobs ~100 MB more


def cache_dir_problem(cache_dir: str) -> str | None:
    """Why `engine.cache_dir` cannot hold engines (one line naming the setting), or None: it must be a directory
    (made if missing) where a file can be written, with MIN_CACHE_FREE_MB free."""
    root = Path(cache_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"lipsync")
        probe.unlink()
        free_mb = shutil.disk_usage(root).free / 2**20
    except OSError as exc:
        return f"engine.cache_dir={str(root)!r} is not usable: {exc.strerror or exc}"
    if free_mb < MIN_CACHE_FREE_MB:
        return (f"engine.cache_dir={str(root)!r} has {free_mb:.0f} MB free; engines need up to "
                f"{MIN_CACHE_FREE_MB} MB")
    return None


@dataclass
class EngineConfig(Section):
    """`engine`: how the networks run. `auto` (the default) chooses by measurement at load: every candidate that
    exists on the device is built, checked against eager fp32 (max abs error and, for reduced precision, 8-bit PSNR
    of the 320x320 prediction on the avatar's own frames) and timed at each tuning batch; the fastest wins (ties go
    to the smaller batch and the earlier candidate). The decision is cached per machine, model and candidate list
    under cache_dir/decisions, so later loads build only it."""
    WHERE = "engine"
    backend: str = setting("auto", "auto | tensorrt | compile | onnxruntime | openvino | eager", choices=BACKENDS)
    precision: str = setting("auto", "for pinned backends: fp32 on CPU, fp16 on CUDA; or fp32 | fp16 | bf16 | int8 "
                             "(openvino only: NNCF post-training quantization)",
                             choices=("auto", "fp32", "fp16", "bf16", "int8"))
    candidates: dict[str, list[str]] = setting({
        "cpu": ["openvino/fp32", "onnxruntime/fp32", "openvino/bf16", "openvino/int8", "eager/fp32", "eager/bf16"],
        "cuda": ["tensorrt/fp16", "compile/fp16", "eager/fp16"]},
        "auto: measured at load, in order of preference on ties. CPU: bf16 ones only where the CPU has "
        "AMX/AVX512-BF16, int8 only where it has VNNI/AMX int8 (add compile/fp32 to also try inductor, about a "
        "minute per batch); compile/* on CUDA runs with CUDA graphs")
    tune_batches: dict[str, list[int]] = setting({"cpu": [1, 2, 4], "cuda": [8, 16, 32]}, "auto: the batches each "
                                                 "candidate is timed at")
    tune_seconds: float = limit(1.5, above=0, help="timing per candidate and batch (in interleaved rounds)")
    tune_max_load: float = limit(0.25, low=0, high=1, help="auto: a decision measured while other processes used more "
                                 "than this share of the machine's CPUs (steal included) is kept as provisional and "
                                 "measured again at a later load on a quiet machine")
    retune: bool = setting(False, "auto: measure the candidates again even where this machine has a decision "
                                  "(`lipsync tune --model NAME` sets it)")
    tune_margin: float = limit(0.05, low=0, high=1, help="a larger batch or a later candidate must be this much "
                                                         "faster (5 %) to win")
    probe_margin: float = limit(0.3, low=0, high=1, help="auto: every candidate is first probed with one call at "
                                "the smallest tuning batch; one slower than the best probe by more than this (30 %) "
                                "cannot win and is not timed further")
    min_psnr_db: float = limit(40.0, low=0, help="bf16/fp16/int8 are refused below this fidelity to fp32 (8-bit "
                               "PSNR, over the square and in its mouth zone)")
    channels_last: str | bool = setting("auto", "auto: on for CPU eager (measured faster on CPU), off elsewhere")
    batch_buckets: list[int] = setting([1, 2, 4, 8, 16, 24, 32], "torch.compile graphs (batches are padded up to "
                                                                 "the next bucket)")
    min_batch: int = limit(1, low=1, help="TensorRT dynamic batch profile")
    opt_batch: int = limit(24, low=1, help="TensorRT: the batch the engine is tuned for")
    max_batch: int = limit(32, low=1, high=1024, help="TensorRT: the largest batch of its profile")
    cuda_graphs: bool = setting(True, "on CUDA, torch.compile engines replay CUDA graphs (mode=reduce-overhead): "
                                      "built, recorded and replayed on the device's inference thread, every batch "
                                      "bucket at load; false: plain compiled kernels")
    onnxruntime_threads: int = limit(0, low=0, help="0: as many as torch uses")
    onnxruntime_spinning: bool = setting(False, "busy-waiting ORT threads would steal the cores of the encode "
                                                "thread")
    openvino_threads: int = limit(0, low=0, help="0: as many as torch uses")
    cache_dir: str = setting("~/.cache/lipsync/engines", "TensorRT engines, ONNX exports and decisions")
    tolerance: dict[str, float] = setting({"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1, "int8": 0.5},
                                          "accuracy gate at load: max abs error vs eager fp32 (a coarse check that "
                                          "catches broken engines; fidelity of reduced precision is decided by "
                                          "min_psnr_db). bf16 of a trained model reaches ~0.06 at its worst pixel")
    warmup: bool = setting(True, "run every batch bucket once at load, never on a user's first request")

    @classmethod
    def from_dict(cls, cfg: Any) -> "EngineConfig":
        values = settings(cfg, cls, "engine")
        if "tolerance" in values:
            values["tolerance"] = {**cls().tolerance, **dict(values["tolerance"])}
        for key in ("candidates", "tune_batches"):
            if key in values:
                values[key] = {device: list(v) for device, v in dict(values[key]).items()}
        if "batch_buckets" in values:
            values["batch_buckets"] = sorted(int(b) for b in values["batch_buckets"])
        config = section(cls, values, cls.WHERE)
        if not 1 <= config.min_batch <= config.opt_batch <= config.max_batch:
            raise ConfigError(f"engine.min_batch={config.min_batch}, opt_batch={config.opt_batch}, max_batch="
                              f"{config.max_batch}: must satisfy 1 <= min_batch <= opt_batch <= max_batch")
        if any(int(b) < 1 for b in config.batch_buckets):
            raise ConfigError(f"engine.batch_buckets={config.batch_buckets}: must be whole numbers >= 1")
        return config


def sized(config: EngineConfig, batch: int) -> EngineConfig:
    """`config` for engines that never see more than `batch` frames (nothing larger is compiled or warmed)."""
    return dataclasses.replace(config, max_batch=batch, opt_batch=min(config.opt_batch, batch),
                               min_batch=min(config.min_batch, batch))


def tensorrt_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken TensorRT install
        return False, f"torch_tensorrt is not importable ({type(exc).__name__}: {exc})"
    return True, "torch_tensorrt and CUDA are present"


def choose_backend(config: EngineConfig, device: torch.device) -> tuple[str, str]:
    """Resolve `auto` to a concrete backend; returns (backend, reason)."""
    if config.backend != "auto":
        return config.backend, "set in the engine config"
    if device.type == "cuda":
        ok, why = tensorrt_available()
        if ok:
            return "tensorrt", why
        return "compile", f"TensorRT unavailable ({why}); torch.compile on CUDA"
    return "eager", "CPU device: eager fp32 (TensorRT and CUDA graphs need CUDA)"


# Bumped whenever what a backend/precision candidate builds changes (e.g. int8's floating-point layers in bf16),
# or what the accuracy gate holds them to (3: speech features in its probe, not seeded noise), so that decisions
# measured on the older builds are measured again.
BUILD_REVISION = 3

# CPU backends that run our own ONNX export, and the precisions each computes in.
ONNX_RUNTIMES = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16", "int8")}


def onnx_runtime_available(runtime: str) -> tuple[bool, str]:
    """Whether `runtime` (a key of ONNX_RUNTIMES) imports, and why not. (The exporter's own dependencies are not
    imported here: a load whose export is cached never needs them, and importing onnxscript costs ~5 s.)"""
    try:
        __import__(runtime)
    except Exception as exc:
        return False, f"{runtime} is not importable ({type(exc).__name__}: {exc})"
    return True, f"{runtime} is installed"


def cpu_int8_dot_product() -> bool:
    """The CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), where int8 convolutions pay;
    without them int8 runs on AVX2 emulation, which also needs NNCF's overflow fix to stay accurate."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split()))


def cpu_bf16_supported() -> bool:
    """oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(config: EngineConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    return "fp16" if device.type == "cuda" else "fp32"


# --------------------------------------------------------------------------- engine objects
class Engine:
    """A callable network: inputs as float32 tensors with any batch size, output float32."""

    def __init__(self, name: str, backend: str, precision: str, device: torch.device, max_batch: int,
                 run: Callable[..., Tensor], dtype: torch.dtype, channels_last: bool):
        self.name, self.backend, self.precision, self.device = name, backend, precision, device
        self.max_batch, self._run, self.dtype, self.channels_last = max_batch, run, dtype, channels_last
        self.max_error = float("nan")  # measured against eager fp32 when built
        self.psnr_db = float("nan")
        self.mouth_psnr_db = float("nan")  # the same in MOUTH_ZONE
        self.build_s = float("nan")  # how long building it took (tuning records it)

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        # A fixed memory layout: compiled graphs are specialised on strides, and views (unfold, transpose) vary.
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    @torch.inference_mode()
    def __call__(self, *inputs: Tensor) -> Tensor:
        total = inputs[0].shape[0]
        outputs = []
        for lo in range(0, total, self.max_batch):
            chunk = [self._prepare(x[lo:lo + self.max_batch]) for x in inputs]
            outputs.append(self._run(*chunk).float())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def __repr__(self) -> str:
        return f"Engine({self.name}: {self.backend} {self.precision} on {self.device})"


def compile_buckets(config: EngineConfig) -> list[int]:
    """The batch shapes a compiled engine is built for: the configured buckets below max_batch, and max_batch
    itself, so every batch the engine is given (at most max_batch) has a bucket."""
    return sorted({b for b in config.batch_buckets if b < config.max_batch} | {config.max_batch})


def _bucketed(fn: Callable[..., Tensor], buckets: list[int]) -> Callable[..., Tensor]:
    """Pad the batch to the next bucket so a compiled graph only ever sees bucket shapes."""
    def run(*inputs: Tensor) -> Tensor:
        n = inputs[0].shape[0]
        bucket = next((b for b in buckets if b >= n), None)
        if bucket is None:
            raise EngineError(f"batch of {n} exceeds the largest compiled batch {buckets[-1]}")
        if bucket != n:
            inputs = tuple(torch.cat([x, x[-1:].expand(bucket - n, *x.shape[1:])]) for x in inputs)
        return fn(*inputs)[:n]
    return run


# --------------------------------------------------------------------------- the engine cache
def cache_key(**parts: Any) -> str:
    """Stable hash of everything an engine depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_digest(tensors: Iterable[Tensor]) -> str:
    """Stable hash of tensors' shapes, dtypes and values (any device): what a cache entry built from them is named
    by."""
    digest = hashlib.sha256()
    for x in tensors:
        digest.update(str((tuple(x.shape), x.dtype)).encode())
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class CacheEntryCorrupt(ValueError):
    """A cache entry whose files are not the bytes it was sealed with (cut short, flipped, overwritten)."""


def _fsync(path: Path) -> None:
    """Flush a written file to the disk before it is renamed into place (a crash never leaves a named half file)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class EngineCache:
    """Directory of compiled artefacts keyed by `cache_key` (the digest of what each was built from). Every entry
    is written to temporary names, flushed and renamed into place, then sealed: its meta.json records the sha256
    of each of its files. A load checks the seal; an entry that is stale, unreadable or not the bytes it was
    sealed with is said in one WARNING line, deleted and rebuilt."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, key: str, name: str, file: str = "engine.ep") -> Path:
        return self.root / f"{name.replace('/', '-')}-{key}" / file

    @staticmethod
    def entry_files(folder: Path) -> list[Path]:
        """The files an entry is made of (not its meta.json, nor files still being written)."""
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "meta.json"
                      and not p.name.startswith((".", "staged-")))

    def verify(self, folder: Path, stored: dict[str, Any]) -> None:
        """Raise CacheEntryCorrupt unless every file the seal lists is there with its digest."""
        sealed = stored.get("files")
        if sealed is None:
            return  # written before seals (or its seal is being written): checked by loading, sealed after
        for name, digest in sealed.items():
            file = folder / name
            if not file.is_file():
                raise CacheEntryCorrupt(f"{name} is missing")
            if file_digest(file) != digest:
                raise CacheEntryCorrupt(f"{name} is not the file it was sealed with (cut short or overwritten)")

    def seal(self, folder: Path, stored: dict[str, Any]) -> None:
        """Record the digest of every file of the entry in its meta.json (written to a temporary name, flushed,
        renamed)."""
        meta_file = folder / "meta.json"
        sealed = {**stored, "files": {p.name: file_digest(p) for p in self.entry_files(folder)}}
        tmp = unique_tmp(meta_file)
        try:
            tmp.write_text(json.dumps(sealed, indent=2, default=str))
            _fsync(tmp)
            tmp.replace(meta_file)
        finally:
            tmp.unlink(missing_ok=True)

    def get_or_build(self, key: str, name: str, build: Callable[[], Any], save: Callable[[Any, Path], None],
                     load: Callable[[Path], Any], meta: dict[str, Any], file: str = "engine.ep") -> Any:
        path = self.path(key, name, file)
        meta_file = path.with_name("meta.json")
        if path.is_file():
            try:
                stored = json.loads(meta_file.read_text())
                if stored.get("key") != key:
                    raise ValueError(f"stale entry (key {stored.get('key')} != {key})")
                self.verify(path.parent, stored)
                artefact = load(path)
                if "files" not in stored:
                    self.seal(path.parent, stored)
                log.log(DETAIL.get(), "engine cache hit for %s: %s", name, path)
                return artefact
            except Exception as exc:
                log.warning("engine cache entry %s is unusable (%s); rebuilding", path.parent, exc)
                shutil.rmtree(path.parent, ignore_errors=True)
        artefact = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Processes that start together (servers, test workers) may build the same entry at once: each writes to
        # a file of its own and renames it into place, the description first (a reader that finds the artefact
        # finds its description), the seal last; a temporary file is removed on any failure.
        stored = {"key": key, **meta}
        meta_tmp, tmp = unique_tmp(meta_file), unique_tmp(path)
        try:
            meta_tmp.write_text(json.dumps(stored, indent=2, default=str))
            meta_tmp.replace(meta_file)
            save(artefact, tmp)
            _fsync(tmp)
            tmp.replace(path)
            self.seal(path.parent, stored)
        finally:
            meta_tmp.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
            for staged in path.parent.glob(f"staged-{os.getpid()}-{threading.get_ident()}.*"):  # a save that
                staged.unlink(missing_ok=True)                                                  # failed half-way
        log.log(DETAIL.get(), "engine for %s saved to %s", name, path)
        return artefact


def unique_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other process or thread writes (renamed into place when done)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


# --------------------------------------------------------------------------- backends
def _eager(net: nn.Module, dtype: torch.dtype, channels_last: bool) -> Callable[..., Tensor]:
    net = net.to(dtype=dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _compiled(net: nn.Module, config: EngineConfig, device: torch.device, dtype: torch.dtype,
              channels_last: bool) -> Callable[..., Tensor]:
    net = _eager(net, dtype, channels_last)
    mode = "reduce-overhead" if (config.cuda_graphs and device.type == "cuda") else None
    BUILDS["compile"] += 1
    compiled = torch.compile(net, mode=mode, dynamic=False, fullgraph=True)
    if mode == "reduce-overhead":
        graphed = compiled

        def compiled(*inputs: Tensor) -> Tensor:
            # A CUDA-graph replay reuses its output buffer: start a new step and hand out a copy.
            torch.compiler.cudagraph_mark_step_begin()
            return graphed(*inputs).clone()
    return _bucketed(compiled, compile_buckets(config))


def compile_tensorrt(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig,
                     device: torch.device, dtype: torch.dtype) -> tuple[Any, list[Any]]:
    """The one TensorRT build (engine cache and `lipsync export` alike): torch.export with the inputs' shared batch
    dimension declared explicitly, then torch_tensorrt's dynamo compile with explicit typing and the batch profile
    min/opt/max. Returns (compiled program, its torch_tensorrt.Input specs)."""
    import torch_tensorrt

    net = net.to(device=device, dtype=dtype).eval()
    inputs = [torch_tensorrt.Input(min_shape=(config.min_batch, *s), opt_shape=(config.opt_batch, *s),
                                   max_shape=(config.max_batch, *s), dtype=dtype) for s in sample_shapes]
    example = tuple(torch.rand(config.opt_batch, *s, device=device).to(dtype) for s in sample_shapes)
    dynamic = None
    if config.min_batch < config.max_batch:
        batch = torch.export.Dim("batch", min=config.min_batch, max=config.max_batch)
        dynamic = tuple({0: batch} for _ in sample_shapes)  # one dimension, shared by every input
    exported = torch.export.export(net, example, dynamic_shapes=dynamic)
    program = torch_tensorrt.dynamo.compile(exported, arg_inputs=inputs, use_explicit_typing=True, device=device)
    return program, inputs


def check_artefact(run: Callable[..., Tensor], sample_shapes: list[tuple[int, ...]], config: EngineConfig,
                   device: torch.device, dtype: torch.dtype, source: str) -> None:
    """A prebuilt engine must take this model's inputs (shapes, dtype) over the whole batch profile."""
    for batch in sorted({config.min_batch, config.max_batch}):
        try:
            with torch.inference_mode():
                out = run(*[torch.zeros(batch, *s, device=device, dtype=dtype) for s in sample_shapes])
            if out.shape[0] != batch:
                raise ValueError(f"it returned a batch of {out.shape[0]}")
        except Exception as exc:
            raise EngineError(f"{source} does not accept this model's inputs {sample_shapes} as {dtype} at batch "
                              f"{batch} (engine profile {config.min_batch}/{config.opt_batch}/{config.max_batch}): "
                              f"{exc}") from None


def _tensorrt(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig, device: torch.device,
              dtype: torch.dtype, name: str, key_parts: dict[str, Any]) -> Callable[..., Tensor]:
    import tensorrt
    import torch_tensorrt

    specs: list[Any] = []
    net = net.to(device=device, dtype=dtype).eval()
    props = torch.cuda.get_device_properties(device)
    parts = {**key_parts, "gpu": props.name, "capability": f"{props.major}.{props.minor}",
             "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
             "tensorrt": tensorrt.__version__, "precision": str(dtype),
             "profile": [config.min_batch, config.opt_batch, config.max_batch], "shapes": sample_shapes}
    key = cache_key(**parts)

    def build():
        BUILDS["tensorrt"] += 1
        log.info("compiling %s with TensorRT (batch %d/%d/%d, %s); this takes a few minutes the first time",
                 name, config.min_batch, config.opt_batch, config.max_batch, dtype)
        program, inputs = compile_tensorrt(net, sample_shapes, config, device, dtype)
        specs[:] = inputs
        return program

    def save(program, path: Path) -> None:
        torch_tensorrt.save(program, str(path), arg_inputs=specs, output_format="exported_program")

    def load(path: Path):
        return torch_tensorrt.load(str(path)).module()

    cache = EngineCache(config.cache_dir)
    module = cache.get_or_build(key, name, build, save, load, parts)
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    return module


def _onnx_file(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig, name: str,
               key_parts: dict[str, Any]) -> Path:
    """Our own ONNX export of `net` (fp32, dynamic batch), cached on disk per checkpoint, shapes and torch version;
    onnxruntime and OpenVINO both read it."""
    parts = {**key_parts, "torch": torch.__version__, "shapes": sample_shapes, "format": "onnx",
             "exporter": "torchscript-or-dynamo"}
    names = onnx_input_names(sample_shapes)

    def build() -> nn.Module:  # the export itself happens in `save`, straight into the cache entry
        BUILDS["onnx"] += 1
        log.info("exporting %s to ONNX (once per checkpoint; cached)", name)
        return copy.deepcopy(net)  # the caller's network stays as it was

    def save(module: nn.Module, path: Path) -> None:
        export_onnx(module, tuple(torch.rand(2, *shape) for shape in sample_shapes), path, names, "output", name)

    cache = EngineCache(config.cache_dir)
    path = cache.get_or_build(cache_key(**parts), name, build, save, lambda p: p, parts, file="model.onnx")
    return path if isinstance(path, Path) else cache.path(cache_key(**parts), name, "model.onnx")


def export_onnx(net: nn.Module, example: tuple[Tensor, ...], path: Path, input_names: list[str], output_name: str,
                name: str, opset: int = 18, max_batch: int = 1024) -> None:
    """`net` (fp32, eval) to an ONNX file at `path` with a dynamic batch axis. The TorchScript exporter first: the
    same graph for these convolutional networks in a quarter of the time (the demo generator: 4.9 s against 20.8 s
    for the dynamo exporter on 2 cores; onnxruntime and OpenVINO run both at the same speed), which is most of a
    first load and of `lipsync export`; the dynamo exporter where it cannot trace the network."""
    net = net.float().eval()
    with warnings.catch_warnings():  # the exporters' deprecation and shape notes are not the user's concern
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, example, str(path), input_names=input_names, output_names=[output_name],
                              dynamic_axes={n: {0: "batch"} for n in [*input_names, output_name]},
                              opset_version=opset, dynamo=False)
        except Exception as exc:  # a network it cannot trace, or a torch without it
            log.info("%s: the TorchScript ONNX exporter failed (%s); using the dynamo exporter", name, exc)
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            torch.onnx.export(net, example, str(path), input_names=input_names, output_names=[output_name],
                              dynamic_shapes=tuple({0: batch} for _ in example), opset_version=opset,
                              dynamo=True, external_data=False, verbose=False)


def onnx_input_names(sample_shapes: list[tuple[int, ...]]) -> list[str]:
    """The input names of our ONNX exports, in argument order."""
    return [f"input{i}" for i in range(len(sample_shapes))]


def _onnxruntime(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig, name: str,
                 key_parts: dict[str, Any]) -> Callable[..., Tensor]:
    """The ONNX export run by onnxruntime's CPU provider (fp32)."""
    import onnxruntime

    path = _onnx_file(net, sample_shapes, config, name, key_parts)
    names = onnx_input_names(sample_shapes)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = config.onnxruntime_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.onnxruntime_spinning else "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(*inputs: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0])
    return run


@dataclass
class Calibration:
    """The inputs an int8 engine is quantized on, named by what they are made of: a cached quantized model is
    found by `key` without computing `inputs()` (the demo's: the audio encoder over synthesised speech, ~0.3 s
    of every warm load on 2 cores)."""
    key: str
    inputs: Callable[[], list[list[Tensor]]]

    @staticmethod
    def of(samples: list[list[Tensor]]) -> Calibration:
        """A calibration set given as its inputs, named by their values."""
        return Calibration(tensor_digest(x for sample in samples for x in sample)[:16], lambda: samples)


def _openvino(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig, name: str,
              key_parts: dict[str, Any], precision: str, calibration: Calibration) -> Callable[..., Tensor]:
    """The ONNX export compiled by OpenVINO's CPU plugin: fp32, bf16 inference precision (AMX/AVX512-BF16), or int8
    (the export quantized by NNCF on `calibration`); inputs and outputs stay fp32. One infer request, used by one
    thread at a time."""
    import openvino

    path = _onnx_file(net, sample_shapes, config, name, key_parts)
    model: Any = str(path)
    if precision == "int8":
        model = _int8_model(path, calibration, config, name, key_parts)
    settings = {
        # int8: the layers left in floating point compute in bf16 where the CPU has it natively (2-core AVX512
        # EPYC, seeded 328 generator at batch 2: 33 frames/s against 20 with them in fp32 and 26 for all-bf16)
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16",
                                     "int8": "bf16" if cpu_bf16_supported() else "f32"}[precision],
        "PERFORMANCE_HINT": "LATENCY",  # one request at a time: all threads on each call
        "INFERENCE_NUM_THREADS": config.openvino_threads or torch.get_num_threads(),
        # OpenVINO's own cache of compiled models (keyed by model and these settings): a later load of the same
        # export skips the compilation (1.2 s → 0.2 s for the demo generator on 2 cores)
        "CACHE_DIR": str(Path(config.cache_dir).expanduser() / "openvino")}
    try:
        compiled = openvino.Core().compile_model(model, "CPU", settings)
    except Exception as exc:  # OpenVINO's own cache can hold a blob it cannot read (overwritten, cut short)
        blobs = Path(settings["CACHE_DIR"])
        log.warning("%s: OpenVINO could not compile with its cache %s (%s); compiling afresh into an emptied cache",
                    name, blobs, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        shutil.rmtree(blobs, ignore_errors=True)
        compiled = openvino.Core().compile_model(model, "CPU", settings)
    request, lock = compiled.create_infer_request(), threading.Lock()

    def run(*inputs: Tensor) -> Tensor:
        with lock:  # the outputs are copies (share_outputs=False): the next call cannot overwrite them
            result = request.infer([x.numpy() for x in inputs], share_inputs=True, share_outputs=False)
        return torch.from_numpy(result[0])
    return run


def _int8_model(onnx_file: Path, calibration: Calibration, config: EngineConfig, name: str,
                key_parts: dict[str, Any]) -> Path:
    """The ONNX export quantized to int8 by NNCF's post-training quantization on `calibration` (the model's own
    inputs), cached as OpenVINO IR (model.xml + model.bin) by export and calibration digest. The first and last two
    convolutions stay in floating point (they carry the image itself), and NNCF's overflow fix is on: without it,
    on CPUs lacking VNNI, the demo generator fell to 17 dB PSNR."""
    parts = {**key_parts, "onnx": file_digest(onnx_file), "calibration": calibration.key,
             "format": "openvino-int8"}

    def build() -> Any:
        # importing nncf makes torch look for a CUDA toolkit and warn that there is none: not the user's concern
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        import nncf
        import openvino
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        samples = calibration.inputs()
        if not samples:
            raise EngineError(f"{name}: int8 needs calibration inputs (the pipeline passes the avatar's frames)")
        nncf.set_log_level(logging.WARNING)  # its INFO lines (one per layer) are not the user's concern
        BUILDS["openvino-int8"] += 1
        log.info("%s: quantizing to int8 on %d calibration inputs (once per checkpoint; cached)", name,
                 len(samples))
        model = openvino.Core().read_model(str(onnx_file))
        convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                        if op.get_type_name() == "Convolution"]
        kept = convolutions[:2] + convolutions[-2:]
        # NNCF draws progress bars on stdout, which carries only `lipsync serve`'s READY line (spawn and supervisors
        # read it), and lipsync's own line already says what happens: they are dropped
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return nncf.quantize(
                model, nncf.Dataset(samples, lambda sample: [x.numpy() for x in sample]),
                preset=nncf.QuantizationPreset.MIXED, subset_size=len(samples), fast_bias_correction=True,
                ignored_scope=nncf.IgnoredScope(names=kept, validate=False),
                advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))

    cache = EngineCache(config.cache_dir)
    final = cache.path(cache_key(**parts), name, "model.xml")

    def save(model: Any, path: Path) -> None:
        import openvino

        staged = path.with_name(f"staged-{os.getpid()}-{threading.get_ident()}.xml")  # OpenVINO wants .xml
        openvino.save_model(model, str(staged), compress_to_fp16=False)  # writes staged.xml and staged.bin
        staged.with_suffix(".bin").replace(final.with_suffix(".bin"))  # the weights first, then the graph
        staged.replace(path)

    cache.get_or_build(cache_key(**parts), name, build, save, lambda p: p, parts, file="model.xml")
    return final


def load_tensorrt_artefact(path: str | Path) -> Callable[..., Tensor]:
    """Load an engine written by `lipsync export --format tensorrt`."""
    import torch_tensorrt

    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise EngineError(f"TensorRT engine not found: {file}")
    return torch_tensorrt.load(str(file)).module()


# --------------------------------------------------------------------------- the one entry point
def build_engine(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig,
                 device: str | torch.device, name: str = "net", key_parts: dict[str, Any] | None = None,
                 artefact: str | Path | None = None, progress: bool = False,
                 probe: list[Tensor] | None = None,
                 calibration: Calibration | list[list[Tensor]] | None = None) -> Engine:
    """Wrap `net` (eval, fp32) for `device` with the configured backend; warm up and check accuracy against eager
    fp32 on `probe` (the model's reference input; seeded random inputs when not given). `calibration`: the inputs
    an int8 engine is quantized on (the probe when not given)."""
    device = torch.device(device)
    backend, reason = choose_backend(config, device)
    precision = resolve_precision(config, device)
    if device.type == "cpu" and (precision == "fp16" or (precision == "bf16" and not cpu_bf16_supported())):
        raise EngineError(f"precision {precision} is not supported on this CPU; use fp32")
    if precision == "int8" and backend != "openvino":
        raise EngineError(f"precision int8 runs on the openvino backend only (asked for {backend})")
    if backend == "tensorrt":
        ok, why = tensorrt_available()
        if not ok:
            raise EngineError(f"the tensorrt backend was requested but {why}")
    if backend in ONNX_RUNTIMES:
        ok, why = onnx_runtime_available(backend)
        if device.type != "cpu" or precision not in ONNX_RUNTIMES[backend] or not ok:
            raise EngineError(f"the {backend} backend runs {' or '.join(ONNX_RUNTIMES[backend])} on CPU only "
                              f"(asked for {precision} on {device}{'' if ok else '; ' + why})")
    dtype = PRECISIONS[precision]
    channels_last = (device.type == "cpu" and backend == "eager") if config.channels_last == "auto" \
        else bool(config.channels_last)
    log.log(DETAIL.get(), "%s: backend %s (%s), precision %s, channels_last=%s, device %s", name, backend, reason,
            precision, channels_last, device)
    reference = net.to(device).eval().float()
    generator = torch.Generator().manual_seed(1234)
    if probe is None:
        probe = [torch.rand(min(2, config.max_batch), *s, generator=generator) for s in sample_shapes]
    probe = [x.to(device) for x in probe]
    expected = eager_reference(reference, probe, config, name, key_parts)
    # the ONNX backends read the network only to export it, and the export copies it (on a cache miss)
    working = reference if backend in ONNX_RUNTIMES else copy.deepcopy(reference)
    started = time.perf_counter()
    if backend == "eager":
        run = _eager(working, dtype, channels_last)
    elif backend == "compile":
        run = _compiled(working, config, device, dtype, channels_last)
    elif backend == "onnxruntime":
        run = _onnxruntime(working, sample_shapes, config, name, key_parts or {})
    elif backend == "openvino":
        if calibration is None or isinstance(calibration, list):
            calibration = Calibration.of(calibration or [[x[i:i + 1].cpu() for x in probe]
                                                         for i in range(probe[0].shape[0])])
        run = _openvino(working, sample_shapes, config, name, key_parts or {}, precision, calibration)
        dtype = torch.float32  # the exported graph takes fp32; bf16 is OpenVINO's inference precision
    elif artefact is not None:
        run = load_tensorrt_artefact(artefact)
        check_artefact(run, sample_shapes, config, device, dtype, f"TensorRT engine file {artefact}")
    else:
        run = _tensorrt(working, sample_shapes, config, device, dtype, name, key_parts or {})
    engine = Engine(name, backend, precision, device, config.max_batch, run, dtype,
                    channels_last and backend != "tensorrt" and backend not in ONNX_RUNTIMES)
    if config.warmup and backend != "eager" and backend not in ONNX_RUNTIMES:
        buckets = compile_buckets(config) if backend == "compile" \
            else sorted({config.min_batch, config.opt_batch, config.max_batch})
        # CUDA graphs: a bucket's first call runs it, the second records its graph, the third replays it: all at
        # load, none on a user's first batch
        calls = GRAPH_WARMUP_CALLS if backend == "compile" and config.cuda_graphs and device.type == "cuda" else 1
        for b in tqdm(buckets, desc=f"{name}: warming up {backend}", unit="batch",
                      disable=None if progress else True):
            inputs = [torch.zeros(b, *s, device=device) for s in sample_shapes]
            for _ in range(calls):
                engine(*inputs)
    got = engine(*probe)
    error = (got - expected).abs().max()
    bound = config.tolerance[precision]
    if not bool(error <= bound):
        raise EngineError(f"{name}: {backend} {precision} engine differs from eager fp32 by {float(error):.3g} "
                          f"(bound {bound:g}); refusing it")
    engine.psnr_db = psnr_8bit(got, expected)
    engine.mouth_psnr_db = psnr_8bit(mouth_zone(got), mouth_zone(expected)) if got.dim() == 4 else engine.psnr_db
    worst = min(engine.psnr_db, engine.mouth_psnr_db)
    if precision != "fp32" and worst < config.min_psnr_db:
        raise EngineError(f"{name}: {backend} {precision} output is {engine.psnr_db:.1f} dB PSNR from eager fp32 "
                          f"on the reference input, {engine.mouth_psnr_db:.1f} dB in the mouth zone (at least "
                          f"{config.min_psnr_db:g} dB required); refusing it")
    log.log(DETAIL.get(), "%s ready in %.1f s (vs eager fp32: max abs error %.2e, %.1f dB PSNR at 8 bits, %.1f dB in "
            "the mouth zone)", name, time.perf_counter() - started, float(error), engine.psnr_db, engine.mouth_psnr_db)
    engine.max_error = float(error)
    return engine


def eager_reference(reference: nn.Module, probe: list[Tensor], config: EngineConfig, name: str,
                    key_parts: dict[str, Any] | None) -> Tensor:
    """Eager fp32's output on the gate's probe, which every engine is held to. It depends only on the weights, the
    probe, torch and the device, so it is cached beside the engines when the weights are named by their digest
    (`key_parts` from a checkpoint): computing it was most of a warm load on CPU (the demo generator at batch 2:
    ~1.2 s of a 2.6 s load on 2 cores), and tuning built it again for every candidate."""
    def compute() -> Tensor:
        with torch.inference_mode():
            return reference(*probe).float()

    if not key_parts or "checkpoint" not in key_parts:
        return compute()
    device = probe[0].device
    parts = {**key_parts, "probe": tensor_digest(probe)[:24], "torch": torch.__version__, "format": "eager-fp32-output",
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    computed: list[Tensor] = []

    def build() -> Tensor:
        computed.append(compute())
        return computed[0]

    cache = EngineCache(config.cache_dir)
    try:
        expected = cache.get_or_build(cache_key(**parts), f"{name}-reference", build,
                                      lambda output, path: torch.save(output.cpu(), path),
                                      lambda path: torch.load(path, map_location="cpu", weights_only=True), parts,
                                      file="output.pt")
    except OSError as exc:  # an engine that needs no file of its own still loads where the cache cannot be written
        log.warning("%s: the accuracy gate's reference cannot be cached under %s (%s); computing it on each load",
                    name, config.cache_dir, exc.strerror or exc)
        expected = computed[0] if computed else compute()
    return expected.to(device)


# The part of the generator's square where the mouth moves (left, top, right, bottom as fractions of its side):
# reduced precisions must hold `min_psnr_db` there too, not only on average over the square.
MOUTH_ZONE = (0.2, 0.1, 0.8, 0.8)


def mouth_zone(images: Tensor) -> Tensor:
    """The MOUTH_ZONE of images [B,C,H,W]."""
    h, w = images.shape[-2:]
    left, top, right, bottom = MOUTH_ZONE
    return images[..., int(top * h):int(bottom * h), int(left * w):int(right * w)]


def psnr_8bit(image: Tensor, reference: Tensor) -> float:
    """PSNR in dB of two 0..1 images after rounding to 8 bits, as they are composited (inf when identical)."""
    a = (image.float().clamp(0, 1) * 255).round()
    b = (reference.float().clamp(0, 1) * 255).round()
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)
