"""`lipsync serve`: the gRPC server. Protocol only: requests are validated (limits), models live in the registry,
batching in the scheduler, the Stream and Converse session logic in `streaming` and `live`, the Go server's API
in `compat`. Also grpc.health.v1, reflection, Prometheus metrics, graceful shutdown."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import __version__, audio, metrics
from ._proto import lipsync_pb2 as pb
from ._proto import lipsync_pb2_grpc as pb_grpc
from ._proto import monolithic_pb2 as mono
from ._proto import monolithic_pb2_grpc as mono_grpc
from .audio import AudioFormat
from .compat import MonolithicService
from .config import ConfigError
from .errors import DeadlineExceeded, InvalidRequest, ResourceExhausted, Unauthenticated, Unavailable, status_of
from .limits import Limits, ServerConfig, model_id as checked_model_id
from .live import LiveSession, admit
from .registry import ModelEntry, Registry
from .scheduler import Priority
from .security import ACCEPTED_HEADER, WORKER_HEADER, AccessInterceptor, Principal, Quotas, Security, \
    SecurityConfigError, principal, refuse
from .streaming import StreamSession

log = logging.getLogger(__name__)
FRAME_MS = 1000.0 / audio.FPS
ENCODINGS = {pb.AUDIO_ENCODING_UNSPECIFIED: "s16le", pb.PCM_S16LE: "s16le", pb.PCM_F32LE: "f32le", pb.WAV: "wav"}
FRAME_KINDS = {"idle": pb.IDLE, "speech": pb.SPEECH, "held": pb.HELD}


class StartupError(RuntimeError):
    """The server cannot start as configured (one line for the operator)."""


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from exceptions to gRPC statuses (errors.RequestError subclasses carry their own)."""
    name, message = status_of(exc)
    return grpc.StatusCode[name], message


def _timings(t: dict[str, float]) -> pb.StageTimings:
    return pb.StageTimings(audio_ms=t.get("audio", 0), queue_ms=t.get("queue", 0), inference_ms=t.get("inference", 0),
                           composite_ms=t.get("composite", 0), encode_ms=t.get("encode", 0),
                           total_ms=t.get("total", 0), batch_size=int(t.get("batch_size", 0)))


def _format(limits: Limits, fmt: pb.AudioFormat, allow_wav: bool) -> AudioFormat:
    return limits.audio_format(ENCODINGS.get(fmt.encoding), fmt.sample_rate, fmt.channels, allow_wav)


@dataclass(eq=False)
class OpenCall:
    """A streaming call in progress, which the server can end from outside with a status: idle too long, or its
    token revoked by a reload."""
    task: asyncio.Task
    who: Principal
    idle_timeout_s: float
    setting: str
    last_message: float = field(default_factory=time.monotonic)
    ended_by: Exception | None = None

    def end(self, reason: Exception) -> None:
        if self.ended_by is None:
            self.ended_by = reason
            self.task.cancel()


async def watched(requests: AsyncIterator, call: OpenCall) -> AsyncIterator:
    """The client's messages, each noted as activity of `call`. Once the client has said all it will (a Stream's
    end_of_audio, or its side closed) silence is no longer idleness: the call is finishing its work."""
    async for message in requests:
        call.last_message = time.monotonic()
        if message.WhichOneof("message") == "end_of_audio":
            call.idle_timeout_s = math.inf
        yield message
    call.idle_timeout_s = math.inf


