"""A real `lipsync serve` process on 127.0.0.1 at a free port, driven by real gRPC clients."""
from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import SPEECH
from torchvision.io import decode_jpeg

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync._proto import monolithic_pb2 as mono
from lipsync._proto import monolithic_pb2_grpc as mono_grpc
from lipsync.codec import audio
from lipsync.model import audio_features

S16 = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000, channels=1)


class ServerProcess:
    def __init__(self, overrides: list[str], tmp: Path, cwd: Path | None = None, engine: str = "onnxruntime",
                 env: dict[str, str] | None = None):
        """`engine`: onnxruntime (the default) costs 2x (160) to 4x (328) less CPU per frame than eager on 2 cores,
        for the same frames (95 dB; test_engines holds it to eager, test_pipeline holds eager to the plain
        network); it runs on the CPU only, so servers on CUDA name another."""
        self.log_path = tmp / f"server-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1", "server.port=0",
               "server.metrics_port=0", "server.shutdown_grace_s=60", f"engine={engine}", "models=none",
               *overrides]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=cwd, env=env)
        line = self.proc.stdout.readline()
        match = re.match(r"READY port=(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log_path.read_text()}")
        self.port = int(match.group(1))
        self.target = f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def model_override(name: str, weights, avatar: Path, extra: str = "", variant: str = "328") -> str:
    """A served model on the seeded weights. Servers whose tests wait on paced live video use variant 160: it
    renders several times faster on a CPU, so utterances start after a short lead even on a loaded machine."""
    return (f"+models.{name}={{checkpoint:{weights[variant]},audio_encoder:{weights['encoder']},avatar:{avatar},"
            f"variant:'{variant}'{extra}}}")


@pytest.fixture(scope="module")
def server(weights, tiny_avatar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    corrupt = tmp / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    srv = ServerProcess([
        model_override("tiny", weights, tiny_avatar),
        f"+models.missing={{checkpoint:{tmp / 'nope.pth'},audio_encoder:{weights['encoder']},avatar:{tiny_avatar}}}",
        f"+models.corrupt={{checkpoint:{corrupt},audio_encoder:{weights['encoder']},avatar:{tiny_avatar}}}",
        "server.max_audio_seconds=60", "server.max_streams=8", "server.strict_models=false",
    ], tmp)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pcm() -> bytes:
    """0.5 s of the committed speech at 16 kHz, s16le."""
    wave = audio.load_wav(SPEECH)[2000:10000]
    return (wave.numpy() * 32767).astype(np.int16).tobytes()


def run(coro):
    return asyncio.run(coro)


async def _call(target: str, fn):
    async with grpc.aio.insecure_channel(target) as channel:
        return await fn(pb_grpc.LipSyncStub(channel), mono_grpc.MonolithicServiceStub(channel))


def call(server, fn):
    return run(_call(server.target, fn))


def decode(jpeg: bytes) -> np.ndarray:
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)).numpy()


def synth(pcm: bytes, **kw) -> pb.SynthesizeRequest:
    return pb.SynthesizeRequest(model_id=kw.pop("model_id", "tiny"), audio=pcm, format=kw.pop("format", S16), **kw)


@pytest.fixture(scope="module")
def unary(server, pcm):
    return call(server, lambda s, m: s.Synthesize(synth(pcm, start_frame=1)))


