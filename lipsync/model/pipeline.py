"""One loaded model: audio → features → generator → composite → JPEG, with per-stage timings.

Between decoded PCM and JPEG bytes every tensor stays on the model's device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from lipsync.config import ConfigError, Section, limit, section, setting, settings
from lipsync.model import audio_features, compose
from lipsync.model.autotune import tuned_engine
from lipsync.model.avatar import COMPOSE_MODES, Avatar, AvatarError, find_source, load_avatar
from lipsync.model.calibration import CALIBRATION_RECIPE, calibration_inputs, probe_features
from lipsync.model.engines import (
    ONNX_RUNTIMES,
    CacheUnusable,
    Calibration,
    Engine,
    EngineConfig,
    EngineError,
    build_engine,
    cache_dir_problem,
    cache_key,
    sized,
    tensor_digest,
)
from lipsync.model.networks import (
    AUDIO_FEATURE_SHAPE,
    INPUT_SIZE,
    CheckpointError,
    load_audio_encoder,
    load_generator,
    read_checkpoint,
)

log = logging.getLogger(__name__)


class StageClock:
    """Per-stage wall time: CUDA events on GPU (resolved once at the end), perf counters on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ms: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def result(self) -> dict[str, float]:
        for name, start, end in self._events:
            end.synchronize()
            self.ms[name] = self.ms.get(name, 0.0) + start.elapsed_time(end)
        self._events.clear()
        return dict(self.ms)


class ModelFileError(RuntimeError):
    """One of a model's files cannot be used. `role` names the file for clients (who never see its path);
    `detail` is the full explanation for the server log."""

    ROLES = {"checkpoint": "checkpoint", "audio_encoder": "audio encoder", "avatar": "avatar",
             "engine_file": "TensorRT engine file"}

    def __init__(self, role: str, cause: BaseException):
        self.role, self.cause = self.ROLES[role], cause
        self.reason = "missing" if isinstance(cause, FileNotFoundError) or "not found" in str(cause) \
            else "unreadable or not what the model needs"
        super().__init__(f"{self.role}: {cause}")


@contextmanager
def _role(role: str) -> Iterator[None]:
    try:
        yield
    except (CheckpointError, AvatarError, EngineError, FileNotFoundError, OSError) as exc:
        raise ModelFileError(role, exc) from exc


def check_model_files(spec: "ModelSpec", avatar_drawn_on_load: bool = False) -> None:
    """Validate a model's files on the CPU (weights against the variant's key list, avatar layout), putting
    nothing on a device; raises ModelFileError naming the file's role. `avatar_drawn_on_load` (the demo): a
    missing avatar is fine, the first load draws it; its weights must be there."""
    with _role("checkpoint"):
        load_generator(spec.checkpoint, spec.variant, spec.asr)
    with _role("audio_encoder"):
        load_audio_encoder(spec.audio_encoder)
    if not (avatar_drawn_on_load and not spec.avatar.exists()):
        with _role("avatar"):
            find_source(spec.avatar)
    _check_engine_file(spec)


def _check_engine_file(spec: "ModelSpec") -> None:
    if spec.engine_file is not None and not spec.engine_file.is_file():
        raise ModelFileError("engine_file", FileNotFoundError(f"TensorRT engine not found: {spec.engine_file}"))


