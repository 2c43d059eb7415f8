"""Prometheus metrics, served over HTTP by `lipsync serve` (server.metrics_host/metrics_port), optionally behind
a bearer token (server.metrics_token_file, checked by lipsync.security)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
AUTH_FAILURES = Counter("lipsync_auth_failures", "RPCs refused by the token check, by status", ["code"])
EVICTIONS = Counter("lipsync_evictions", "Models unloaded to make room or after idling", ["model"])


def observe(model: str, frames: int, timings: dict[str, float]) -> None:
    FRAMES.labels(model).inc(frames)
    for stage, ms in timings.items():
        if stage == "batch_size":
            BATCH_SIZE.labels(model).observe(ms)
        else:
            STAGE_MS.labels(model, stage).observe(ms)


class _StateCollector:
    """Gauges read at scrape time: queue depth, loaded models, device memory. The scrape runs on the HTTP
    server's thread; the numbers are taken on the event loop's thread (`snapshot`), never read from under it."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], loop: asyncio.AbstractEventLoop):
        self.snapshot, self.loop = snapshot, loop

    def _take(self) -> dict[str, Any] | None:
        done: concurrent.futures.Future = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result(self.snapshot())
            except Exception as exc:  # reported as a failed scrape, never on the loop
                done.set_exception(exc)
        try:
            self.loop.call_soon_threadsafe(take)
            return done.result(timeout=5)
        except Exception:
            return None

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("lipsync_queue_frames", "Frames waiting for the generator", labels=["model"]),
                GaugeMetricFamily("lipsync_loaded_models", "Loaded models", labels=["device"]),
                GaugeMetricFamily("lipsync_device_memory_bytes", "Memory measured for loaded models",
                                  labels=["device"]))

    def describe(self):
        """The families without values: what registering asks for. Without it the registry would call `collect`
        on the event loop's own thread, which waits for that thread (a 5 s stall at every start)."""
        return self._families()

    def collect(self):
        state = self._take()
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


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True


class MetricsEndpoint:
    """/metrics over HTTP on its own thread; with `allows`, a scrape's `Authorization` header must pass it."""

    def __init__(self, host: str, port: int, allows: Callable[[str], bool] | None = None):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    return self._reply(404, b"not found\n")
                if allows is not None and not allows(self.headers.get("Authorization", "")):
                    return self._reply(401, b"unauthorized\n", {"WWW-Authenticate": "Bearer"})
                self._reply(200, generate_latest(REGISTRY), {"Content-Type": CONTENT_TYPE_LATEST})

            def _reply(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {"Content-Type": "text/plain"}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not news
                pass

        self.http = _HTTPServer((host, port), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, name="metrics", daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def start(port: int, host: str, snapshot: Callable[[], dict[str, Any]],
          allows: Callable[[str], bool] | None = None) -> MetricsEndpoint:
    """Serve /metrics on `port` (0 = any free port). Call from the event loop (the state gauges are read there)."""
    endpoint = MetricsEndpoint(host, port, allows)
    REGISTRY.register(_StateCollector(snapshot, asyncio.get_running_loop()))
    return endpoint