# --------------------------------------------------------------------------- the API
def test_synthesize_returns_all_frames(unary, pcm):
    expected = audio_features.frame_count(len(pcm) // 2)
    assert [f.index for f in unary.frames] == list(range(expected))
    assert [f.avatar_frame for f in unary.frames[:7]] == [1, 2, 3, 4, 5, 4, 3]
    assert unary.frames[3].pts_ms == pytest.approx(120.0)
    for f in unary.frames:
        assert decode(f.jpeg).shape == (3, 192, 256)
    t = unary.timings
    assert t.inference_ms > 0 and t.encode_ms > 0 and t.total_ms >= t.inference_ms and t.batch_size >= 1
    assert unary.model_loaded and unary.model_load_ms > 0 and unary.device == "cpu"


def test_second_request_does_not_load(server, pcm, unary):
    again = call(server, lambda s, m: s.Synthesize(synth(pcm[:6400])))
    assert not again.model_loaded and again.model_load_ms == 0


async def _stream(stub, pcm: bytes, fmt: pb.AudioFormat, sizes: list[int], start_frame=1):
    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=fmt, start_frame=start_frame))
        pos, i = 0, 0
        while pos < len(pcm):
            yield pb.StreamRequest(audio=pcm[pos:pos + sizes[i % len(sizes)]])
            pos, i = pos + sizes[i % len(sizes)], i + 1
        yield pb.StreamRequest(end_of_audio=True)
    frames, ended = [], False
    async for response in stub.Stream(requests()):
        frames.extend(response.frames)
        ended = ended or response.end_of_stream
    assert ended
    return frames


def assert_same_frames(a, b):
    assert [f.index for f in a] == [f.index for f in b]
    assert [f.avatar_frame for f in a] == [f.avatar_frame for f in b]
    for x, y in zip(a, b):
        dx, dy = decode(x.jpeg).astype(int), decode(y.jpeg).astype(int)
        assert np.abs(dx - dy).max() <= 2 and (dx != dy).mean() < 0.002


def test_stream_equals_synthesize_with_random_chunks(server, pcm, unary):
    rng = np.random.default_rng(0)
    sizes = [int(n) * 2 for n in rng.integers(1, 3000, size=30)]  # whole s16 samples, random sizes
    frames = call(server, lambda s, m: _stream(s, pcm, S16, sizes))
    assert_same_frames(frames, unary.frames)


def test_a_stream_logs_one_info_line_at_its_end_and_its_responses_only_at_debug(server, pcm):
    """At INFO a busy server's log has a line per request, not per response: a Stream's many responses log at
    DEBUG, its summary once it ends."""
    before = len(server.logs())
    frames = call(server, lambda s, m: _stream(s, pcm, S16, [3200] * 8))
    assert frames
    for _ in range(50):  # the summary is written as the call ends, just after the client's last response
        text = server.logs()[before:]
        if '"event": "stream"' in text:
            break
        time.sleep(0.1)
    assert '"event": "stream"' in text and '"event": "stream_chunk"' not in text, text


def test_square_output_pasted_on_the_avatar_is_the_full_frame(server, pcm, unary):
    """SQUARE output (Stream and Synthesize): each frame carries its avatar frame's crop rectangle and a JPEG of
    that size; pasted by lipsync_client.Compositor onto the avatar GetAvatar sent, it is the full frame (JPEG
    apart: PSNR >= 40 dB, frame by frame), in under half its bytes."""
    import lipsync_client as ls

    async def main(stub, m):
        avatar = await ls.get_avatar(stub, "tiny")
        streamed = await ls.stream(stub, "tiny", pcm, ls.AudioFormat("s16le", 16000, 1), chunk_ms=160,
                                   start_frame=1, output=pb.SQUARE)
        whole = await stub.Synthesize(synth(pcm, start_frame=1, output=pb.SQUARE))
        return avatar, streamed.frames, list(whole.frames)
    avatar, streamed, whole = call(server, main)
    assert avatar.frame_count == 6 and (avatar.width, avatar.height) == (256, 192)
    assert all(decode(j).shape == (3, 192, 256) for j in avatar.jpegs)
    compositor = ls.Compositor(avatar)
    for frames in (streamed, whole):
        assert [f.index for f in frames] == [f.index for f in unary.frames]
        assert [f.avatar_frame for f in frames] == [f.avatar_frame for f in unary.frames]
        for f, full in zip(frames, unary.frames):
            x, y, w, h = avatar.squares[f.avatar_frame]
            assert (f.square.x, f.square.y, f.square.width, f.square.height) == (x, y, w, h)
            assert decode(f.jpeg).shape == (3, h, w) and len(f.jpeg) < len(full.jpeg) / 2
            pasted = compositor.rgb(f).astype(float)
            mse = ((pasted - decode(full.jpeg).transpose(1, 2, 0)) ** 2).mean()
            assert 10 * np.log10(255**2 / mse) >= 40
    assert not unary.frames[0].HasField("square")  # FULL_FRAME output names no rectangle


