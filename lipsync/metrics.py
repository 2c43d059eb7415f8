"""Prometheus metrics, served over HTTP by `lipsync serve` (server.metrics_port)."""
from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
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
EVICTIONS = Counter("lipsync_evictions", "Models unloaded to make room or after idling", ["model"])


def observe(model: str, frames: int, timings: dict[str, float]) -> None:
    FRAMES.labels(model).inc(frames)
    for stage, ms in timings.items():
        if stage == "batch_size":
            BATCH_SIZE.labels(model).observe(ms)
        else:
            STAGE_MS.labels(model, stage).observe(ms)


class _StateCollector:
    """Gauges read from the live server state at scrape time: queue depth, loaded models, device memory."""

    def __init__(self, state: Any):
        self.state = state

    def collect(self):
        registry = self.state.registry
        queue = GaugeMetricFamily("lipsync_queue_frames", "Frames waiting for the generator", labels=["model"])
        loaded = GaugeMetricFamily("lipsync_loaded_models", "Loaded models", labels=["device"])
        memory = GaugeMetricFamily("lipsync_device_memory_bytes", "Memory measured for loaded models",
                                   labels=["device"])
        for name, entry in registry.entries.items():
            queue.add_metric([name], entry.scheduler.queued_frames if entry.scheduler else 0)
        for device in registry.devices:
            loaded.add_metric([device], len(registry.loaded_on(device)))
            memory.add_metric([device], registry.used_bytes(device))
        yield from (queue, loaded, memory)


def start(port: int, host: str, state: Any) -> int:
    """Serve /metrics on `port` (0 = any free port); returns the bound port."""
    REGISTRY.register(_StateCollector(state))
    server, _ = start_http_server(port, addr=host)
    return server.server_port
