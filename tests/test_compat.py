"""api.compat on its own: the Go server's API on the registry and scheduler, its RPCs called directly (its
convention never touches the gRPC context): every failure is success=false with the message the LipSync service
would give as a status, counted under its own metric label, and the service keeps serving."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from lipsync._proto import monolithic_pb2 as mono
from lipsync.api import metrics
from lipsync.api.compat import MonolithicService
from lipsync.api.limits import Limits, ServerConfig
from lipsync.api.server import Server
from lipsync.model.engines import EngineConfig
from lipsync.runtime.registry import Registry, RegistryConfig

PIPELINE = {"micro_batch": {"cpu": 2, "cuda": 2}, "pinned_micro_batch": {"cpu": 2, "cuda": 2}, "jpeg_quality": 75}


@pytest.fixture(scope="module")
def service(weights, tiny_avatar):
    models = {"tiny": {"checkpoint": str(weights["328"]), "audio_encoder": str(weights["encoder"]),
                       "avatar": str(tiny_avatar)}}
    registry = Registry(models, RegistryConfig.from_dict({"devices": ["cpu"]}),
                        EngineConfig.from_dict({"backend": "eager"}), PIPELINE, "cpu")
    loop = asyncio.new_event_loop()
    yield MonolithicService(Server(registry, Limits(ServerConfig()))), loop
    loop.run_until_complete(registry.close())
    loop.close()


def counted(method: str, code: str) -> float:
    return metrics.REQUESTS.labels(f"Monolithic/{method}", code)._value.get()


def test_a_batch_renders_and_is_counted(service):
    svc, loop = service
    before = counted("InferBatchComposite", "OK")
    request = mono.CompositeBatchRequest(model_id="tiny", raw_audio=np.zeros(2560, np.float32).tobytes(),
                                         batch_size=3, start_frame_idx=1)
    out = loop.run_until_complete(svc.InferBatchComposite(request, None))
    assert out.success and len(out.composited_frames) == 3 and out.gpu_id == -1 and out.model_loaded
    assert counted("InferBatchComposite", "OK") == before + 1


@pytest.mark.parametrize("call, message, code", [
    (lambda s: s.InferBatchComposite(mono.CompositeBatchRequest(model_id="tiny", batch_size=40), None),
     "batch_size 40 is outside 1..32", "INVALID_ARGUMENT"),
    (lambda s: s.InferBatchComposite(mono.CompositeBatchRequest(model_id="ghost", batch_size=1,
                                                                raw_audio=bytes(8)), None),
     "unknown model 'ghost'", "NOT_FOUND"),
    (lambda s: s.LoadModel(mono.LoadModelRequest(model_id="ghost"), None), "unknown model 'ghost'", "NOT_FOUND"),
    (lambda s: s.UnloadModel(mono.UnloadModelRequest(model_id=""), None), "model_id is required",
     "INVALID_ARGUMENT"),
])
def test_failures_are_success_false_with_the_status_message(service, call, message, code):
    svc, loop = service
    method = call.__code__.co_names[0]
    before = counted(method, code)
    out = loop.run_until_complete(call(svc))
    assert not out.success and out.error.startswith(message), out.error
    assert counted(method, code) == before + 1
    health = loop.run_until_complete(svc.Health(mono.HealthRequest(), None))
    assert health.healthy


def test_load_model_follows_the_go_servers_conventions(service):
    """preferred_gpu: -1 lets the server choose; 0, what a client that never set it sends, on a server without GPUs
    also lets it choose; below -1 is refused. A model already loaded answers load_time_ms 0."""
    svc, loop = service
    loop.run_until_complete(svc.UnloadModel(mono.UnloadModelRequest(model_id="tiny"), None))
    first = loop.run_until_complete(svc.LoadModel(mono.LoadModelRequest(model_id="tiny", preferred_gpu=0), None))
    assert first.success and first.gpu_id == -1 and first.load_time_ms > 0
    again = loop.run_until_complete(svc.LoadModel(mono.LoadModelRequest(model_id="tiny", preferred_gpu=-1), None))
    assert again.success and again.load_time_ms == 0
    bad = loop.run_until_complete(svc.LoadModel(mono.LoadModelRequest(model_id="tiny", preferred_gpu=-2), None))
    assert not bad.success and bad.error.startswith("preferred_gpu -2")
