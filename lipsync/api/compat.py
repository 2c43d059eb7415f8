"""`monolithic.MonolithicService`: the Go server's API (SPEC §11) on lipsync's registry and scheduler.

Its convention is kept: errors come back as success=false + error text, never as a gRPC status (the same
`api.protocol` wrapper as LipSync's RPCs, which maps, counts and logs them, answers with that response instead).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lipsync import timebase
from lipsync._proto import monolithic_pb2 as mono
from lipsync._proto import monolithic_pb2_grpc as mono_grpc
from lipsync.api import convert
from lipsync.api.limits import model_id as checked_model_id
from lipsync.api.protocol import unary
from lipsync.codec.audio import AudioFormat
from lipsync.errors import InvalidRequest
from lipsync.model import audio_features
from lipsync.runtime.feature_sources import Part, Repeated
from lipsync.runtime.registry import ModelEntry
from lipsync.runtime.scheduler import Priority

if TYPE_CHECKING:
    from lipsync.api.server import Server

log = logging.getLogger(__name__)
MAX_BATCH = 32
GENERATOR_SHAPE = (6, 320, 320)
AUDIO_FEATURE_SIZE = 32 * 16 * 16


def gpu_id(device: str) -> int:
    return int(device.split(":")[1]) if device.startswith("cuda:") else -1


def _floats(data: bytes, count: int, what: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(data) != count * 4:
        raise InvalidRequest(f"{what} has {len(data)} bytes; {count} float32 ({count * 4} bytes, "
                             f"{' x '.join(map(str, shape))}) are needed")
    values = torch.frombuffer(bytearray(data), dtype=torch.float32).view(*shape)
    if not torch.isfinite(values).all():
        raise InvalidRequest(f"{what} contains NaN or Inf")
    return values


class MonolithicService(mono_grpc.MonolithicServiceServicer):
    def __init__(self, server: Server):
        self.s = server

    @unary(name="Monolithic/InferBatchComposite", failure=lambda error, ms: mono.CompositeBatchResponse(
        success=False, error=error, total_time_ms=ms))
    async def InferBatchComposite(self, request: mono.CompositeBatchRequest, context, started: float
                                  ) -> mono.CompositeBatchResponse:
        return await self._infer(request, started)

    async def _infer(self, request: mono.CompositeBatchRequest, started: float) -> mono.CompositeBatchResponse:
        n = request.batch_size
        if not 1 <= n <= MAX_BATCH:
            raise InvalidRequest(f"batch_size {n} is outside 1..{MAX_BATCH}")
        start = self.s.limits.start_frame(request.start_frame_idx)
        self.s.entry(checked_model_id(request.model_id))
        if not request.raw_audio and not request.audio_features:
            raise InvalidRequest("raw_audio (or the deprecated audio_features) is required")
        # decoded and checked off the event loop (the loop runs no tensor operation): the visual inputs alone are up
        # to 32 × 6 × 320 × 320 floats to check for NaN
        visual, wave, fixed = await asyncio.to_thread(self._inputs, request, n)
        async with self.s.model(request.model_id) as (entry, loaded_now, load_ms):
            if visual is not None and entry.spec.variant != "328":
                raise InvalidRequest("visual_frames are 6x320x320 and need a 328-variant model")
            t0 = time.perf_counter()
            if wave is not None:
                _, found = await entry.scheduler.features(entry.scheduler.feature_stream(), wave, end=True)
                features = Part(found, 0, n)
            else:
                features = Repeated(fixed)
            audio_ms = (time.perf_counter() - t0) * 1e3
            ids = entry.pipeline.avatar.frames_for(start, 0, n)
            jpegs, timings = await entry.scheduler.render(features, ids, self.s.limits.default_quality, visual,
                                                          Priority.BATCH)
        timings["audio"] = audio_ms
        timings["total"] = (time.perf_counter() - started) * 1e3
        self.s.record("infer_batch_composite", entry, len(jpegs), timings)
        return mono.CompositeBatchResponse(
            composited_frames=jpegs, inference_time_ms=timings["inference"],
            composite_time_ms=timings["composite"] + timings["encode"], total_time_ms=timings["total"],
            audio_processing_ms=audio_ms, model_loaded=loaded_now, model_load_time_ms=load_ms if loaded_now else 0,
            success=True, gpu_id=gpu_id(entry.device))

    def _inputs(self, request: mono.CompositeBatchRequest, n: int) \
            -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The request's host tensors (on a worker thread): visual inputs, 16 kHz audio padded to `n` frames, or the
        deprecated fixed features; checked."""
        visual = _floats(request.visual_frames, n * int(np.prod(GENERATOR_SHAPE)), "visual_frames",
                         (n, *GENERATOR_SHAPE)) if request.visual_frames else None
        if not request.raw_audio:
            return visual, None, _floats(request.audio_features, AUDIO_FEATURE_SIZE, "audio_features", (1, 32, 16, 16))
        fmt = AudioFormat("f32le", request.sample_rate or timebase.SAMPLE_RATE, 1)
        wave = self.s.decode_audio(request.raw_audio, fmt)
        # Too little audio for batch_size frames: pad with silence at the end (its frames see silence).
        needed = n * timebase.SAMPLES_PER_FRAME
        while audio_features.frame_count(max(wave.numel(), needed)) < n:
            needed += timebase.SAMPLES_PER_FRAME
        if wave.numel() < needed:
            log.info("InferBatchComposite for %s: %d samples of audio make fewer than batch_size=%d frames; padded "
                     "with %d samples of silence (the Go server's convention)", request.model_id[:64], wave.numel(),
                     n, needed - wave.numel())
            wave = torch.cat([wave, wave.new_zeros(needed - wave.numel())])
        return visual, wave, None

    def _info(self, e: ModelEntry) -> dict[str, Any]:
        inference = list(e.latencies.get("inference", []))
        return dict(model_id=e.spec.name, loaded=e.loaded, gpu_id=gpu_id(e.device) if e.loaded else -1,
                    memory_mb=e.memory_bytes // 2**20, request_count=e.requests,
                    avg_inference_ms=float(np.mean(inference)) if inference else 0.0)

    @unary(name="Monolithic/ListModels")
    async def ListModels(self, request, context, started) -> mono.ListModelsResponse:
        return mono.ListModelsResponse(models=[mono.ModelInfo(**self._info(e))
                                               for e in self.s.visible_entries()])

    @unary(name="Monolithic/LoadModel", failure=lambda error, ms: mono.LoadModelResponse(success=False, error=error))
    async def LoadModel(self, request, context, started) -> mono.LoadModelResponse:
        """The Go server's convention: preferred_gpu -1 lets the server choose, N asks for GPU N (0 is GPU 0, and
        also what a client that never set the field sends: on a server without GPUs it means "choose"). A model
        already loaded answers load_time_ms 0: nothing was loaded."""
        self.s.entry(checked_model_id(request.model_id))
        entry, already, ms = await self.s.registry.load(request.model_id,
                                                        self._preferred_device(request.preferred_gpu))
        return mono.LoadModelResponse(success=True, gpu_id=gpu_id(entry.device), load_time_ms=0.0 if already else ms)

    def _preferred_device(self, preferred_gpu: int) -> str | None:
        if preferred_gpu < -1:
            raise InvalidRequest(f"preferred_gpu {preferred_gpu}: -1 (the server chooses) or a GPU index")
        if preferred_gpu == -1 or not any(d.startswith("cuda") for d in self.s.registry.devices):
            return None
        return f"cuda:{preferred_gpu}"

    @unary(name="Monolithic/UnloadModel",
           failure=lambda error, ms: mono.UnloadModelResponse(success=False, error=error))
    async def UnloadModel(self, request, context, started) -> mono.UnloadModelResponse:
        self.s.entry(checked_model_id(request.model_id))
        was_loaded = await self.s.registry.unload(request.model_id)
        return mono.UnloadModelResponse(success=was_loaded, error="" if was_loaded else "model is not loaded")

    @unary(name="Monolithic/GetModelStats")
    async def GetModelStats(self, request, context, started) -> mono.GetModelStatsResponse:
        out = []
        for e in self.s.visible_entries():
            total = int(sum(e.latencies.get("inference", [])))
            out.append(mono.ModelStats(**self._info(e), total_inference_ms=total,
                                       last_used_timestamp=convert.unix_ms(e.last_used) // 1000))
        return mono.GetModelStatsResponse(models=out)

    @unary(name="Monolithic/Health")
    async def Health(self, request, context, started) -> mono.HealthResponse:
        r = self.s.registry
        gpus = [d for d in r.devices if d.startswith("cuda")]
        return mono.HealthResponse(healthy=self.s.accepting, loaded_models=sum(e.loaded for e in r.entries.values()),
                                   max_models=r.config.max_models * len(r.devices),
                                   gpu_ids=[gpu_id(d) for d in gpus],
                                   gpu_memory_used_gb=[r.used_bytes(d) / 2**30 for d in gpus])