@dataclass
class ModelSpec:
    """What a served model is made of (one entry of the `models` config group)."""
    name: str
    checkpoint: Path
    audio_encoder: Path
    avatar: Path
    variant: str = "328"
    asr: str = "ave"
    sequence: str = "pingpong"
    feather: int = 0
    compose: str = "paste"  # paste: SyncTalk_2D's exact paste (with `feather`); blend: the seam-free soft mask
    engine_file: Path | None = None  # optional prebuilt TensorRT generator (lipsync export --format tensorrt)

    @classmethod
    def from_dict(cls, name: str, cfg: Any) -> "ModelSpec":
        known = (set(cls.__dataclass_fields__) | {"pinned", "device", "preload", "synthetic"}) - {"name"}
        values = settings(cfg, known, f"model {name!r}")
        for key in ("checkpoint", "audio_encoder", "avatar"):
            if not values.get(key):
                raise ConfigError(f"models.{name}.{key}: is required (a file or directory path)")
        paths = {k: Path(str(values[k])).expanduser().resolve() for k in ("checkpoint", "audio_encoder", "avatar")}
        engine_file = values.get("engine_file")
        variant, sequence, feather = str(values.get("variant", "328")), str(values.get("sequence", "pingpong")), \
            values.get("feather", 0)
        compose = str(values.get("compose", "paste"))
        for key, value, ok, allowed in (
                ("variant", variant, variant in ("328", "160"), "one of 328, 160"),
                ("sequence", sequence, sequence in ("pingpong", "loop"), "one of pingpong, loop"),
                ("asr", values.get("asr", "ave"), values.get("asr", "ave") == "ave", "ave"),
                ("feather", feather, isinstance(feather, int) and not isinstance(feather, bool)
                 and 0 <= feather <= 164, "a whole number in 0..164"),
                ("compose", compose, compose in COMPOSE_MODES, f"one of {', '.join(COMPOSE_MODES)}")):
            if not ok:
                raise ConfigError(f"models.{name}.{key}={value!r}: must be {allowed}")
        return cls(name=name, **paths, variant=variant, asr="ave", sequence=sequence, feather=int(feather),
                   compose=compose,
                   engine_file=Path(str(engine_file)).expanduser().resolve() if engine_file else None)


class Pipeline:
    """A loaded model on one device: its engines, avatar and stages. Requests run through a
    `scheduler.ModelScheduler` (the server, `lipsync render`, the benchmarks and `render.synthesize` alike)."""

    def __init__(self, generator: Engine, encoder: Engine, avatar: Avatar, device: torch.device,
                 micro_batch: int = 32, name: str = "model", weight_bytes: int = 0, asr: str = "ave"):
        self.generator, self.encoder, self.avatar, self.device = generator, encoder, avatar, device
        self.micro_batch, self.name, self.weight_bytes = micro_batch, name, weight_bytes
        self.generator_audio_shape = AUDIO_FEATURE_SHAPE[asr]  # per-frame audio input of the generator
        self.decision: Any = None  # engine.backend=auto: the autotune decision its engine came from
        audio_features.prepare(device)

    # -- stages
    def features(self, wave: Tensor) -> Tensor:
        """16 kHz waveform on the device → per-frame audio features [D+2,32,16,16]."""
        return audio_features.frame_features(wave, self.encoder)

    def infer(self, features: Tensor, frame_ids: list[int], visual: Tensor | None = None) -> Tensor:
        """Generator predictions [B,3,S,S] (BGR, 0..1); `visual` overrides the avatar's own inputs."""
        if visual is None:
            visual = self.avatar.model_inputs(frame_ids)
        return self.generator(visual, features.to(self.device))

    def compose(self, predictions: Tensor, frame_ids: list[int], out: Tensor | None = None) -> Tensor:
        return compose.composite(self.avatar, predictions, frame_ids, out)

    def squares(self, predictions: Tensor, frame_ids: list[int]) -> list[Tensor]:
        """SQUARE output: each frame's crop rectangle as `compose` finishes it, [3,h,w] uint8 RGB."""
        return compose.squares(self.avatar, predictions, frame_ids)

    @property
    def memory_bytes(self) -> int:
        """Bytes held on the device by this model's tensors (weights and avatar)."""
        return self.avatar.nbytes + self.weight_bytes


DEVICE_TYPES = ("cpu", "cuda")