@pytest.mark.parametrize("model,quality,code,text", [
    ("nobody", 0, grpc.StatusCode.NOT_FOUND, "unknown model 'nobody'"),
    ("tiny", 101, grpc.StatusCode.INVALID_ARGUMENT, "jpeg_quality 101"),
    ("missing", 0, grpc.StatusCode.FAILED_PRECONDITION, "model 'missing' cannot be loaded"),
])
def test_bad_get_avatar_requests(server, model, quality, code, text):
    import lipsync_client as ls

    got, details = _code(server, lambda s, m: ls.get_avatar(s, model, quality))
    assert got == code and text in details and "/" not in details, (got, details)
    assert_healthy(server)


def test_a_square_that_does_not_fit_its_avatar_frame_is_refused_by_the_client():
    """A client never writes outside the picture, whatever a server sends: a square whose size or place does not
    fit is a ValueError naming the frame."""
    import lipsync_client as ls
    import simplejpeg

    frame = np.zeros((48, 64, 3), np.uint8)
    avatar = ls.Avatar(64, 48, [simplejpeg.encode_jpeg(frame, colorspace="RGB")], [(8, 8, 16, 16)])
    patch = simplejpeg.encode_jpeg(np.full((16, 16, 3), 200, np.uint8), colorspace="RGB")
    compositor = ls.Compositor(avatar)
    good = pb.Frame(index=0, avatar_frame=0, jpeg=patch, square=pb.Rect(x=8, y=8, width=16, height=16))
    assert compositor.rgb(good)[8:24, 8:24].mean() > 150
    for rect in (pb.Rect(x=56, y=8, width=16, height=16), pb.Rect(x=8, y=8, width=20, height=16),
                 pb.Rect(x=-4, y=0, width=16, height=16)):
        with pytest.raises(ValueError, match="frame 7"):
            compositor.rgb(pb.Frame(index=7, avatar_frame=0, jpeg=patch, square=rect))
    with pytest.raises(ValueError, match="avatar frame 3"):
        compositor.rgb(pb.Frame(index=1, avatar_frame=3))


def test_stream_resamples_stereo_float_at_44k(server):
    wave = audio.load_wav(SPEECH)[2000:10000]
    x44 = audio.AF.resample(wave, 16000, 44100).numpy().astype(np.float32)
    stereo = np.stack([x44, x44], 1).tobytes()
    fmt = pb.AudioFormat(encoding=pb.PCM_F32LE, sample_rate=44100, channels=2)
    streamed = call(server, lambda s, m: _stream(s, stereo, fmt, [8 * 441, 8 * 1000 + 8]))
    whole = call(server, lambda s, m: s.Synthesize(synth(stereo, format=fmt, start_frame=1)))
    assert_same_frames(streamed, whole.frames)


def test_concurrent_clients_get_the_sequential_frames(server, pcm, unary):
    async def many(s, m):
        return await asyncio.gather(*[s.Synthesize(synth(pcm, start_frame=1)) for _ in range(3)])
    for response in call(server, many):
        assert_same_frames(response.frames, unary.frames)


