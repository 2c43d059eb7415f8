"""`lipsync serve`: the gRPC server (lipsync.v1.LipSync + monolithic.MonolithicService on one port), with
grpc.health.v1, reflection, Prometheus metrics and graceful shutdown. Protocol only: models live in the
registry, batching in the scheduler."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import __version__, audio, metrics
from ._proto import lipsync_pb2 as pb
from ._proto import lipsync_pb2_grpc as pb_grpc
from ._proto import monolithic_pb2 as mono
from ._proto import monolithic_pb2_grpc as mono_grpc
from .audio import AudioFormat, AudioFormatError, FeatureStream, StreamResampler
from .jpeg import MAX_QUALITY, MIN_QUALITY
from .live import LiveConfig, LiveSession, admit
from .registry import CapacityError, ModelBusy, ModelEntry, ModelFilesError, Registry, UnknownModel
from .scheduler import Priority, QueueFull

log = logging.getLogger(__name__)
FRAME_MS = 1000.0 / audio.FPS
COMPAT_MAX_BATCH = 32
GENERATOR_SHAPE = (6, 320, 320)
AUDIO_FEATURE_SIZE = 32 * 16 * 16


class RequestError(Exception):
    """A request the server refuses, with its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to its SPEC §9 status and message."""
    if isinstance(exc, RequestError):
        return exc.code, str(exc)
    if isinstance(exc, (AudioFormatError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, (ModelFilesError, ModelBusy)):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (QueueFull, CapacityError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class Limits:
    """Request limits from `server` config."""

    def __init__(self, cfg: Any):
        self.live = LiveConfig.from_dict(cfg.get("live"))
        self.max_audio_s = float(cfg.max_audio_seconds)
        self.max_streams = int(cfg.max_streams)
        self.default_quality = int(cfg.jpeg_quality)
        self.max_start_frame = int(cfg.max_start_frame)

    def quality(self, q: int) -> int:
        if q == 0:
            return self.default_quality
        if not MIN_QUALITY <= q <= MAX_QUALITY:
            raise ValueError(f"jpeg_quality {q} is outside {MIN_QUALITY}..{MAX_QUALITY}")
        return q

    def start_frame(self, n: int) -> int:
        if not 0 <= n <= self.max_start_frame:
            raise ValueError(f"start_frame {n} is outside 0..{self.max_start_frame}")
        return n

    def audio_format(self, fmt: pb.AudioFormat, allow_wav: bool) -> AudioFormat:
        encoding = {pb.AUDIO_ENCODING_UNSPECIFIED: "s16le", pb.PCM_S16LE: "s16le", pb.PCM_F32LE: "f32le"}.get(
            fmt.encoding)
        if fmt.encoding == pb.WAV:
            if not allow_wav:
                raise ValueError("WAV is not accepted for streams; send PCM_S16LE or PCM_F32LE")
            encoding = "wav"
        if encoding is None:
            raise ValueError(f"unknown audio encoding {fmt.encoding}")
        result = AudioFormat(encoding, fmt.sample_rate or audio.SAMPLE_RATE, fmt.channels or 1)
        if encoding != "wav":
            result.validate()
        return result

    def check_duration(self, samples: int, rate: int) -> None:
        if samples / rate > self.max_audio_s:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"audio is {samples / rate:.1f} s; the limit per request is {self.max_audio_s:g} s")


def decode_request_audio(data: bytes, fmt: AudioFormat, limits: Limits) -> torch.Tensor:
    """Request bytes → mono 16 kHz waveform on the CPU (moved to the model's device by the pipeline)."""
    if fmt.encoding == "wav":
        data, fmt = audio.parse_wav(data, "the WAV audio")
    limits.check_duration(len(data) // max(fmt.frame_bytes, 1), fmt.sample_rate)
    return audio.resample(audio.decode_pcm(data, fmt), fmt.sample_rate)


def log_request(event: str, model: str, frames: int, timings: dict[str, float]) -> None:
    """One structured log line per request: stage timings in ms and the batch size."""
    stages = {(k if k == "batch_size" else f"{k}_ms"): round(v, 2) for k, v in timings.items()}
    log.info(json.dumps({"event": event, "model": model, "frames": frames, **stages}))


def _timings(t: dict[str, float]) -> pb.StageTimings:
    return pb.StageTimings(audio_ms=t.get("audio", 0), queue_ms=t.get("queue", 0), inference_ms=t.get("inference", 0),
                           composite_ms=t.get("composite", 0), encode_ms=t.get("encode", 0),
                           total_ms=t.get("total", 0), batch_size=int(t.get("batch_size", 0)))


class Server:
    """Shared state of both services: registry, limits, counters."""

    def __init__(self, registry: Registry, limits: Limits):
        self.registry, self.limits = registry, limits
        self.active_streams = 0
        self.live_sessions = 0
        self.accepting = True
        self.health: health.aio.HealthServicer | None = None  # grpc.health.v1, set once serving

    @asynccontextmanager
    async def model(self, model_id: str) -> AsyncIterator[tuple[ModelEntry, bool, float]]:
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        acquired = await self.registry.acquire(model_id)
        try:
            yield acquired
        finally:
            self.registry.release(acquired[0])

    async def render(self, entry: ModelEntry, features: torch.Tensor, start_frame: int, first_index: int,
                     quality: int, visual: torch.Tensor | None = None, priority: Priority = Priority.BATCH
                     ) -> tuple[list[pb.Frame], dict[str, float]]:
        assert entry.pipeline is not None and entry.scheduler is not None
        count = features.shape[0]
        ids = entry.pipeline.avatar.frames_for(start_frame, first_index, count)
        jpegs, timings = await entry.scheduler.submit(features, ids, quality, visual, priority)
        frames = [pb.Frame(index=first_index + k, avatar_frame=f, jpeg=j, pts_ms=(first_index + k) * FRAME_MS)
                  for k, (f, j) in enumerate(zip(ids, jpegs))]
        return frames, timings

    def model_info(self, e: ModelEntry) -> pb.ModelInfo:
        return pb.ModelInfo(model_id=e.spec.name, loaded=e.loaded, device=e.device, memory_bytes=e.memory_bytes,
                            requests=e.requests, frames=e.frames, load_ms=e.load_ms,
                            last_used_unix_ms=int((time.time() - (time.monotonic() - e.last_used)) * 1e3)
                            if e.last_used else 0, pinned=e.pinned,
                            backend=e.pipeline.generator.backend if e.pipeline else "", variant=e.spec.variant,
                            avatar_frames=e.pipeline.avatar.frame_count if e.pipeline else 0, in_flight=e.in_flight)

    def devices(self) -> list[pb.DeviceInfo]:
        out = []
        for d in self.registry.devices:
            total = torch.cuda.get_device_properties(d).total_memory if d.startswith("cuda") else 0
            name = torch.cuda.get_device_name(d) if d.startswith("cuda") else "cpu"
            out.append(pb.DeviceInfo(device=d, name=name, memory_used_bytes=self.registry.used_bytes(d),
                                     memory_budget_bytes=int(self.registry.config.memory_budget_mb * 2**20),
                                     memory_total_bytes=total, loaded_models=len(self.registry.loaded_on(d))))
        return out


def _guard(method):
    """Turn exceptions into gRPC statuses and count them; a bad request never escapes as a crash."""
    name = method.__name__

    async def wrapper(self, request, context):
        started = time.perf_counter()
        try:
            result = await method(self, request, context, started)
            metrics.REQUESTS.labels(name, "OK").inc()
            return result
        except asyncio.CancelledError:
            metrics.REQUESTS.labels(name, "CANCELLED").inc()
            raise
        except Exception as exc:
            code, message = status_for(exc)
            metrics.REQUESTS.labels(name, code.name).inc()
            log_fn = log.error if code == grpc.StatusCode.INTERNAL else log.info
            log_fn("%s failed: %s %s", name, code.name, message, exc_info=code == grpc.StatusCode.INTERNAL)
            await context.abort(code, message)
    wrapper.__name__ = name
    return wrapper


class LipSyncService(pb_grpc.LipSyncServicer):
    def __init__(self, server: Server):
        self.s = server

    @_guard
    async def Synthesize(self, request: pb.SynthesizeRequest, context, started: float) -> pb.SynthesizeResponse:
        limits = self.s.limits
        quality, start = limits.quality(request.jpeg_quality), limits.start_frame(request.start_frame)
        fmt = limits.audio_format(request.format, allow_wav=True)
        self.s.registry.entry(request.model_id)
        wave = await asyncio.to_thread(decode_request_audio, request.audio, fmt, limits)
        async with self.s.model(request.model_id) as (entry, loaded_now, load_ms):
            t0 = time.perf_counter()
            _, features = await entry.scheduler.features(FeatureStream(None, entry.pipeline.device), wave, end=True)
            audio_ms = (time.perf_counter() - t0) * 1e3
            frames, timings = await self.s.render(entry, features, start, 0, quality)
        timings["audio"] = audio_ms
        timings["total"] = (time.perf_counter() - started) * 1e3
        entry.record(len(frames), timings)
        metrics.observe(request.model_id, len(frames), timings)
        log_request("synthesize", request.model_id, len(frames), timings)
        return pb.SynthesizeResponse(frames=frames, timings=_timings(timings), model_loaded=loaded_now,
                                     model_load_ms=load_ms if loaded_now else 0, model_id=request.model_id,
                                     device=entry.device)

    async def Stream(self, request_iterator, context) -> AsyncIterator[pb.StreamResponse]:
        s = self.s
        if s.active_streams >= s.limits.max_streams:
            metrics.REQUESTS.labels("Stream", "RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{s.active_streams} streams are open; the limit is {s.limits.max_streams}")
        s.active_streams += 1
        metrics.ACTIVE_STREAMS.inc()
        status = "OK"
        try:
            async for response in self._stream(request_iterator, context):
                yield response
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            code, message = status_for(exc)
            status = code.name
            log.info("Stream failed: %s %s", code.name, message, exc_info=code == grpc.StatusCode.INTERNAL)
            await context.abort(code, message)
        finally:
            s.active_streams -= 1
            metrics.ACTIVE_STREAMS.dec()
            metrics.REQUESTS.labels("Stream", status).inc()

    async def _stream(self, request_iterator, context) -> AsyncIterator[pb.StreamResponse]:
        s, limits = self.s, self.s.limits
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            raise ValueError("stream closed before its config message") from None
        if first.WhichOneof("message") != "config":
            raise ValueError("the first stream message must be `config`")
        cfg = first.config
        quality, start = limits.quality(cfg.jpeg_quality), limits.start_frame(cfg.start_frame)
        fmt = limits.audio_format(cfg.format, allow_wav=False)
        lookahead = cfg.lookahead_frames or audio.LOOKAHEAD
        if not 1 <= lookahead <= audio.LOOKAHEAD:
            raise ValueError(f"lookahead_frames {cfg.lookahead_frames} is outside 0..{audio.LOOKAHEAD}")
        s.registry.entry(cfg.model_id)
        async with s.model(cfg.model_id) as (entry, loaded_now, load_ms):
            features = FeatureStream(None, entry.pipeline.device, lookahead)
            resampler = StreamResampler(fmt.sample_rate)
            # (render future, audio ms, arrival time) in frame order; None = end of audio; or an error
            pending: asyncio.Queue = asyncio.Queue()
            reader_errors: list[Exception] = []
            received = 0

            async def read() -> None:
                nonlocal received
                ended = False
                try:
                    async for message in requests:
                        kind = message.WhichOneof("message")
                        if ended:
                            raise ValueError("audio received after end_of_audio")
                        t0 = time.perf_counter()
                        if kind == "audio":
                            received += len(message.audio) // fmt.frame_bytes
                            limits.check_duration(received, fmt.sample_rate)
                            wave = await asyncio.to_thread(_decode_chunk, message.audio, fmt, resampler)
                            step = await entry.scheduler.features(features, wave, end=False)
                        elif kind == "end_of_audio":
                            ended = True
                            step = await entry.scheduler.features(features, resampler.finish(), end=True)
                        else:
                            raise ValueError("config may only be sent once, as the first message")
                        first_index, feats = step
                        if feats.shape[0]:
                            audio_ms = (time.perf_counter() - t0) * 1e3
                            pending.put_nowait((asyncio.ensure_future(
                                s.render(entry, feats, start, first_index, quality, priority=Priority.STREAM)),
                                audio_ms, t0))
                        if ended:
                            pending.put_nowait(None)
                    if not ended:  # the client half-closed without end_of_audio: no more frames
                        pending.put_nowait(asyncio.CancelledError())
                except Exception as exc:
                    reader_errors.append(exc)
                    pending.put_nowait(exc)

            reader = asyncio.ensure_future(read())
            first_message = True
            frames_sent = 0
            try:
                while True:
                    item = await pending.get()
                    if item is None:
                        await asyncio.sleep(0)
                        if reader_errors:  # e.g. audio after end_of_audio
                            raise reader_errors[0]
                        yield pb.StreamResponse(end_of_stream=True, model_loaded=loaded_now and first_message,
                                                model_load_ms=load_ms if loaded_now and first_message else 0)
                        break
                    if isinstance(item, asyncio.CancelledError):
                        break
                    if isinstance(item, BaseException):
                        raise item
                    render, audio_ms, arrived = item
                    frames, timings = await render
                    timings["audio"] = audio_ms
                    timings["total"] = (time.perf_counter() - arrived) * 1e3
                    frames_sent += len(frames)
                    entry.record(len(frames), timings)
                    metrics.observe(cfg.model_id, len(frames), timings)
                    yield pb.StreamResponse(frames=frames, timings=_timings(timings),
                                            model_loaded=loaded_now and first_message,
                                            model_load_ms=load_ms if loaded_now and first_message else 0)
                    first_message = False
            finally:
                reader.cancel()
                while not pending.empty():
                    item = pending.get_nowait()
                    if isinstance(item, tuple):
                        item[0].cancel()
                log.info(json.dumps({"event": "stream", "model": cfg.model_id, "frames": frames_sent,
                                     "audio_s": round(received / fmt.sample_rate, 3)}))

    async def Converse(self, request_iterator, context) -> AsyncIterator[pb.ConverseResponse]:
        s = self.s
        status = "OK"
        if s.live_sessions >= s.limits.live.max_sessions:
            metrics.REQUESTS.labels("Converse", "RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{s.live_sessions} live sessions are open; "
                                f"the limit is server.live.max_sessions={s.limits.live.max_sessions}")
        s.live_sessions += 1
        metrics.LIVE_SESSIONS.inc()
        try:
            async for response in self._converse(request_iterator):
                yield response
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as exc:
            code, message = status_for(exc)
            status = code.name
            log.info("Converse failed: %s %s", code.name, message, exc_info=code == grpc.StatusCode.INTERNAL)
            await context.abort(code, message)
        finally:
            s.live_sessions -= 1
            metrics.LIVE_SESSIONS.dec()
            metrics.REQUESTS.labels("Converse", status).inc()

    async def _converse(self, request_iterator) -> AsyncIterator[pb.ConverseResponse]:
        s, limits = self.s, self.s.limits
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            raise ValueError("live session closed before its config message") from None
        if first.WhichOneof("message") != "config":
            raise ValueError("the first Converse message must be `config`")
        cfg = first.config
        quality, start = limits.quality(cfg.jpeg_quality), limits.start_frame(cfg.start_frame)
        fmt = limits.audio_format(cfg.format, allow_wav=False)
        s.registry.entry(cfg.model_id)
        async with s.model(cfg.model_id) as (entry, loaded_now, load_ms):
            scheduler = entry.scheduler
            await scheduler.calibrate()
            ok, why = admit(scheduler, limits.live)
            if not ok:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            session = LiveSession(scheduler, limits.live, fmt, cfg.output_sample_rate or fmt.sample_rate, start,
                                  quality, await scheduler.idle_jpegs(quality))
            log.info(json.dumps({"event": "live_session_open", "session": session.id, "model": cfg.model_id,
                                 "admitted": why}))
            yield pb.ConverseResponse(session=pb.SessionInfo(
                session_id=session.id, fps=audio.FPS, frame_interval_ms=session.interval * 1e3,
                output_sample_rate=session.out_rate, samples_per_frame=session.samples_per_frame,
                avatar_frames=session.avatar.frame_count, device=entry.device, model_loaded=loaded_now,
                model_load_ms=load_ms if loaded_now else 0))
            reader_error: list[BaseException] = []

            async def read() -> None:
                try:
                    async for message in requests:
                        kind = message.WhichOneof("message")
                        if kind == "audio":
                            session.audio(message.audio)
                        elif kind == "start_utterance":
                            session.start_utterance(message.start_utterance.utterance_id[:256],
                                                    message.start_utterance.interrupt)
                        elif kind == "end_utterance":
                            session.end_utterance()
                        elif kind == "interrupt":
                            session.interrupt()
                        elif kind == "config":
                            raise ValueError("config may only be sent once, as the first message")
                        else:
                            raise ValueError("empty Converse message")
                except Exception as exc:
                    reader_error.append(exc)
                finally:
                    session.close()

            reader = asyncio.ensure_future(read())
            late_total = 0
            try:
                async for frame, events in session.frames():
                    late_total += sum(e.kind == "late" for e in events)
                    yield pb.ConverseResponse(frame=pb.LiveFrame(
                        index=frame.index, pts_ms=frame.index * FRAME_MS, avatar_position=frame.avatar_position,
                        avatar_frame=frame.avatar_frame, jpeg=frame.jpeg, audio=frame.audio,
                        kind=_FRAME_KINDS[frame.kind], utterance_id=frame.utterance_id,
                        utterance_frame=max(frame.utterance_frame, 0)), events=[_event(e) for e in events])
                    if events:
                        _record_live_events(cfg.model_id, events)
                if reader_error:
                    raise reader_error[0]
            finally:
                reader.cancel()
                log.info(json.dumps({"event": "live_session_close", "session": session.id, "model": cfg.model_id,
                                     **session.stats, "late": late_total}))

    @_guard
    async def ListModels(self, request, context, started) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.s.model_info(e) for e in self.s.registry.entries.values()])

    @_guard
    async def LoadModel(self, request, context, started) -> pb.LoadModelResponse:
        entry, already, ms = await self.s.registry.load(request.model_id, request.device or None)
        return pb.LoadModelResponse(model=self.s.model_info(entry), already_loaded=already, load_ms=ms)

    @_guard
    async def UnloadModel(self, request, context, started) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(was_loaded=await self.s.registry.unload(request.model_id))

    @_guard
    async def GetModelStats(self, request, context, started) -> pb.GetModelStatsResponse:
        entries = [self.s.registry.entry(request.model_id)] if request.model_id else \
            list(self.s.registry.entries.values())
        out = []
        for e in entries:
            stages = {k: pb.LatencySummary(mean_ms=v["mean"], p50_ms=v["p50"], p95_ms=v["p95"], count=v["count"])
                      for k, v in e.latency_summary().items()}
            out.append(pb.ModelStats(info=self.s.model_info(e), stages=stages))
        return pb.GetModelStatsResponse(models=out)

    @_guard
    async def Health(self, request, context, started) -> pb.HealthResponse:
        r = self.s.registry
        return pb.HealthResponse(healthy=self.s.accepting, loaded_models=sum(e.loaded for e in r.entries.values()),
                                 max_models=r.config.max_models * len(r.devices), devices=self.s.devices(),
                                 version=__version__, active_streams=self.s.active_streams,
                                 queued_frames=r.queued_frames)


