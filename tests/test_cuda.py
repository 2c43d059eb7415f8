"""The CUDA path: the same model on CPU and CUDA gives the same frames, and a server on CUDA serves them.

Run where CUDA exists (`make gpu-check` runs every test marked `cuda`); elsewhere each test skips with the reason.
"""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from conftest import worst_psnr

from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import StageClock, load_pipeline
from lipsync.runtime.render import synthesize

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]




@pytest.fixture(scope="module")
def wave(speech) -> torch.Tensor:
    return speech[:16000]


@pytest.fixture(scope="module")
def cpu_result(pipeline, wave):
    return synthesize(pipeline, wave, start_frame=1, quality=90)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_frames_match_cpu(tiny_spec, wave, cpu_result, precision):
    cuda = load_pipeline(tiny_spec, EngineConfig.from_dict({"backend": "eager", "precision": precision}), "cuda",
                         micro_batch=8)
    if precision == "fp32":  # the exact level: audio features
        torch.testing.assert_close(cuda.features(wave.cuda()).cpu(), load_pipeline(
            tiny_spec, EngineConfig.from_dict({"backend": "eager"}), "cpu", micro_batch=8).features(wave),
            atol=1e-3, rtol=1e-3)
    result = synthesize(cuda, wave.cuda(), start_frame=1, quality=90)
    assert [f.avatar_frame for f in result.frames] == [f.avatar_frame for f in cpu_result.frames]
    worst = worst_psnr(result.frames, cpu_result.frames)
    assert worst >= 40.0, f"{precision}: worst frame PSNR {worst:.1f} dB against CPU fp32"


def test_stage_clock_events_follow_the_model_device():
    device = torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    clock = StageClock(device)
    with clock.stage("inference"):
        torch.ones(1024, 1024, device=device).sum()
    assert clock.result()["inference"] >= 0.0


def test_server_on_cuda_serves_synthesize_and_stream(weights, tiny_avatar, tmp_path, wave, cpu_result):
    from test_server import ServerProcess, model_override

    from lipsync._proto import lipsync_pb2 as pb
    from lipsync._proto import lipsync_pb2_grpc as pb_grpc

    srv = ServerProcess([model_override("tiny", weights, tiny_avatar), "device=cuda"], tmp_path, engine="eager")
    pcm = (wave.numpy() * 32767).astype(np.int16).tobytes()
    fmt = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000, channels=1)

    async def session():
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LipSyncStub(channel)
            unary = await stub.Synthesize(pb.SynthesizeRequest(model_id="tiny", audio=pcm, format=fmt,
                                                               start_frame=1, jpeg_quality=90))

            async def requests():
                yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=fmt, start_frame=1,
                                                              jpeg_quality=90))
                for lo in range(0, len(pcm), 3200):
                    yield pb.StreamRequest(audio=pcm[lo:lo + 3200])
                yield pb.StreamRequest(end_of_audio=True)
            streamed = [f async for r in stub.Stream(requests()) for f in r.frames]
            return unary, streamed

    try:
        unary, streamed = asyncio.run(session())
    finally:
        assert srv.stop() == 0, srv.logs()
    assert unary.device.startswith("cuda")
    assert len(unary.frames) == len(streamed) == len(cpu_result.frames)
    for served, ref in ((unary.frames, cpu_result.frames), (streamed, cpu_result.frames)):
        worst = worst_psnr(served, ref)
        assert worst >= 40.0, f"served on CUDA vs CPU: worst frame PSNR {worst:.1f} dB"