def test_compatibility_service(server, pcm):
    wave = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
    req = mono.CompositeBatchRequest(model_id="tiny", raw_audio=wave[:640 * 4].tobytes(), batch_size=4,
                                     start_frame_idx=2, sample_rate=16000)
    out = call(server, lambda s, m: m.InferBatchComposite(req))
    assert out.success and out.error == "" and len(out.composited_frames) == 4 and out.gpu_id == -1
    assert all(decode(j).shape == (3, 192, 256) for j in out.composited_frames)
    assert out.total_time_ms > 0 and out.inference_time_ms > 0
    # client-supplied generator input replaces the avatar's own
    visual = np.random.default_rng(1).random((4, 6, 320, 320), dtype=np.float32)
    with_visual = call(server, lambda s, m: m.InferBatchComposite(
        mono.CompositeBatchRequest(model_id="tiny", raw_audio=wave[:640 * 4].tobytes(), batch_size=4,
                                   start_frame_idx=2, visual_frames=visual.tobytes())))
    assert with_visual.success and len(with_visual.composited_frames) == 4
    assert with_visual.composited_frames[0] != out.composited_frames[0]
    feats = call(server, lambda s, m: m.InferBatchComposite(mono.CompositeBatchRequest(
        model_id="tiny", audio_features=np.zeros(8192, np.float32).tobytes(), batch_size=2)))
    assert feats.success and len(feats.composited_frames) == 2
    models = call(server, lambda s, m: m.ListModels(mono.ListModelsRequest()))
    tiny = next(x for x in models.models if x.model_id == "tiny")
    assert tiny.loaded and tiny.memory_mb > 0 and tiny.request_count > 0
    health = call(server, lambda s, m: m.Health(mono.HealthRequest()))
    assert health.healthy and health.loaded_models >= 1
    stats = call(server, lambda s, m: m.GetModelStats(mono.GetModelStatsRequest()))
    assert any(x.model_id == "tiny" and x.total_inference_ms > 0 for x in stats.models)


def test_compatibility_field_numbers_match_the_go_server():
    def fields(message) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}
    assert fields(mono.CompositeBatchRequest) == {"model_id": 1, "visual_frames": 2, "raw_audio": 3,
                                                  "audio_features": 4, "batch_size": 5, "start_frame_idx": 6,
                                                  "sample_rate": 7}
    assert fields(mono.CompositeBatchResponse) == {
        "composited_frames": 1, "inference_time_ms": 2, "composite_time_ms": 3, "total_time_ms": 4,
        "audio_processing_ms": 5, "model_loaded": 6, "model_load_time_ms": 7, "success": 8, "error": 9, "gpu_id": 10}
    assert fields(mono.ModelInfo) == {"model_id": 1, "loaded": 2, "gpu_id": 3, "memory_mb": 4, "request_count": 5,
                                      "avg_inference_ms": 6}
    assert fields(mono.ModelStats) == {"model_id": 1, "loaded": 2, "gpu_id": 3, "memory_mb": 4, "request_count": 5,
                                       "total_inference_ms": 6, "avg_inference_ms": 7, "last_used_timestamp": 8}
    assert fields(mono.HealthResponse) == {"healthy": 1, "loaded_models": 2, "max_models": 3, "gpu_ids": 4,
                                           "gpu_memory_used_gb": 5}
    assert fields(mono.LoadModelRequest) == {"model_id": 1, "preferred_gpu": 2}
    assert fields(mono.LoadModelResponse) == {"success": 1, "error": 2, "gpu_id": 3, "load_time_ms": 4}
    assert mono.DESCRIPTOR.services_by_name["MonolithicService"].full_name == "monolithic.MonolithicService"


def test_model_management_and_stats(server, unary):
    listed = call(server, lambda s, m: s.ListModels(pb.ListModelsRequest()))
    tiny = next(x for x in listed.models if x.model_id == "tiny")
    assert tiny.loaded and tiny.memory_bytes > 40e6 and tiny.backend == "onnxruntime" and tiny.avatar_frames == 6
    stats = call(server, lambda s, m: s.GetModelStats(pb.GetModelStatsRequest(model_id="tiny")))
    stages = stats.models[0].stages
    assert {"inference", "total", "queue"} <= set(stages) and stages["total"].p95_ms >= stages["total"].p50_ms > 0
    health = call(server, lambda s, m: s.Health(pb.HealthRequest()))
    assert health.healthy and health.devices[0].device == "cpu" and health.devices[0].memory_used_bytes > 0


def test_standard_health_reflection_and_metrics(server, unary):  # unary: a Synthesize to count
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def check(s, m):
        async with grpc.aio.insecure_channel(server.target) as ch:
            status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def one():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
            services = [r async for r in stub.ServerReflectionInfo(one())]
            return status, [s.name for s in services[0].list_services_response.service]
    status, names = call(server, check)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert {"lipsync.v1.LipSync", "monolithic.MonolithicService", "grpc.health.v1.Health"} <= set(names)
    port = re.search(r"metrics on http://[\d.]+:(\d+)", server.logs()).group(1)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'lipsync_requests_total{code="OK",method="Synthesize"}' in text
    assert "lipsync_stage_ms_bucket" in text and 'lipsync_loaded_models{device="cpu"}' in text