class Server:
    """State shared by the services: registry, limits, counters."""

    def __init__(self, registry: Registry, limits: Limits):
        self.registry, self.limits = registry, limits
        self.active_streams = 0
        self.live_sessions = 0
        self.quotas = Quotas()  # open streams and sessions per token
        self.accepting = True
        self.health: health.aio.HealthServicer | None = None  # grpc.health.v1, set once serving
        self.security: Security | None = None  # TLS files and tokens, set once serving
        self.worker = ""  # this server's name in response headers (x-lipsync-worker), set once serving
        self.calls: set[OpenCall] = set()  # streaming calls in progress (idle and revocation checks)

    def end_stale_calls(self) -> None:
        """End streaming calls whose client has been silent past their idle timeout, and those whose token a
        reload revoked (called every second, and after SIGHUP)."""
        now = time.monotonic()
        for call in list(self.calls):
            if self.security is not None and not self.security.still_valid(call.who):
                call.end(Unauthenticated(f"token {call.who.name!r} was revoked"))
            elif now - call.last_message > call.idle_timeout_s:
                call.end(DeadlineExceeded(f"no message from the client for {call.idle_timeout_s:g} s "
                                          f"({call.setting})"))

    async def watch_calls(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.end_stale_calls()
            except Exception:  # a bug here must not stop the checks silently: say so and keep checking
                log.exception("checking open streams for idleness and revoked tokens failed")

    @asynccontextmanager
    async def model(self, model_id: str) -> AsyncIterator[tuple[ModelEntry, bool, float]]:
        if not self.accepting:
            raise Unavailable("server is shutting down")
        acquired = await self.registry.acquire(model_id)
        try:
            yield acquired
        finally:
            self.registry.release(acquired[0])

    def decode_audio(self, data: bytes, fmt: AudioFormat) -> torch.Tensor:
        """Request bytes → mono 16 kHz waveform on the CPU (moved to the model's device by the pipeline)."""
        if fmt.encoding == "wav":
            data, fmt = audio.parse_wav(data, "the WAV audio")
        self.limits.check_duration(len(data) // fmt.frame_bytes, fmt.sample_rate)
        return audio.resample(audio.decode_pcm(data, fmt), fmt.sample_rate)

    def record(self, event: str, entry: ModelEntry, frames: int, timings: dict[str, float]) -> None:
        """Stats, metrics and one structured log line per request."""
        entry.record(frames, timings)
        metrics.observe(entry.spec.name, frames, timings)
        stages = {(k if k == "batch_size" else f"{k}_ms"): round(v, 2) for k, v in timings.items()}
        log.info(json.dumps({"event": event, "model": entry.spec.name, "frames": frames, **stages}))

    async def accept(self, context) -> None:
        """Response headers of a Stream/Converse the server has accepted (config valid, model ready): the client
        sends its audio after them, so every refusal before reaches it as a status (client.open_stream)."""
        await context.send_initial_metadata(((WORKER_HEADER, self.worker), (ACCEPTED_HEADER, "1")))

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

    async def check_response_fits(self, entry: ModelEntry, frames: int, quality: int) -> None:
        """Refuse a unary response that cannot be sent, before rendering it (JPEG size from the avatar's own
        frames at this quality, with a margin for the mouth)."""
        height, width = entry.pipeline.avatar.frames.shape[2:]
        if frames * width * height * 3 <= self.limits.max_message_bytes:
            return  # even uncompressed it would fit
        idle = await entry.scheduler.idle_jpegs(quality)
        self.limits.check_response_size(frames, max(len(j) for j in idle) * 1.15 + 32)

    def snapshot(self) -> dict[str, Any]:
        """Numbers for the metrics scrape (taken on the event loop's thread)."""
        r = self.registry
        return {"queue": {n: e.scheduler.queued_frames if e.scheduler else 0 for n, e in r.entries.items()},
                "loaded": {d: len(r.loaded_on(d)) for d in r.devices},
                "memory": {d: r.used_bytes(d) for d in r.devices}}


def _guard(method):
    """Unary RPCs: exceptions become gRPC statuses and are counted; a bad request never escapes as a crash."""
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
            code, message = grpc_status(exc)
            metrics.REQUESTS.labels(name, code.name).inc()
            log_fn = log.error if code == grpc.StatusCode.INTERNAL else log.info
            log_fn("%s failed: %s %s", name, code.name, message, exc_info=code == grpc.StatusCode.INTERNAL)
            await context.abort(code, message)
    wrapper.__name__ = name
    return wrapper


async def _streaming(name: str, body: AsyncIterator, context, call: OpenCall | None = None) -> AsyncIterator:
    """Streaming RPCs: the same status mapping and counting as `_guard`; a call the server ended (`call.end`)
    gets the status of its reason."""
    status = "OK"
    try:
        try:
            async for response in body:
                yield response
        except asyncio.CancelledError:
            if call is None or call.ended_by is None:
                raise
            raise call.ended_by from None
    except asyncio.CancelledError:
        status = "CANCELLED"
        raise
    except Exception as exc:
        code, message = grpc_status(exc)
        status = code.name
        log_fn = log.error if code == grpc.StatusCode.INTERNAL else log.info
        log_fn("%s failed: %s %s", name, code.name, message, exc_info=code == grpc.StatusCode.INTERNAL)
        await context.abort(code, message)
    finally:
        metrics.REQUESTS.labels(name, status).inc()


class LipSyncService(pb_grpc.LipSyncServicer):
    def __init__(self, server: Server):
        self.s = server

    @_guard
    async def Synthesize(self, request: pb.SynthesizeRequest, context, started: float) -> pb.SynthesizeResponse:
        limits = self.s.limits
        quality, start = limits.quality(request.jpeg_quality), limits.start_frame(request.start_frame)
        fmt = _format(limits, request.format, allow_wav=True)
        self.s.registry.entry(checked_model_id(request.model_id))
        wave = await asyncio.to_thread(self.s.decode_audio, request.audio, fmt)
        async with self.s.model(request.model_id) as (entry, loaded_now, load_ms):
            await self.s.check_response_fits(entry, audio.frame_count(wave.numel()), quality)
            t0 = time.perf_counter()
            _, features = await entry.scheduler.features(entry.scheduler.feature_stream(), wave, end=True)
            audio_ms = (time.perf_counter() - t0) * 1e3
            ids = entry.pipeline.avatar.frames_for(start, 0, features.shape[0])
            jpegs, timings = await entry.scheduler.render(features, ids, quality, priority=Priority.BATCH)
        frames = [pb.Frame(index=k, avatar_frame=f, jpeg=j, pts_ms=k * FRAME_MS)
                  for k, (f, j) in enumerate(zip(ids, jpegs))]
        timings["audio"] = audio_ms
        timings["total"] = (time.perf_counter() - started) * 1e3
        response = pb.SynthesizeResponse(frames=frames, timings=_timings(timings), model_loaded=loaded_now,
                                         model_load_ms=load_ms if loaded_now else 0, model_id=request.model_id,
                                         device=entry.device)
        if response.ByteSize() > limits.max_message_bytes:  # the estimate was beaten: say so, do not fail to send
            limits.check_response_size(len(frames), response.ByteSize() / max(len(frames), 1))
        self.s.record("synthesize", entry, len(frames), timings)
        return response

    async def _slot(self, name: str, kind: str, limit: int, gauge, body: Callable[[AsyncIterator], AsyncIterator],
                    request_iterator: AsyncIterator, idle: tuple[float, str], context) -> AsyncIterator:
        """A streaming RPC that holds one of `limit` slots of its kind (streams | sessions) while it runs, and one
        of its token's quota; it ends when its client is silent for `idle` (seconds, setting) or its token is
        revoked."""
        s, who = self.s, principal()
        counter, setting = ("active_streams", "server.max_streams") if kind == "streams" else \
            ("live_sessions", "server.live.max_sessions")
        open_now = getattr(s, counter)
        try:
            if open_now >= limit:
                raise ResourceExhausted(f"{open_now} {kind} are open; the server's limit is {limit} ({setting})")
            s.quotas.take(kind, who)
        except ResourceExhausted as exc:
            metrics.REQUESTS.labels(name, "RESOURCE_EXHAUSTED").inc()
            await refuse(context, True, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), s.limits.config_timeout_s)
        setattr(s, counter, open_now + 1)
        gauge.inc()
        call = OpenCall(asyncio.current_task(), who, *idle)
        s.calls.add(call)
        try:
            async for response in _streaming(name, body(watched(request_iterator, call)), context, call):
                yield response
        finally:
            s.calls.discard(call)
            setattr(s, counter, getattr(s, counter) - 1)
            s.quotas.give_back(kind, who)
            gauge.dec()

    async def Stream(self, request_iterator, context) -> AsyncIterator[pb.StreamResponse]:
        limits = self.s.limits
        async for response in self._slot("Stream", "streams", limits.max_streams, metrics.ACTIVE_STREAMS,
                                         lambda requests: self._stream(requests, context), request_iterator,
                                         (limits.stream_idle_timeout_s, "server.stream_idle_timeout_s"), context):
            yield response

    async def _stream(self, request_iterator, context) -> AsyncIterator[pb.StreamResponse]:
        s, limits = self.s, self.s.limits
        requests = request_iterator.__aiter__()
        cfg = (await _first(requests, "Stream", limits.config_timeout_s)).config
        quality, start = limits.quality(cfg.jpeg_quality), limits.start_frame(cfg.start_frame)
        fmt = _format(limits, cfg.format, allow_wav=False)
        lookahead = cfg.lookahead_frames or audio.LOOKAHEAD
        if not 1 <= lookahead <= audio.LOOKAHEAD:
            raise InvalidRequest(f"lookahead_frames {cfg.lookahead_frames} is outside 0..{audio.LOOKAHEAD}")
        s.registry.entry(checked_model_id(cfg.model_id))

        async def messages() -> AsyncIterator[tuple[str, bytes]]:
            async for message in requests:
                kind = message.WhichOneof("message")
                yield ("audio", message.audio) if kind == "audio" else ("end", b"") if kind == "end_of_audio" \
                    else (kind or "empty", b"")

        async with s.model(cfg.model_id) as (entry, loaded_now, load_ms):
            await s.accept(context)
            session = StreamSession(entry.scheduler, fmt, start, quality, lookahead, limits)
            first_message = True
            try:
                async for chunk in session.run(messages()):
                    loaded = dict(model_loaded=loaded_now and first_message,
                                  model_load_ms=load_ms if loaded_now and first_message else 0)
                    first_message = False
                    if chunk.end:
                        yield pb.StreamResponse(end_of_stream=True, **loaded)
                        break
                    frames = [pb.Frame(index=chunk.first_index + k, avatar_frame=f, jpeg=j,
                                       pts_ms=(chunk.first_index + k) * FRAME_MS)
                              for k, (f, j) in enumerate(zip(chunk.avatar_frames, chunk.jpegs))]
                    s.record("stream_chunk", entry, len(frames), chunk.timings)
                    yield pb.StreamResponse(frames=frames, timings=_timings(chunk.timings), **loaded)
            finally:
                log.info(json.dumps({"event": "stream", "model": cfg.model_id, "frames": session.sent,
                                     "audio_s": round(session.received / fmt.sample_rate, 3)}))

    async def Converse(self, request_iterator, context) -> AsyncIterator[pb.ConverseResponse]:
        live = self.s.limits.live
        async for response in self._slot("Converse", "sessions", live.max_sessions, metrics.LIVE_SESSIONS,
                                         lambda requests: self._converse(requests, context), request_iterator,
                                         (live.idle_timeout_s, "server.live.idle_timeout_s"), context):
            yield response

    async def _converse(self, request_iterator, context) -> AsyncIterator[pb.ConverseResponse]:
        s, limits = self.s, self.s.limits
        requests = request_iterator.__aiter__()
        cfg = (await _first(requests, "Converse", limits.config_timeout_s)).config
        quality, start = limits.quality(cfg.jpeg_quality), limits.start_frame(cfg.start_frame)
        fmt = _format(limits, cfg.format, allow_wav=False)
        s.registry.entry(checked_model_id(cfg.model_id))
        async with s.model(cfg.model_id) as (entry, loaded_now, load_ms):
            scheduler = entry.scheduler
            await scheduler.calibrate()
            idle = await scheduler.idle_jpegs(quality)
            ok, why = admit(scheduler, limits.live)  # admitted and counted with no await between: atomic
            if not ok:
                raise ResourceExhausted(why)
            session = LiveSession(scheduler, limits.live, fmt, cfg.output_sample_rate or fmt.sample_rate, start,
                                  quality, idle)
            try:
                log.info(json.dumps({"event": "live_session_open", "session": session.id, "model": cfg.model_id,
                                     "admitted": why}))
                await s.accept(context)
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
                                raise InvalidRequest("config may only be sent once, as the first message")
                            else:
                                raise InvalidRequest("empty Converse message")
                    except Exception as exc:
                        reader_error.append(exc)
                    finally:
                        session.close()

                reader = asyncio.ensure_future(read())
                try:
                    async for frame, events in session.frames():
                        yield pb.ConverseResponse(frame=pb.LiveFrame(
                            index=frame.index, pts_ms=frame.index * FRAME_MS, avatar_position=frame.avatar_position,
                            avatar_frame=frame.avatar_frame, jpeg=frame.jpeg, audio=frame.audio,
                            kind=FRAME_KINDS[frame.kind], utterance_id=frame.utterance_id,
                            utterance_frame=max(frame.utterance_frame, 0)), events=[_event(e) for e in events])
                        for e in events:
                            if e.kind == "late":
                                metrics.LATE_FRAMES.labels(cfg.model_id).inc()
                            elif e.kind == "started":
                                metrics.FIRST_FRAME_MS.labels(cfg.model_id).observe(e.fields["latency_ms"])
                            elif e.kind == "finished" and e.fields["error"]:
                                metrics.LIVE_FAILURES.labels(cfg.model_id).inc()
                    if reader_error:
                        raise reader_error[0]
                finally:
                    reader.cancel()
                    log.info(json.dumps({"event": "live_session_close", "session": session.id, "model": cfg.model_id,
                                         **session.stats}))
            finally:
                session.close()  # also if the call ended before its frames began

    @_guard
    async def ListModels(self, request, context, started) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.s.model_info(e) for e in self.s.registry.entries.values()])

    @_guard
    async def LoadModel(self, request, context, started) -> pb.LoadModelResponse:
        entry, already, ms = await self.s.registry.load(checked_model_id(request.model_id), request.device or None)
        return pb.LoadModelResponse(model=self.s.model_info(entry), already_loaded=already, load_ms=ms)

    @_guard
    async def UnloadModel(self, request, context, started) -> pb.UnloadModelResponse:
        return pb.UnloadModelResponse(was_loaded=await self.s.registry.unload(checked_model_id(request.model_id)))

    @_guard
    async def GetModelStats(self, request, context, started) -> pb.GetModelStatsResponse:
        entries = [self.s.registry.entry(checked_model_id(request.model_id))] if request.model_id else \
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