_FRAME_KINDS = {"idle": pb.IDLE, "speech": pb.SPEECH, "held": pb.HELD}


def _event(event) -> pb.ConverseEvent:
    if event.kind == "started":
        return pb.ConverseEvent(started=pb.UtteranceStarted(**event.fields))
    if event.kind == "finished":
        return pb.ConverseEvent(finished=pb.UtteranceFinished(**event.fields))
    return pb.ConverseEvent(late=pb.LateFrame(**event.fields))


def _record_live_events(model: str, events) -> None:
    for e in events:
        if e.kind == "late":
            metrics.LATE_FRAMES.labels(model).inc()
        elif e.kind == "started":
            metrics.FIRST_FRAME_MS.labels(model).observe(e.fields["latency_ms"])


def _decode_chunk(data: bytes, fmt: AudioFormat, resampler: StreamResampler) -> torch.Tensor:
    """One stream chunk → 16 kHz samples (CPU work, kept off the event loop)."""
    return resampler.push(audio.decode_pcm(data, fmt, allow_empty=True))


def _gpu_id(device: str) -> int:
    return int(device.split(":")[1]) if device.startswith("cuda:") else -1


class MonolithicService(mono_grpc.MonolithicServiceServicer):
    """The Go server's API; errors are reported as success=false + error, its convention."""

    def __init__(self, server: Server):
        self.s = server

    async def InferBatchComposite(self, request: mono.CompositeBatchRequest, context) -> mono.CompositeBatchResponse:
        started = time.perf_counter()
        try:
            response = await self._infer(request, started)
            metrics.REQUESTS.labels("InferBatchComposite", "OK").inc()
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, message = status_for(exc)
            metrics.REQUESTS.labels("InferBatchComposite", code.name).inc()
            log.info("InferBatchComposite failed: %s", message, exc_info=code == grpc.StatusCode.INTERNAL)
            return mono.CompositeBatchResponse(success=False, error=message,
                                               total_time_ms=(time.perf_counter() - started) * 1e3)

    async def _infer(self, request: mono.CompositeBatchRequest, started: float) -> mono.CompositeBatchResponse:
        n = request.batch_size
        if not 1 <= n <= COMPAT_MAX_BATCH:
            raise ValueError(f"batch_size {n} is outside 1..{COMPAT_MAX_BATCH}")
        start = self.s.limits.start_frame(request.start_frame_idx)
        self.s.registry.entry(request.model_id)
        visual = None
        if request.visual_frames:
            expected = n * int(np.prod(GENERATOR_SHAPE)) * 4
            if len(request.visual_frames) != expected:
                raise ValueError(f"visual_frames has {len(request.visual_frames)} bytes; batch_size {n} needs "
                                 f"{expected} ({n} x 6x320x320 float32)")
            visual = torch.frombuffer(bytearray(request.visual_frames), dtype=torch.float32).view(n, *GENERATOR_SHAPE)
            if not torch.isfinite(visual).all():
                raise ValueError("visual_frames contains NaN or Inf")
        wave = None
        if request.raw_audio:
            fmt = AudioFormat("f32le", request.sample_rate or audio.SAMPLE_RATE, 1)
            wave = await asyncio.to_thread(decode_request_audio, request.raw_audio, fmt, self.s.limits)
            # Too little audio for batch_size frames: pad with silence at the end (its frames see silence).
            needed = n * audio.SAMPLES_PER_FRAME
            while audio.frame_count(max(wave.numel(), needed)) < n:
                needed += audio.SAMPLES_PER_FRAME
            if wave.numel() < needed:
                wave = torch.cat([wave, wave.new_zeros(needed - wave.numel())])
        elif request.audio_features:
            if len(request.audio_features) != AUDIO_FEATURE_SIZE * 4:
                raise ValueError(f"audio_features must be {AUDIO_FEATURE_SIZE} float32 "
                                 f"({AUDIO_FEATURE_SIZE * 4} bytes), got {len(request.audio_features)} bytes")
            fixed = torch.frombuffer(bytearray(request.audio_features), dtype=torch.float32).view(1, 32, 16, 16)
            if not torch.isfinite(fixed).all():
                raise ValueError("audio_features contains NaN or Inf")
        else:
            raise ValueError("raw_audio (or the deprecated audio_features) is required")
        async with self.s.model(request.model_id) as (entry, loaded_now, load_ms):
            if visual is not None and entry.spec.variant != "328":
                raise ValueError("visual_frames are 6x320x320 and need a 328-variant model")
            t0 = time.perf_counter()
            if wave is not None:
                stream = FeatureStream(None, entry.pipeline.device)
                features = (await entry.scheduler.features(stream, wave, end=True))[1][:n]
            else:
                features = fixed.expand(n, -1, -1, -1).to(entry.pipeline.device)
            audio_ms = (time.perf_counter() - t0) * 1e3
            if visual is not None:
                visual = visual.to(entry.pipeline.device)
            frames, timings = await self.s.render(entry, features, start, 0, self.s.limits.default_quality, visual)
        timings["audio"] = audio_ms
        timings["total"] = (time.perf_counter() - started) * 1e3
        entry.record(len(frames), timings)
        metrics.observe(request.model_id, len(frames), timings)
        log_request("infer_batch_composite", request.model_id, len(frames), timings)
        return mono.CompositeBatchResponse(
            composited_frames=[f.jpeg for f in frames], inference_time_ms=timings["inference"],
            composite_time_ms=timings["composite"] + timings["encode"], total_time_ms=timings["total"],
            audio_processing_ms=audio_ms, model_loaded=loaded_now, model_load_time_ms=load_ms if loaded_now else 0,
            success=True, gpu_id=_gpu_id(entry.device))

    def _info(self, e: ModelEntry) -> dict[str, Any]:
        inference = list(e.latencies.get("inference", []))
        return dict(model_id=e.spec.name, loaded=e.loaded, gpu_id=_gpu_id(e.device) if e.loaded else -1,
                    memory_mb=e.memory_bytes // 2**20, request_count=e.requests,
                    avg_inference_ms=float(np.mean(inference)) if inference else 0.0)

    async def ListModels(self, request, context) -> mono.ListModelsResponse:
        return mono.ListModelsResponse(models=[mono.ModelInfo(**self._info(e))
                                               for e in self.s.registry.entries.values()])

    async def LoadModel(self, request, context) -> mono.LoadModelResponse:
        try:
            device = f"cuda:{request.preferred_gpu}" if request.preferred_gpu > 0 else None
            entry, _, ms = await self.s.registry.load(request.model_id, device)
            return mono.LoadModelResponse(success=True, gpu_id=_gpu_id(entry.device), load_time_ms=ms)
        except Exception as exc:
            return mono.LoadModelResponse(success=False, error=status_for(exc)[1])

    async def UnloadModel(self, request, context) -> mono.UnloadModelResponse:
        try:
            was_loaded = await self.s.registry.unload(request.model_id)
            return mono.UnloadModelResponse(success=was_loaded, error="" if was_loaded else "model is not loaded")
        except Exception as exc:
            return mono.UnloadModelResponse(success=False, error=status_for(exc)[1])

    async def GetModelStats(self, request, context) -> mono.GetModelStatsResponse:
        out = []
        for e in self.s.registry.entries.values():
            info = self._info(e)
            total = int(sum(e.latencies.get("inference", [])))
            last = int((time.time() - (time.monotonic() - e.last_used))) if e.last_used else 0
            out.append(mono.ModelStats(**info, total_inference_ms=total, last_used_timestamp=last))
        return mono.GetModelStatsResponse(models=out)

    async def Health(self, request, context) -> mono.HealthResponse:
        r = self.s.registry
        gpus = [d for d in r.devices if d.startswith("cuda")]
        return mono.HealthResponse(healthy=self.s.accepting, loaded_models=sum(e.loaded for e in r.entries.values()),
                                   max_models=r.config.max_models * len(r.devices),
                                   gpu_ids=[_gpu_id(d) for d in gpus],
                                   gpu_memory_used_gb=[r.used_bytes(d) / 2**30 for d in gpus])


