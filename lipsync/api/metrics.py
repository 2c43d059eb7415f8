"""Prometheus metrics, served over HTTP by `lipsync serve` (server.metrics_host/metrics_port, loopback by default),
behind a bearer token when the server checks tokens (server.metrics_auth, checked by lipsync.security)."""
from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)

REQUESTS = Counter("lipsync_requests", "RPCs by method and final status code", ["method", "code"])
FRAMES = Counter("lipsync_frames", "Frames delivered", ["model"])
STAGE_MS = Histogram("lipsync_stage_ms", "Per-request stage latency in ms", ["model", "stage"], buckets=MS_BUCKETS)
BATCH_SIZE = Histogram("lipsync_batch_size", "Largest generator batch each request joined", ["model"],
                       buckets=(1, 2, 4, 8, 16, 24, 32, 64))
ACTIVE_STREAMS = Gauge("lipsync_active_streams", "Open Stream RPCs")
LIVE_SESSIONS = Gauge("lipsync_live_sessions", "Open live sessions (Converse)")
LATE_FRAMES = Counter("lipsync_late_frames", "Live frame slots shown HELD because the speech frame was not ready",
                      ["model"])
FIRST_FRAME_MS = Histogram("lipsync_first_frame_ms", "Live utterances: first audio to first frame sent, ms",
                           ["model"], buckets=MS_BUCKETS)
LIVE_FAILURES = Counter("lipsync_live_utterances_failed", "Live utterances the server ended early (finished with an "
                        "error): their rendering failed, or they would pass server.live.max_queued_speech_s",
                        ["model"])
REPEATED_FRAMES = Counter("lipsync_live_repeated_frames", "Live speech slots that showed an earlier rendered frame "
                          "again: the device rendered below real time (server.live.slow_device=degrade)", ["model"])
DEGRADED_UTTERANCES = Counter("lipsync_live_degraded_utterances", "Live utterances that started with a frame stride "
                              "above 1 (every k-th frame rendered)", ["model"])
AUTH_FAILURES = Counter("lipsync_auth_failures", "RPCs refused by the token check, by status", ["code"])
EVICTIONS = Counter("lipsync_evictions", "Models unloaded to make room or after idling", ["model"])


class _ModelSeries:
    """One model's labelled series, looked up once: `labels()` validates and locks on every call, and a Stream
    records each of its responses."""

    def __init__(self, model: str):
        self.frames = FRAMES.labels(model)
        self.batch_size = BATCH_SIZE.labels(model)
        self.stages: dict[str, Any] = {}
        self.model = model

    def stage(self, name: str) -> Any:
        series = self.stages.get(name)
        if series is None:
            series = self.stages[name] = STAGE_MS.labels(self.model, name)
        return series


_SERIES: dict[str, _ModelSeries] = {}


def observe(model: str, frames: int, timings: dict[str, float]) -> None:
    series = _SERIES.get(model)
    if series is None:
        series = _SERIES[model] = _ModelSeries(model)
    series.frames.inc(frames)
    for stage, ms in timings.items():
        if stage == "batch_size":
            series.batch_size.observe(ms)
        else:
            series.stage(stage).observe(ms)


def observe_live(model: str, events: list[Any]) -> None:
    """A live session's events as they are sent: late frames, first-frame latency, utterances that failed."""
    for e in events:
        if e.kind == "late":
            LATE_FRAMES.labels(model).inc()
        elif e.kind == "started":
            FIRST_FRAME_MS.labels(model).observe(e.fields["latency_ms"])
            if e.fields.get("frame_stride", 1) > 1:
                DEGRADED_UTTERANCES.labels(model).inc()
        elif e.kind == "finished":
            if e.fields["error"]:
                LIVE_FAILURES.labels(model).inc()
            if e.fields.get("frames_repeated"):
                REPEATED_FRAMES.labels(model).inc(e.fields["frames_repeated"])