async def _first(requests: AsyncIterator, rpc: str, timeout_s: float):
    """The first message of a streaming RPC, which must be its config and come within `timeout_s` (a connection
    that opens a stream and sends nothing must not hold a slot)."""
    try:
        first = await asyncio.wait_for(requests.__anext__(), timeout_s)
    except StopAsyncIteration:
        raise InvalidRequest(f"{rpc} closed before its config message") from None
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"no config message within {timeout_s:g} s of opening the {rpc} "
                               "(server.config_timeout_s)") from None
    if first.WhichOneof("message") != "config":
        raise InvalidRequest(f"the first {rpc} message must be `config`")
    return first


def _event(event) -> pb.ConverseEvent:
    if event.kind == "started":
        return pb.ConverseEvent(started=pb.UtteranceStarted(**event.fields))
    if event.kind == "finished":
        return pb.ConverseEvent(finished=pb.UtteranceFinished(**event.fields))
    return pb.ConverseEvent(late=pb.LateFrame(**event.fields))


# --------------------------------------------------------------------------- running it
def make_registry(cfg: Any) -> Registry:
    from .engines import EngineConfig
    from .pipeline import micro_batch_setting
    from .registry import RegistryConfig

    engine = EngineConfig.from_dict(cfg.engine)
    for device_type in ("cpu", "cuda"):  # read at each load: checked here, at start
        micro_batch_setting(cfg.pipeline, engine, device_type)
    return Registry(dict(cfg.models or {}), RegistryConfig.from_dict(cfg.registry), engine, cfg.pipeline, cfg.device)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(cfg: Any) -> str:
    level = str(cfg.logging.level).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"logging.level={cfg.logging.level!r}: must be one of {', '.join(LOG_LEVELS)}")
    return level