# --------------------------------------------------------------------------- running it
async def build(cfg: Any) -> tuple[grpc.aio.Server, Server, int]:
    """Create the registry and a started gRPC server per `cfg` (the composed hydra config)."""
    from .engines import EngineConfig
    from .registry import RegistryConfig

    registry = Registry(dict(cfg.models or {}), RegistryConfig.from_dict(cfg.registry),
                        EngineConfig.from_dict(cfg.engine), dict(cfg.pipeline.micro_batch), cfg.device)
    registry.on_evict = lambda model, reason: metrics.EVICTIONS.labels(model).inc()
    state = Server(registry, Limits(cfg.server))
    max_bytes = int(cfg.server.max_message_mb * 2**20)
    options = [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes),
               ("grpc.keepalive_time_ms", int(cfg.server.keepalive_time_s * 1000)),
               ("grpc.keepalive_timeout_ms", int(cfg.server.keepalive_timeout_s * 1000)),
               ("grpc.http2.min_ping_interval_without_data_ms", 5000),
               ("grpc.keepalive_permit_without_calls", 1)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_LipSyncServicer_to_server(LipSyncService(state), server)
    mono_grpc.add_MonolithicServiceServicer_to_server(MonolithicService(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["LipSync"].full_name,
             mono.DESCRIPTOR.services_by_name["MonolithicService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{cfg.server.host}:{cfg.server.port}")
    if port == 0:
        raise RuntimeError(f"cannot listen on {cfg.server.host}:{cfg.server.port}")
    await registry.start()
    await server.start()
    for name in ("", *names[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    state.health = health_servicer
    return server, state, port


async def serve(cfg: Any) -> None:
    server, state, port = await build(cfg)
    if cfg.server.metrics_port >= 0:
        bound = metrics.start(cfg.server.metrics_port, cfg.server.host, state)
        log.info("Prometheus metrics on http://%s:%d/metrics", cfg.server.host, bound)
    log.info("lipsync %s serving on %s:%d (models: %s)", __version__, cfg.server.host, port,
             ", ".join(state.registry.entries) or "none")
    print(f"READY port={port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: refusing new requests, finishing in-flight work (up to %.0f s)",
             cfg.server.shutdown_grace_s)
    state.accepting = False
    await state.health.enter_graceful_shutdown()
    await server.stop(cfg.server.shutdown_grace_s)
    await state.registry.close()
    log.info("stopped")


def spawn(overrides: list[str], cwd: str | None = None, log_file=None):
    """Start `lipsync serve` in a child process on a free port; returns (process, port) once it is ready."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1", "server.port=0",
                             *overrides], stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=cwd)
    match = re.match(r"READY port=(\d+)", proc.stdout.readline())
    if not match:
        raise RuntimeError(f"lipsync serve failed to start (exit {proc.wait()})")
    return proc, int(match.group(1))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (hydra overrides: server.port=50100 engine=eager …)")
    p.add_argument("overrides", nargs="*", help="hydra overrides of conf/config.yaml")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import load_config

    cfg = load_config(args.overrides)
    logging.getLogger().setLevel(cfg.logging.level)
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    asyncio.run(serve(cfg))
    return 0