@dataclass
class PipelineConfig(Section):
    """`pipeline`: frames per generator call by device type, and `lipsync render`'s JPEG quality."""
    WHERE = "pipeline"
    micro_batch: dict = setting({"cpu": "auto", "cuda": "auto"}, "frames per generator call. auto: the batch "
                                "measured together with the engine (engine.backend: auto picks the fastest "
                                "backend/precision/batch on the device); a number fixes it")
    pinned_micro_batch: dict = setting({"cpu": 4, "cuda": 32}, "the micro-batch when the engine backend is pinned "
                                       "(eager/compile/...): CPU loses with large batches (activations outgrow the "
                                       "caches), GPU wants them large")
    jpeg_quality: int = limit(75, low=1, high=100, help="`lipsync render`: JPEG quality of the frames (--quality)")
    @classmethod
    def from_dict(cls, cfg: Any) -> "PipelineConfig":
        config = section(cls, cfg, cls.WHERE)
        for name in ("micro_batch", "pinned_micro_batch"):
            values = {**getattr(cls(), name), **getattr(config, name)}
            for device_type, value in values.items():
                key = f"pipeline.{name}.{device_type}"
                if device_type not in DEVICE_TYPES:
                    raise ConfigError(f"{key}: unknown device type; use {' or '.join(DEVICE_TYPES)}")
                if not (str(value) == "auto" and name == "micro_batch") and (
                        isinstance(value, bool) or not str(value).isdigit() or not 1 <= int(value) <= 1024):
                    allowed = "auto or " if name == "micro_batch" else ""
                    raise ConfigError(f"{key}={value!r}: must be {allowed}a whole number in 1..1024")
                values[device_type] = value if str(value) == "auto" else int(value)
            setattr(config, name, values)
        return config


def micro_batch_setting(config: PipelineConfig, engine_config: EngineConfig, device_type: str) -> int | None:
    """Frames per generator call: a number, or `auto` — measured with the engine when `engine.backend` is auto
    (None here), else `pinned_micro_batch`."""
    value = config.micro_batch[device_type]
    if value == "auto":
        return None if engine_config.backend == "auto" else config.pinned_micro_batch[device_type]
    return value