# --------------------------------------------------------------------------- bad input
def _code(server, fn) -> tuple[grpc.StatusCode, str]:
    try:
        call(server, fn)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _wav(channels: int = 1, rate: int = 16000, bits: int = 16) -> bytes:
    import struct
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2, 2, bits)
    return (b"RIFF" + struct.pack("<I", 44) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
            + struct.pack("<I", 8) + bytes(8))


def assert_healthy(server) -> None:
    assert server.proc.poll() is None
    assert call(server, lambda s, m: s.Health(pb.HealthRequest())).healthy


I = grpc.StatusCode.INVALID_ARGUMENT
BAD_UNARY = [
    ("wrong encoding", dict(format=pb.AudioFormat(encoding=9)), I, "unknown audio encoding"),
    ("odd byte count", dict(audio=b"\x00" * 801), I, "not a multiple of 2"),
    ("NaN audio", dict(audio=np.full(4000, np.nan, np.float32).tobytes(),
                       format=pb.AudioFormat(encoding=pb.PCM_F32LE)), I, "NaN"),
    ("empty audio", dict(audio=b""), I, "empty"),
    ("61 s of audio", dict(audio=bytes(2 * 8000 * 61), format=pb.AudioFormat(encoding=pb.PCM_S16LE,
                                                                            sample_rate=8000)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "limit per request is 60 s"),
    # the receive limit follows max_audio_seconds (60 s of 48 kHz stereo float): a larger message is not read
    ("an hour of audio", dict(audio=bytes(2 * 8000 * 3600), format=pb.AudioFormat(encoding=pb.PCM_S16LE,
                                                                                  sample_rate=8000)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (57600018 vs. 23105536)"),
    ("quality too high", dict(jpeg_quality=101), I, "jpeg_quality 101"),
    ("unknown output", dict(output=7), I, "output 7 is not a FrameOutput"),
    ("negative quality", dict(jpeg_quality=-5), I, "jpeg_quality -5"),
    ("negative start frame", dict(start_frame=-1), I, "start_frame -1"),
    ("unsupported rate", dict(format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=96000)), I, "96000"),
    ("three channels", dict(format=pb.AudioFormat(encoding=pb.PCM_S16LE, channels=3)), I, "3 channels"),
    ("unknown model", dict(model_id="nobody"), grpc.StatusCode.NOT_FOUND, "unknown model 'nobody'"),
    ("no model id", dict(model_id=""), I, "model_id is required"),
    ("missing checkpoint", dict(model_id="missing"), grpc.StatusCode.FAILED_PRECONDITION,
     "model 'missing' cannot be loaded: its checkpoint is missing"),
    ("corrupt checkpoint", dict(model_id="corrupt"), grpc.StatusCode.FAILED_PRECONDITION,
     "model 'corrupt' cannot be loaded: its checkpoint is unreadable"),
    ("garbage WAV", dict(audio=b"RIFF....WAVEjunk", format=pb.AudioFormat(encoding=pb.WAV)), I, "no fmt"),
    ("WAV with 0 channels", dict(audio=_wav(channels=0), format=pb.AudioFormat(encoding=pb.WAV)), I, "0 channels"),
    ("WAV at 0 Hz", dict(audio=_wav(rate=0), format=pb.AudioFormat(encoding=pb.WAV)), I, "sample rate 0"),
    ("24-bit WAV", dict(audio=_wav(bits=24), format=pb.AudioFormat(encoding=pb.WAV)), I, "24 bits"),
    ("rate below 8 kHz", dict(format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=7999)), I, "7999"),
    ("odd float stereo", dict(audio=b"\x00" * 12, format=pb.AudioFormat(encoding=pb.PCM_F32LE, channels=2)), I,
     "not a multiple of 8"),
    ("100 kB model id", dict(model_id="m" * 100_000), I, "100000 characters long"),
    ("unknown unicode model id", dict(model_id="\u00e9\u0000" * 20), grpc.StatusCode.NOT_FOUND, "unknown model"),
]


@pytest.mark.parametrize("case,changes,code,text", BAD_UNARY, ids=[c[0] for c in BAD_UNARY])
def test_bad_synthesize_requests(server, pcm, case, changes, code, text):
    changes = dict(changes)
    request = synth(changes.pop("audio", pcm[:8000]), **changes)
    got, details = _code(server, lambda s, m: s.Synthesize(request))
    assert got == code and text in details, (got, details)
    assert "/" not in details and len(details) < 500  # no server path reaches a client; echoes are clipped
    assert_healthy(server)


async def _raw_stream(stub, messages, cancel_after: int | None = None):
    async def requests():
        for msg in messages:
            yield msg
    call_ = stub.Stream(requests())
    got = []
    async for response in call_:
        got.append(response)
        if cancel_after is not None and len(got) >= cancel_after:
            call_.cancel()
            break
    return got


CONFIG = pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=S16))
BAD_STREAMS = [
    ("audio before config", [pb.StreamRequest(audio=b"\x00\x00")], "first Stream message must be `config`"),
    ("no messages at all", [], "closed before its config"),
    ("config twice", [CONFIG, CONFIG], "config may only be sent once"),
    ("audio after end", [CONFIG, pb.StreamRequest(audio=b"\x00" * 6400), pb.StreamRequest(end_of_audio=True),
                         pb.StreamRequest(audio=b"\x00" * 64)], "after end_of_audio"),
    ("odd chunk", [CONFIG, pb.StreamRequest(audio=b"\x00" * 3)], "not a multiple"),
    ("look-ahead out of range", [pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", lookahead_frames=9))],
     "lookahead_frames 9"),
    ("WAV stream", [pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=pb.AudioFormat(
        encoding=pb.WAV)))], "WAV is not accepted"),
    ("empty message", [CONFIG, pb.StreamRequest()], "empty stream message"),
    ("config without a model", [pb.StreamRequest(config=pb.StreamConfig(format=S16))], "model_id is required"),
    ("stream quality 0..100", [pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", jpeg_quality=300))],
     "jpeg_quality 300"),
    ("stream at 96 kHz", [pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=pb.AudioFormat(
        encoding=pb.PCM_S16LE, sample_rate=96000)))], "96000"),
    ("unknown output", [pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", output=-3))],
     "output -3 is not a FrameOutput"),
]