_STATE: ContextVar[dict[str, Any] | None] = ContextVar("lipsync_metrics_state", default=None)


class _StateCollector:
    """Gauges read at scrape time: queue depth, loaded models, device memory. The numbers are taken on the event
    loop's thread by the endpoint and handed to the rendering thread in a context variable, never read from under
    the loop."""

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("lipsync_queue_frames", "Frames waiting for the generator", labels=["model"]),
                GaugeMetricFamily("lipsync_loaded_models", "Loaded models", labels=["device"]),
                GaugeMetricFamily("lipsync_device_memory_bytes", "Memory measured for loaded models",
                                  labels=["device"]))

    def describe(self):
        """The families without values: what registering asks for (no state is needed for it)."""
        return self._families()

    def collect(self):
        state = _STATE.get()
        if state is None:
            return
        queue, loaded, memory = self._families()
        for name, frames in state["queue"].items():
            queue.add_metric([name], frames)
        for device, count in state["loaded"].items():
            loaded.add_metric([device], count)
        for device, used in state["memory"].items():
            memory.add_metric([device], used)
        yield from (queue, loaded, memory)


_COLLECTOR = _StateCollector()
REGISTRY.register(_COLLECTOR)


def render(state: dict[str, Any] | None) -> bytes:
    """The exposition text, with the state gauges from `state` (call off the event loop: it walks every metric)."""
    token = _STATE.set(state)
    try:
        return generate_latest(REGISTRY)
    finally:
        _STATE.reset(token)


class MetricsEndpoint:
    """/metrics over HTTP/1.0 on the event loop. What a hostile client can hold is bounded: at most
    `max_connections` connections (more are closed at once), each must send its request head (at most 8 KiB)
    within `timeout_s` and take the reply within `timeout_s`; one request per connection. No thread per
    connection: the text is rendered on the default executor. With `allows`, the `Authorization` header must pass."""

    HEAD_LIMIT = 8192

    def __init__(self, snapshot: Callable[[], dict[str, Any]], allows: Callable[[str], bool] | None = None,
                 timeout_s: float = 5.0, max_connections: int = 16):
        self.snapshot, self.allows = snapshot, allows
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, limit=self.HEAD_LIMIT)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # too slow, too long or gone: closed without a word
            code, body, headers = await self._answer(head.decode("latin-1"))
            reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                      405: "Method Not Allowed"}[code]
            lines = [f"HTTP/1.0 {code} {reason}", f"Content-Length: {len(body)}", "Connection: close",
                     *(f"{k}: {v}" for k, v in headers.items())]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await asyncio.wait_for(writer.drain(), self.timeout_s)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()

    async def _answer(self, head: str) -> tuple[int, bytes, dict[str, str]]:
        request, *header_lines = head.split("\r\n")
        parts = request.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", {"Content-Type": "text/plain"}
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", {"Content-Type": "text/plain", "Allow": "GET"}
        if path not in ("/metrics", "/"):
            return 404, b"not found\n", {"Content-Type": "text/plain"}
        authorization = next((line.split(":", 1)[1].strip() for line in header_lines
                              if line.lower().startswith("authorization:")), "")
        if self.allows is not None and not self.allows(authorization):
            return 401, b"unauthorized\n", {"Content-Type": "text/plain", "WWW-Authenticate": "Bearer"}
        state = self.snapshot()
        body = await asyncio.to_thread(render, state)
        return 200, b"" if method == "HEAD" else body, {"Content-Type": CONTENT_TYPE_LATEST}

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def start(port: int, host: str, snapshot: Callable[[], dict[str, Any]],
                allows: Callable[[str], bool] | None = None, timeout_s: float = 5.0,
                max_connections: int = 16) -> MetricsEndpoint:
    """Serve /metrics on `port` (0 = any free port) from the running event loop."""
    endpoint = MetricsEndpoint(snapshot, allows, timeout_s, max_connections)
    await endpoint.start(host, port)
    return endpoint