def check_models(registry: Registry, strict: bool) -> dict[str, str]:
    """Validate every declared model's files (nothing is put on a device); broken ones are logged at ERROR and,
    with `strict`, stop the start."""
    problems = registry.check()
    for name, problem in problems.items():
        log.error("model %s is broken: %s", name, problem)
    if problems and strict:
        raise StartupError(f"{len(problems)} declared model(s) are broken ({', '.join(sorted(problems))}); fix them, "
                           "remove them, or set server.strict_models=false to serve the others")
    return problems


def prepare(cfg: Any) -> tuple[ServerConfig, Security, Registry, Limits]:
    """Everything `serve` and `serve --check` read from the composed config, checked once: the server section,
    security files, the registry (models declared, nothing loaded) and the request limits."""
    server_cfg = ServerConfig.from_dict(cfg.server)
    try:
        security = Security.from_config(server_cfg)
    except SecurityConfigError as exc:
        raise StartupError(str(exc)) from None
    registry = make_registry(cfg)
    limits = Limits(server_cfg)
    limits.check_consistency(registry.config.max_queue_frames, registry.config.max_batch)
    return server_cfg, security, registry, limits


async def build(cfg: Any) -> tuple[grpc.aio.Server, Server, int]:
    """Create the registry and a started gRPC server per `cfg` (the composed hydra config)."""
    server_cfg, security, registry, limits = prepare(cfg)
    registry.on_evict = lambda model, reason: metrics.EVICTIONS.labels(model).inc()
    check_models(registry, server_cfg.strict_models)
    state = Server(registry, limits)
    state.security = security
    options = [("grpc.max_send_message_length", limits.max_message_bytes),
               ("grpc.max_receive_message_length", limits.max_receive_bytes),
               ("grpc.max_concurrent_streams", server_cfg.max_connection_streams),
               ("grpc.keepalive_time_ms", int(server_cfg.keepalive_time_s * 1000)),
               ("grpc.keepalive_timeout_ms", int(server_cfg.keepalive_timeout_s * 1000)),
               ("grpc.http2.min_ping_interval_without_data_ms", 5000),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.so_reuseport", 0)]  # a second server on a busy port must fail, not share its connections
    access = AccessInterceptor(security, first_message_s=limits.config_timeout_s)
    server = grpc.aio.server(options=options, interceptors=[access],
                             maximum_concurrent_rpcs=server_cfg.max_concurrent_rpcs)
    pb_grpc.add_LipSyncServicer_to_server(LipSyncService(state), server)
    mono_grpc.add_MonolithicServiceServicer_to_server(MonolithicService(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["LipSync"].full_name,
             mono.DESCRIPTOR.services_by_name["MonolithicService"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"{server_cfg.host}:{server_cfg.port}"
    try:
        port = server.add_secure_port(address, security.tls.credentials()) if security.tls.enabled \
            else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address} (server.host / server.port): the address is in use or "
                           "not available")
    access.worker = state.worker = server_cfg.worker_name or f"{socket.gethostname()}:{port}"
    warning = security.exposure_warning(server_cfg.host)
    if warning:
        log.warning("%s", warning)
    await registry.start()
    await server.start()
    for name in ("", *names[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    state.health = health_servicer
    return server, state, port


async def serve(cfg: Any) -> None:
    server, state, port = await build(cfg)
    security, server_cfg = state.security, state.limits.config
    endpoint = None
    if server_cfg.metrics_port >= 0:
        host = server_cfg.metrics_host
        try:
            endpoint = await metrics.start(server_cfg.metrics_port, host, state.snapshot,
                                           None if security.metrics_open else security.scrape_allows)
        except OSError as exc:
            await server.stop(0)
            raise StartupError(f"cannot serve metrics on {host}:{server_cfg.metrics_port} (server.metrics_host / "
                               f"server.metrics_port): {os.strerror(exc.errno) if exc.errno else exc}") from None
        log.info("Prometheus metrics on http://%s:%d/metrics%s", host, endpoint.port,
                 "" if security.metrics_open else " (bearer token required)")
    tls = state.security.tls
    log.info("lipsync %s (worker %s) serving on %s:%d over %s%s (models: %s)", __version__, state.worker,
             server_cfg.host, port,
             "mutual TLS" if tls.client_ca else "TLS" if tls.enabled else "plaintext",
             ", tokens required" if state.security.tokens else "", ", ".join(state.registry.entries) or "none")
    watcher = asyncio.ensure_future(state.watch_calls())
    print(f"READY port={port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, state)
    await stop.wait()
    await state.health.enter_graceful_shutdown()  # NOT_SERVING: proxies stop sending new work here
    drain_s = server_cfg.drain_s
    if drain_s > 0:
        log.info("shutting down: reported NOT_SERVING; still serving for %.1f s (server.drain_s) while proxies "
                 "notice", drain_s)
        await asyncio.sleep(drain_s)
    log.info("shutting down: refusing new requests, finishing in-flight work (up to %.0f s)",
             server_cfg.shutdown_grace_s)
    state.accepting = False
    await server.stop(server_cfg.shutdown_grace_s)
    watcher.cancel()
    await state.registry.close()
    if endpoint:
        endpoint.close()
    log.info("stopped")


def _reload(state: Server) -> None:
    """SIGHUP: re-read certificates, tokens and the metrics token; open streams keep flowing, except those whose
    token is no longer in the tokens file."""
    log.info("SIGHUP: reloading TLS files and tokens")
    state.security.reload()
    state.end_stale_calls()


def spawn(overrides: list[str], cwd: str | None = None, log_file=None):
    """Start `lipsync serve` in a child process on a free port; returns (process, port) once it is ready."""
    import re
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1", "server.port=0",
                             *overrides], stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=cwd)
    match = re.match(r"READY port=(\d+)", proc.stdout.readline())
    if not match:
        raise RuntimeError(f"lipsync serve failed to start (exit {proc.wait()})")
    return proc, int(match.group(1))


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lipsync.cli import DefaultsFormatter

    p = sub.add_parser("serve", help="run the gRPC server (hydra overrides: server.port=50100 engine=eager …)",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--check", action="store_true", help="validate the configuration and every declared model's "
                                                        "files, then exit (0: all good)")
    p.add_argument("overrides", nargs="*", help="hydra overrides of conf/config.yaml")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import load_config

    try:
        cfg = load_config(args.overrides)
        logging.getLogger().setLevel(log_level(cfg))
        log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        if args.check:
            server_cfg, security, registry, _ = prepare(cfg)
            problems = check_models(registry, strict=False)
            warning = security.exposure_warning(server_cfg.host)
            print(json.dumps({"security": f"warning: {warning}" if warning else "ok",
                              "models": {n: problems.get(n, "ok") for n in registry.entries}}, indent=2))
            return 1 if problems else 0
        asyncio.run(serve(cfg))
    except (StartupError, ConfigError) as exc:
        print(f"lipsync serve: {exc}", file=sys.stderr)
        return 2
    return 0