@pytest.mark.parametrize("case,messages,text", BAD_STREAMS, ids=[c[0] for c in BAD_STREAMS])
def test_bad_streams(server, case, messages, text):
    got, details = _code(server, lambda s, m: _raw_stream(s, messages))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and text in details, (got, details)
    assert_healthy(server)


def test_a_stream_over_the_audio_limit_is_refused(server):
    over = [CONFIG, pb.StreamRequest(audio=bytes(2 * 16000 * 61))]  # the fixture's limit is 60 s
    got, details = _code(server, lambda s, m: _raw_stream(s, over))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit per request is 60 s" in details
    assert_healthy(server)


ADMIN = [
    ("load unknown", lambda s: s.LoadModel(pb.LoadModelRequest(model_id="ghost")), grpc.StatusCode.NOT_FOUND,
     "unknown model 'ghost'"),
    ("load without id", lambda s: s.LoadModel(pb.LoadModelRequest()), I, "model_id is required"),
    ("unload unknown", lambda s: s.UnloadModel(pb.UnloadModelRequest(model_id="ghost")), grpc.StatusCode.NOT_FOUND,
     "unknown model"),
    ("unload without id", lambda s: s.UnloadModel(pb.UnloadModelRequest()), I, "model_id is required"),
    ("stats of unknown", lambda s: s.GetModelStats(pb.GetModelStatsRequest(model_id="ghost")),
     grpc.StatusCode.NOT_FOUND, "unknown model"),
    ("load a broken model", lambda s: s.LoadModel(pb.LoadModelRequest(model_id="corrupt")),
     grpc.StatusCode.FAILED_PRECONDITION, "its checkpoint is unreadable"),
]


