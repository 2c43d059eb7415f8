"""`lipsync serve`'s gRPC server: the state both services share (registry, limits, open calls), and building,
running and stopping it (grpc.health.v1, reflection, the Prometheus endpoint, SIGHUP reloads, graceful shutdown).
The RPCs are in `api.service` and `api.compat`, their one wrapper in `api.protocol`."""
from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import signal
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc
import torch

from lipsync import STARTED, __version__
from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync._proto import monolithic_pb2 as mono
from lipsync._proto import monolithic_pb2_grpc as mono_grpc
from lipsync.api import metrics
from lipsync.api.compat import MonolithicService
from lipsync.api.headers import ACCEPTED_HEADER, WORKER_HEADER
from lipsync.api.limits import Limits, ServerConfig
from lipsync.api.protocol import OpenCall, PreSerialized
from lipsync.api.security import AccessInterceptor, Principal, Quotas, Security, SecurityConfigError, principal
from lipsync.api.service import PRESERIALIZED, LipSyncService
from lipsync.codec import audio
from lipsync.codec.audio import AudioFormat
from lipsync.config import Section, section, setting, settings
from lipsync.errors import DeadlineExceeded, ResourceExhausted, Unauthenticated, Unavailable
from lipsync.logs import TEXT_FORMAT
from lipsync.model.engines import EngineConfig, cache_dir_problem
from lipsync.model.pipeline import PipelineConfig
from lipsync.runtime.registry import ModelEntry, Registry, RegistryConfig, UnknownModel
from lipsync.threads import named_pool

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The server cannot start as configured (one line for the operator)."""


class Server:
    """State shared by the services: registry, limits, counters."""

    def __init__(self, registry: Registry, limits: Limits):
        self.registry, self.limits = registry, limits
        self.open_calls = {"streams": 0, "sessions": 0}  # streaming calls holding a slot, by kind
        self.quotas = Quotas()  # open streams and sessions per token
        self.accepting = True
        self.health: Any = None  # grpc.health.v1's servicer, set once serving (None without grpcio-health-checking)
        self.security: Security | None = None  # TLS files and tokens, set once serving
        self.worker = ""  # this server's name in response headers (x-lipsync-worker), set once serving
        self.calls: set[OpenCall] = set()  # streaming calls in progress (idle and revocation checks)

    def open_slot(self, kind: str, who: Principal) -> None:
        """Take one of the server's slots of `kind` (streams | sessions) and one of `who`'s quota, or refuse; with
        no await in between, so concurrent calls are counted atomically."""
        limit, setting = (self.limits.max_streams, "server.max_streams") if kind == "streams" else \
            (self.limits.live.max_sessions, "server.live.max_sessions")
        open_now = self.open_calls[kind]
        if open_now >= limit:
            raise ResourceExhausted(f"{open_now} {kind} are open; the server's limit is {limit} ({setting})")
        self.quotas.take(kind, who)
        self.open_calls[kind] = open_now + 1

    def close_slot(self, kind: str, who: Principal) -> None:
        self.open_calls[kind] -= 1
        self.quotas.give_back(kind, who)

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

    def entry(self, model_id: str) -> ModelEntry:
        """The declared model `model_id` as the caller may see it: one its token is not scoped to is NOT_FOUND with
        the message of an undeclared one (a scope does not tell what else is served)."""
        if model_id and not principal().may_use(model_id):
            raise UnknownModel(model_id)
        return self.registry.entry(model_id)

    def visible_entries(self) -> list[ModelEntry]:
        """The declared models the caller may use."""
        who = principal()
        return [e for name, e in self.registry.entries.items() if who.may_use(name)]

    @asynccontextmanager
    async def model(self, model_id: str) -> AsyncIterator[tuple[ModelEntry, bool, float]]:
        if not self.accepting:
            raise Unavailable("server is shutting down")
        self.entry(model_id)
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
        """Stats, metrics and one structured log line per request: at INFO for a request, at DEBUG for each
        response of a stream (a stream's own summary line is INFO), so a busy server's log stays readable."""
        entry.record(frames, timings)
        metrics.observe(entry.spec.name, frames, timings)
        level = logging.DEBUG if event == "stream_chunk" else logging.INFO
        if log.isEnabledFor(level):
            stages = {(k if k == "batch_size" else f"{k}_ms"): round(v, 2) for k, v in timings.items()}
            log.log(level, json.dumps({"event": event, "model": entry.spec.name, "frames": frames, **stages}))

    async def accept(self, context) -> None:
        """Response headers of a Stream/Converse the server has accepted (config valid, model ready): the client
        sends its audio after them, so every refusal before reaches it as a status (client.open_stream)."""
        await context.send_initial_metadata(((WORKER_HEADER, self.worker), (ACCEPTED_HEADER, "1")))

    async def jpeg_bound(self, entry: ModelEntry, quality: int, square: bool = False) -> float:
        """The largest a frame's JPEG at `quality` can be expected to be, before any of it is rendered: the
        avatar's own frames encoded at that quality (kept for idle frames anyway), with a margin for the mouth;
        for SQUARE output the largest crop rectangle's share of that."""
        avatar = entry.pipeline.avatar
        height, width = avatar.frames.shape[2:]
        idle = await entry.scheduler.idle_jpegs(quality)
        whole = max(len(j) for j in idle) * 1.15 + 64
        if not square:
            return whole
        largest = max((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in avatar.rects)
        return min(whole, whole * largest / (width * height) * 2 + 1024)

    async def frames_per_message(self, entry: ModelEntry, quality: int, square: bool = False) -> int:
        """How many frames a streamed response may carry within server.max_message_mb; refused (before any work)
        when not even one would fit."""
        bound = await self.jpeg_bound(entry, quality, square)
        fit = int((self.limits.max_message_bytes - 1024) // (bound + 64))
        if fit < 1:
            self.limits.check_response_size(1, bound + 1024)
        return max(1, fit)

    async def check_response_fits(self, entry: ModelEntry, frames: int, quality: int) -> None:
        """Refuse a unary response that cannot be sent, before rendering it (JPEG size from the avatar's own
        frames at this quality, with a margin for the mouth)."""
        height, width = entry.pipeline.avatar.frames.shape[2:]
        if frames * width * height * 3 <= self.limits.max_message_bytes:
            return  # even uncompressed it would fit
        idle = await entry.scheduler.idle_jpegs(quality)
        self.limits.check_response_size(frames, max(len(j) for j in idle) * 1.15 + 32)

    def end_live_sessions(self, reason: Exception) -> int:
        """End every open live session with `reason` (shutdown): each says so to its client on a last frame and
        ends with that status, instead of being cancelled under gRPC's own message. The number ended."""
        sessions = [s for e in self.registry.entries.values() if e.scheduler for s in list(e.scheduler.live_sessions)]
        for session in sessions:
            session.end(reason)
        return len(sessions)

    def snapshot(self) -> dict[str, Any]:
        """Numbers for the metrics scrape (taken on the event loop's thread)."""
        r = self.registry
        return {"queue": {n: e.scheduler.queued_frames if e.scheduler else 0 for n, e in r.entries.items()},
                "loaded": {d: len(r.loaded_on(d)) for d in r.devices},
                "memory": {d: r.used_bytes(d) for d in r.devices}}


# --------------------------------------------------------------------------- running it
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class LoggingConfig(Section):
    """`logging`: what `lipsync serve` logs (to stderr)."""
    WHERE = "logging"
    level: str = setting("INFO", "DEBUG also logs the composed config at start", choices=LOG_LEVELS)
    format: str = setting(TEXT_FORMAT, "Python logging format of every text line")
    json: bool = setting(False, "one JSON object per line (time, level, logger, message, exception) instead of "
                         "text, for log collectors; `lipsync --log-format json serve` does the same")

    @classmethod
    def from_dict(cls, cfg: Any) -> "LoggingConfig":
        values = dict(cfg or {})
        if isinstance(values.get("level"), str):
            values["level"] = values["level"].upper()
        return section(cls, values, cls.WHERE)


@dataclass
class ServeConfig:
    """The composed config of `lipsync serve` (conf/config.yaml), every section read once through its dataclass:
    what `serve` and `serve --check` prepare from."""
    server: ServerConfig
    engine: EngineConfig
    pipeline: PipelineConfig
    registry: RegistryConfig
    logging: LoggingConfig
    models: dict[str, Any]
    device: str = "auto"  # default device of models without a `device` setting

    @classmethod
    def from_dict(cls, cfg: Any) -> "ServeConfig":
        values = settings(cfg, cls, "top-level")
        return cls(ServerConfig.from_dict(values.get("server")), EngineConfig.from_dict(values.get("engine")),
                   PipelineConfig.from_dict(values.get("pipeline")),
                   RegistryConfig.from_dict(values.get("registry")), LoggingConfig.from_dict(values.get("logging")),
                   {name: dict(model) for name, model in (values.get("models") or {}).items()},
                   str(values.get("device", "auto")))


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


def prepare(config: ServeConfig) -> tuple[ServerConfig, Security, Registry, Limits]:
    """Everything `serve` and `serve --check` make of the config, checked once: security files, the registry
    (models declared, nothing loaded) and the request limits."""
    server_cfg = config.server
    try:
        security = Security.from_config(server_cfg.tls, server_cfg.auth, server_cfg.metrics_auth,
                                        server_cfg.metrics_token_file)
    except SecurityConfigError as exc:
        raise StartupError(str(exc)) from None
    registry = Registry(config.models, config.registry, config.engine, config.pipeline, config.device)
    limits = Limits(server_cfg)
    limits.check_consistency(registry.config.max_queue_frames, registry.config.max_batch)
    return server_cfg, security, registry, limits


async def build(config: ServeConfig) -> tuple[grpc.aio.Server, Server, int]:
    """Create the registry and a started gRPC server per `config`."""
    server_cfg, security, registry, limits = prepare(config)
    registry.on_evict = lambda model, reason: metrics.EVICTIONS.labels(model).inc()
    await asyncio.to_thread(check_models, registry, server_cfg.strict_models)  # reads checkpoints: off the loop
    cache = await asyncio.to_thread(cache_dir_problem, config.engine.cache_dir)
    if cache:
        log.warning("%s: models load with engine=eager only (the other engines are files in the cache)", cache)
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
    server = grpc.aio.server(options=options, interceptors=[access, PreSerialized(PRESERIALIZED)],
                             maximum_concurrent_rpcs=server_cfg.max_concurrent_rpcs)
    pb_grpc.add_LipSyncServicer_to_server(LipSyncService(state), server)
    mono_grpc.add_MonolithicServiceServicer_to_server(MonolithicService(state), server)
    names = (pb.DESCRIPTOR.services_by_name["LipSync"].full_name,
             mono.DESCRIPTOR.services_by_name["MonolithicService"].full_name)
    health_servicer = _add_standard_services(server, names)
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
    if health_servicer is not None:
        from grpc_health.v1 import health_pb2
        for name in ("", *names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    state.health = health_servicer
    return server, state, port


def _add_standard_services(server: grpc.aio.Server, names: tuple[str, ...]) -> Any:
    """grpc.health.v1 (what Envoy and Kubernetes probe) and server reflection, from their own packages; the
    health servicer, or None where those packages are missing (said once: lipsync's own Health RPC still
    answers)."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection
    except ImportError as exc:
        log.warning("grpc.health.v1 and server reflection are not served (%s): pip install grpcio-health-checking "
                    "grpcio-reflection (a GPU host: make gpu-bundle)", exc)
        return None
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    return servicer


async def serve(config: ServeConfig) -> None:
    # The imports' ~200k objects live as long as the process: frozen out of the collector's sight before any model
    # loads, a full collection (a pause with the GIL held while sessions stream: 105-178 ms with them, < 1 ms
    # without, 2-core EPYC) walks only what was made since. Models are not frozen: an evicted one must be freed.
    gc.collect()
    gc.freeze()
    # blocking work handed off the event loop (audio decode, model loads, metrics pages) on threads the OS names
    asyncio.get_running_loop().set_default_executor(named_pool(min(32, (os.cpu_count() or 1) + 4), "blocking"))
    server, state, port = await build(config)
    security, server_cfg = state.security, state.limits.config
    endpoint = None
    if server_cfg.metrics_port >= 0:
        host = server_cfg.metrics_host
        try:
            endpoint = await _serve_metrics(server_cfg.metrics_port, host, state, security)
        except OSError as exc:
            await server.stop(0)
            raise StartupError(f"cannot serve metrics on {host}:{server_cfg.metrics_port} (server.metrics_host / "
                               f"server.metrics_port): {os.strerror(exc.errno) if exc.errno else exc}") from None
        log.info("Prometheus metrics on http://%s:%d/metrics%s", host, endpoint.port,
                 "" if security.metrics_open else " (bearer token required)")
    tls = state.security.tls
    log.info("lipsync %s (worker %s) serving on %s:%d over %s%s (models: %s; event loop %s)", __version__,
             state.worker, server_cfg.host, port,
             "mutual TLS" if tls.client_ca else "TLS" if tls.enabled else "plaintext",
             ", tokens required" if state.security.tokens else "", ", ".join(state.registry.entries) or "none",
             server_cfg.event_loop)
    watcher = asyncio.ensure_future(state.watch_calls())
    log.info("ready %.1f s after start (imports, configuration, preloaded models)", time.monotonic() - STARTED)
    print(f"READY port={port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, state)
    await stop.wait()
    if state.health is not None:
        await state.health.enter_graceful_shutdown()  # NOT_SERVING: proxies stop sending new work here
    drain_s = server_cfg.drain_s
    if drain_s > 0:
        log.info("shutting down: reported NOT_SERVING; still serving for %.1f s (server.drain_s) while proxies "
                 "notice", drain_s)
        await asyncio.sleep(drain_s)
    log.info("shutting down: refusing new requests, finishing in-flight work (up to %.0f s)",
             server_cfg.shutdown_grace_s)
    state.accepting = False
    ended = state.end_live_sessions(Unavailable(
        f"the server is shutting down (it kept serving server.drain_s={drain_s:g} s after it was asked to stop); "
        "open a new session: a proxy sends it to another worker"))
    if ended:
        log.info("ended %d live session(s): each was told why on its last frame", ended)
    await server.stop(server_cfg.shutdown_grace_s)
    watcher.cancel()
    await state.registry.close()
    if endpoint:
        endpoint.close()
    log.info("stopped")


DEFAULT_METRICS_PORT = ServerConfig.__dataclass_fields__["metrics_port"].default


async def _serve_metrics(port: int, host: str, state: Server, security: Security) -> metrics.MetricsEndpoint:
    """/metrics on `port`; the default port taken (a second server on this machine) moves it to a free one, said in
    one WARNING line, rather than stopping the start. A port chosen in the configuration is kept or fails."""
    allows = None if security.metrics_open else security.scrape_allows
    try:
        return await metrics.start(port, host, state.snapshot, allows)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port != DEFAULT_METRICS_PORT:
            raise
    endpoint = await metrics.start(0, host, state.snapshot, allows)
    log.warning("metrics port %d is taken (another lipsync serve on this machine?): /metrics is on port %d instead; "
                "set server.metrics_port to choose one (-1: none)", port, endpoint.port)
    return endpoint


def _reload(state: Server) -> None:
    """SIGHUP: re-read certificates, tokens and the metrics token; open streams keep flowing, except those whose
    token is no longer in the tokens file."""
    log.info("SIGHUP: reloading TLS files and tokens")
    state.security.reload()
    state.end_stale_calls()