def load_pipeline(spec: ModelSpec, engine_config: EngineConfig, device: str | torch.device,
                  micro_batch: int | None = None, progress: bool = False) -> Pipeline:
    """Load checkpoints and avatar, build engines (measure, compile and warm up here), return a ready Pipeline.
    `micro_batch` None: measured with the engine (`auto` backend), else the engine's max batch. `progress`: bars
    for the slow steps, shown only when stderr is a terminal."""
    device = pick_device(device)
    configured_max_batch = engine_config.max_batch
    tune = engine_config.backend == "auto" and not spec.engine_file
    if not tune:
        micro_batch = micro_batch or engine_config.max_batch
    if micro_batch and micro_batch < engine_config.max_batch:  # the engines never see more: build no larger batch
        engine_config = sized(engine_config, micro_batch)
    problem = cache_dir_problem(engine_config.cache_dir)
    if problem and engine_config.backend not in ("eager", "auto"):  # every other engine is a file in the cache
        raise CacheUnusable(f"{spec.name}: {problem}; the {engine_config.backend} engine is built into it "
                            "(engine=eager needs none)")
    if problem and engine_config.backend == "auto":
        log.warning("%s: %s: measuring the eager engines only (the others are files in the cache), and the choice "
                    "is not kept", spec.name, problem)
        engine_config = dataclasses.replace(engine_config, candidates={
            kind: [c for c in candidates if c.startswith("eager/")] for kind, candidates in
            engine_config.candidates.items()})
    t0 = time.perf_counter()
    # each file read once: the networks and the names of their cache entries come from the same bytes (a file
    # replaced during the load cannot file the old weights' engines under the new file's digest)
    with _role("checkpoint"):
        checkpoint = read_checkpoint(spec.checkpoint)
        generator_net = load_generator(spec.checkpoint, spec.variant, spec.asr, data=checkpoint)
    with _role("audio_encoder"):
        encoder_bytes = read_checkpoint(spec.audio_encoder)
        encoder_net = load_audio_encoder(spec.audio_encoder, data=encoder_bytes)
    weights = sum(t.numel() * t.element_size() for net in (generator_net, encoder_net)
                  for t in list(net.parameters()) + list(net.buffers()))
    with _role("avatar"):
        avatar = load_avatar(spec.avatar, spec.variant, spec.sequence, device, spec.feather, progress, spec.compose)
    size = INPUT_SIZE[spec.variant]
    key = {"checkpoint": hashlib.sha256(checkpoint).hexdigest(), "variant": spec.variant, "asr": spec.asr}
    _check_engine_file(spec)
    shapes = [(6, size, size), AUDIO_FEATURE_SHAPE[spec.asr]]
    name = f"{spec.name}/generator"
    encoder_digest = hashlib.sha256(encoder_bytes).hexdigest()
    calibration = None
    if device.type == "cpu":  # int8 engines (OpenVINO, CPU) only: the avatar's frames with speech-like audio
        # through this audio encoder, named by what they are made of (the frames' crops, the encoder's file, the
        # recipe) and computed only to quantize
        n = avatar.frame_count
        ids = [round(i * (n - 1) / max(CALIBRATION_INPUTS - 1, 1)) for i in range(CALIBRATION_INPUTS)]
        calibration = Calibration(
            cache_key(crops=tensor_digest([avatar.templates.index_select(0, avatar.index(ids))]),
                      variant=spec.variant, encoder=encoder_digest, count=CALIBRATION_INPUTS,
                      recipe=CALIBRATION_RECIPE),
            lambda: calibration_inputs(avatar.model_inputs(ids), encoder_net, CALIBRATION_INPUTS))

    if tune:
        generator, decision = tuned_engine(generator_net, shapes, engine_config, device, name, key,
                                           probe=reference_input(avatar, encoder_net),
                                           batches=[micro_batch] if micro_batch else None, progress=progress,
                                           calibration=calibration)
        micro_batch = decision.batch
        engine_config = sized(engine_config, micro_batch)
    else:
        generator = build_engine(generator_net, shapes, engine_config, device, name, key, spec.engine_file, progress,
                                 probe=reference_input(avatar, encoder_net),
                                 calibration=calibration if engine_config.precision == "int8" else None)
    encoder = build_engine(encoder_net, [(1, 80, 16)],
                           encoder_config(engine_config, generator, device, configured_max_batch), device,
                           f"{spec.name}/audio_encoder", {"checkpoint": encoder_digest}, None,
                           progress)
    pipeline = Pipeline(generator, encoder, avatar, device, micro_batch, spec.name, weights, spec.asr)
    pipeline.decision = decision if tune else None
    log.info("model %s loaded on %s in %.1f s (%d avatar frames %dx%d, micro-batch %d)", spec.name, device,
             time.perf_counter() - t0, avatar.frame_count, avatar.frames.shape[3], avatar.frames.shape[2],
             micro_batch)
    return pipeline


CALIBRATION_INPUTS = 32  # int8 quantization: enough to set every activation's range (~20 s on 2 cores)


def encoder_config(config: EngineConfig, generator: Engine, device: torch.device, max_batch: int) -> EngineConfig:
    """The audio encoder's engine settings: the generator's (`config`), except on CPU under `auto`, where it runs
    on the generator's ONNX runtime when one won (faster than eager at every batch), always in fp32 (audio
    features are compared exactly across paths), with the configured `max_batch` rather than the frames'
    micro-batch: its batches are the mel windows of every session (these runtimes take any batch size)."""
    if config.precision == "int8":  # quantized audio features would change every frame's mouth: fp32
        return dataclasses.replace(config, precision="fp32", max_batch=max_batch)
    if config.backend != "auto" or device.type != "cpu":
        return config
    backend = generator.backend if generator.backend in ONNX_RUNTIMES else "eager"
    return dataclasses.replace(config, backend=backend, precision="fp32", max_batch=max_batch)


def reference_input(avatar: Avatar, encoder: audio_features.Encoder) -> list[Tensor]:
    """The accuracy gate's input, as in serving: the avatar's first two frames with the audio encoder's features of
    speech-like sound (~50 ms on 2 CPU cores)."""
    ids = [0, min(1, avatar.frame_count - 1)]
    return [avatar.model_inputs(ids).float(), probe_features(encoder, len(ids)).to(avatar.frames.device)]


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """A device by name, CUDA ones always with their index ("cuda" → "cuda:0"): threads, streams and events
    need the index, and the registry names devices by it."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