@pytest.mark.parametrize("case,rpc,code,text", ADMIN, ids=[c[0] for c in ADMIN])
def test_bad_admin_requests(server, case, rpc, code, text):
    got, details = _code(server, lambda s, m: rpc(s))
    assert got == code and text in details, (got, details)
    assert "/" not in details
    assert_healthy(server)


@pytest.mark.parametrize("rpc,text", [
    (lambda m: m.LoadModel(mono.LoadModelRequest(model_id="ghost")), "unknown model"),
    (lambda m: m.UnloadModel(mono.UnloadModelRequest(model_id="ghost")), "unknown model"),
    (lambda m: m.LoadModel(mono.LoadModelRequest(model_id="missing")), "its checkpoint is missing"),
])
def test_bad_compat_admin_requests(server, rpc, text):
    out = call(server, lambda s, m: rpc(m))
    assert not out.success and text in out.error and "/" not in out.error
    assert_healthy(server)


@pytest.mark.parametrize("changes,text", [
    (dict(batch_size=0), "batch_size 0"), (dict(batch_size=33), "batch_size 33"),
    (dict(visual_frames=b"\x00" * 12), "visual_frames has 12 bytes"), (dict(model_id="ghost"), "unknown model"),
    (dict(raw_audio=b""), "raw_audio"), (dict(raw_audio=b"\x00\x00\xc0\x7f" * 100), "NaN"),
    (dict(raw_audio=b"", audio_features=b"\x00" * 100), "audio_features has 100 bytes"),
    (dict(raw_audio=b"", audio_features=b"\x00\x00\xc0\x7f" * 8192), "audio_features contains NaN"),
    (dict(start_frame_idx=-3), "start_frame -3"), (dict(sample_rate=1000), "sample rate 1000"),
    (dict(raw_audio=b"\x00" * 7), "not a multiple of 4"), (dict(model_id=""), "model_id is required"),
])
def test_bad_compat_requests_report_failure(server, changes, text):
    request = mono.CompositeBatchRequest(model_id="tiny", raw_audio=np.zeros(2560, np.float32).tobytes(),
                                         batch_size=2)
    for key, value in changes.items():
        setattr(request, key, value)
    out = call(server, lambda s, m: m.InferBatchComposite(request))
    assert not out.success and text in out.error, out.error
    assert_healthy(server)


def test_disconnect_and_deadline_free_the_session(server, pcm):
    messages = [CONFIG] + [pb.StreamRequest(audio=pcm[i:i + 1280]) for i in range(0, len(pcm), 1280)]
    got = call(server, lambda s, m: _raw_stream(s, messages + [pb.StreamRequest(audio=pcm)] * 4, cancel_after=1))
    assert len(got) == 1
    code, _ = _code(server, lambda s, m: s.Synthesize(synth(pcm), timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        health = call(server, lambda s, m: s.Health(pb.HealthRequest()))
        if health.active_streams == 0 and health.queued_frames == 0:
            break
        time.sleep(0.2)
    assert health.active_streams == 0 and health.queued_frames == 0


def test_server_still_serves_after_bad_input(server, pcm, unary):
    """Runs after the bad-input tests (file order): the server is healthy and answers correctly."""
    assert call(server, lambda s, m: s.Health(pb.HealthRequest())).healthy
    again = call(server, lambda s, m: s.Synthesize(synth(pcm, start_frame=1)))
    assert_same_frames(again.frames, unary.frames)
    assert server.proc.poll() is None


# --------------------------------------------------------------------------- registry and lifecycle
def test_eviction_pinning_and_budget(weights, tiny_avatar, tmp_path):
    a, b, p = (model_override(m, weights, tiny_avatar, extra, variant="160")  # 59 MB each
               for m, extra in (("a", ""), ("b", ""), ("p", ",pinned:true")))
    srv = ServerProcess([a, b, p, "registry.memory_budget_mb=100"], tmp_path)
    try:
        def loaded():
            listed = call(srv, lambda s, m: s.ListModels(pb.ListModelsRequest()))
            return {x.model_id for x in listed.models if x.loaded}
        call(srv, lambda s, m: s.LoadModel(pb.LoadModelRequest(model_id="a")))
        assert loaded() == {"a"}
        call(srv, lambda s, m: s.LoadModel(pb.LoadModelRequest(model_id="b")))
        assert loaded() == {"b"}  # a was evicted: two do not fit in 100 MB
        assert "unloading model a from cpu: LFU eviction to make room for b (memory budget)" in srv.logs()
        assert call(srv, lambda s, m: s.UnloadModel(pb.UnloadModelRequest(model_id="b"))).was_loaded
        call(srv, lambda s, m: s.LoadModel(pb.LoadModelRequest(model_id="p")))
        code, details = _code(srv, lambda s, m: s.LoadModel(pb.LoadModelRequest(model_id="a")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned or busy" in details
        assert loaded() == {"p"}
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # signals, gRPC and the batcher on either event loop
def test_graceful_shutdown_finishes_in_flight_work(weights, tiny_avatar, tmp_path, pcm, loop):
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, ",preload:true", variant="160"),
                         f"server.event_loop={loop}"], tmp_path)

    async def request_then_stop(s, m):
        pending = asyncio.ensure_future(s.Synthesize(synth(pcm)))
        await asyncio.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        return await pending
    response = call(srv, request_then_stop)
    assert len(response.frames) == audio_features.frame_count(len(pcm) // 2)
    assert srv.proc.wait(60) == 0
    assert f"event loop {loop})" in srv.logs() and "shutting down" in srv.logs()


@pytest.mark.parametrize("first, avatar_frames, jpegs, timings, fields", [
    (0, [0, 1, 2], [b"\xff\xd8" + bytes(300), b"\xff\xd8\x01", b"\x02" * 200_000], {"audio": 1.5, "queue": 0.25,
     "inference": 3.0, "composite": 0.5, "encode": 2.0, "total": 9.0, "batch_size": 32},
     {"model_loaded": True, "model_load_ms": 812.5}),
    (10**9, [2**30], [b""], {}, {}),
    (7, [], [], {"total": 1.0}, {}),
    (3, [4, 5], [b"\xff\xd8" + bytes(90), b"\xff\xd8"], {"total": 2.0}, {"squares": [[1, 2, 65, 66], [0, 0, 8, 8]]}),
])
def test_stream_responses_built_as_wire_bytes_parse_to_the_message(first, avatar_frames, jpegs, timings, fields):
    """The Stream fast path (each response written as bytes, JPEGs copied once) and the message it stands for
    are the same to any client: protobuf's own parser reads them equal, byte count included."""
    from lipsync.api import convert

    fields = dict(fields)
    squares = fields.pop("squares", None)  # SQUARE output: each frame's rectangle
    built = convert.stream_response_bytes(first, avatar_frames, jpegs, timings, squares, **fields)
    message = pb.StreamResponse(frames=convert.frames(first, avatar_frames, jpegs, squares),
                                timings=convert.timings(timings), **fields)
    assert pb.StreamResponse.FromString(built) == message and len(built) == message.ByteSize()


def test_the_client_says_when_the_server_loads_the_model(weights, tiny_avatar, tmp_path, speech_1s_wav):
    """The first call to a model not loaded waits for its load: `lipsync client` says so before the wait, and not
    on the calls after."""
    srv = ServerProcess([model_override("fresh", weights, tiny_avatar, variant="160")], tmp_path)
    command = [sys.executable, "-m", "lipsync", "client", "--server", srv.target, "--model", "fresh", "--audio",
               str(speech_1s_wav)]
    try:
        first = subprocess.run(command, capture_output=True, text=True, timeout=300)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        srv.stop()
    assert first.returncode == 0 and "the server is loading model fresh" in first.stderr, first.stderr[-2000:]
    assert second.returncode == 0 and "loading model" not in second.stderr
