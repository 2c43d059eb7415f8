"""Everything served, on CUDA: live sessions (speech, barge-in), SQUARE output, blend and feather, batches of mixed
rectangle sizes and JPEG qualities, the idle-JPEG cache, autotune (a fresh and a cached decision), CUDA graphs
across two models and a reload, two workers on one GPU, and the device discipline (no tensor operation on the event
loop, no host→device copy outside the staging module) under every RPC. Each is held to the CPU path: features
within the existing CUDA tolerance, frames ≥ 40 dB decoded.

Marked `cuda` (`make gpu-check` runs them); without a GPU each skips with the reason. `LIPSYNC_CUDA_TESTS_ON=cpu`
runs the same bodies on the CPU instead (the references then equal themselves): how this module's own code is
checked on a machine without a GPU before a GPU host ever runs it.
"""
from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
import pytest
import torch
from conftest import decoded, psnr, worst_psnr
from test_server import ServerProcess, model_override

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import Say, channel, converse
from lipsync.codec import audio, jpeg
from lipsync.model import autotune
from lipsync.model.audio_features import FeatureStream
from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import ModelSpec, load_pipeline
from lipsync.runtime.render import synthesize
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler

DEVICE = os.environ.get("LIPSYNC_CUDA_TESTS_ON", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device")]
ON_CUDA = DEVICE == "cuda"
S16 = audio.AudioFormat("s16le", 16000, 1)
TIME_SCALE = 1.0 if ON_CUDA else 3.0  # a CPU dry run renders below 25 fps: a slower live clock


def pcm_of(wave: torch.Tensor) -> bytes:
    return (wave.numpy() * 32767).astype(np.int16).tobytes()


def eager(**extra) -> EngineConfig:
    return EngineConfig.from_dict({"backend": "eager", **extra})


@pytest.fixture(scope="module")
def device_pipeline(tiny_spec):
    """The tiny model on the device under test (eager: fp16 on CUDA, fp32 on the CPU)."""
    return load_pipeline(tiny_spec, eager(), DEVICE, micro_batch=8)


@pytest.fixture(scope="module")
def served(weights, tiny_avatar, tmp_path_factory):
    """`lipsync serve` on the device under test: the tiny model, and the same one with the seam-free blend."""
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar),
                         model_override("blended", weights, tiny_avatar, extra=",compose:blend"),
                         f"device={DEVICE}", f"server.live.time_scale={TIME_SCALE}",
                         "server.live.slow_device=buffer"],  # every speech frame is held to the CPU's
                        tmp_path_factory.mktemp("cuda-serving"), engine="eager")
    yield srv
    assert srv.stop() == 0, srv.logs()


def test_streamed_features_on_the_device_equal_the_cpu(device_pipeline, eager_pipeline, speech):
    """A session's features, pushed in uneven chunks on the device, are the CPU's whole-utterance features."""
    wave = speech[:20000]
    reference = FeatureStream(eager_pipeline.encoder, "cpu").finish(wave)[1]
    stream = FeatureStream(device_pipeline.encoder, DEVICE)
    parts = [stream.push(wave[lo:lo + step].to(DEVICE))[1] for lo, step in ((0, 3000), (3000, 7100), (10100, 5000))]
    parts.append(stream.finish(wave[15100:].to(DEVICE))[1])
    got = torch.cat(parts).float().cpu()
    assert got.shape == reference.shape
    torch.testing.assert_close(got, reference, atol=2e-2 if ON_CUDA else 1e-5, rtol=2e-2 if ON_CUDA else 1e-5)


def test_live_speech_and_barge_in_match_the_cpu(served, pipeline, speech):
    """A Converse on the device: both utterances play, the second is cut by a barge-in, and every speech frame
    equals the CPU's Synthesize of its utterance at the position where it started (≥ 40 dB)."""
    a, b = speech[:16000], speech[8000:56000]
    cut, length = (4.5, 6.0) if ON_CUDA else (7.0, 9.0)  # the CPU's dry run plans long leads

    async def main():
        async with channel(served.target) as ch:
            return await converse(pb_grpc.LipSyncStub(ch), "tiny", [
                Say(pcm_of(a), S16, at=0.2, id="a"), Say(pcm_of(b), S16, at=2.5, interrupt_at=cut, id="b")],
                length, quality=90)
    result = asyncio.run(main())
    started = {e.started.utterance_id: e.started for _, e in result.events if e.WhichOneof("event") == "started"}
    finished = {e.finished.utterance_id: e.finished for _, e in result.events if e.WhichOneof("event") == "finished"}
    assert set(started) == {"a", "b"}, result.events
    assert not finished["a"].interrupted and (finished["b"].interrupted or not ON_CUDA)  # (a CPU may start it late)
    for name, wave in (("a", a), ("b", b)):
        frames = [f for f in result.frames if f.kind == pb.SPEECH and f.utterance_id == name]
        assert frames, name
        reference = synthesize(pipeline, wave, start_frame=started[name].avatar_position, quality=90).frames
        worst = min(psnr(decoded(f.jpeg), decoded(reference[f.utterance_frame].jpeg)) for f in frames)
        assert worst >= 40.0, f"utterance {name}: worst speech frame {worst:.1f} dB against the CPU"


def _synthesize(target: str, model: str, pcm: bytes, output: int = pb.FULL_FRAME) -> pb.SynthesizeResponse:
    async def main():
        async with channel(target) as ch:
            return await pb_grpc.LipSyncStub(ch).Synthesize(pb.SynthesizeRequest(
                model_id=model, audio=pcm, format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000,
                                                                 channels=1),
                start_frame=1, jpeg_quality=90, output=output))
    return asyncio.run(main())


def test_square_output_is_the_full_frames_square(served, speech):
    """SQUARE output on the device: each square pasted into its full frame changes it by less than JPEG does."""
    pcm = pcm_of(speech[:12000])
    full, square = (_synthesize(served.target, "tiny", pcm, output) for output in (pb.FULL_FRAME, pb.SQUARE))
    assert len(full.frames) == len(square.frames) > 0
    for whole, part in zip(full.frames, square.frames):
        frame, piece = decoded(whole.jpeg), decoded(part.jpeg)
        r = part.square
        assert piece.shape[1:] == (r.height, r.width)
        pasted = frame.clone()
        pasted[:, r.y:r.y + r.height, r.x:r.x + r.width] = piece
        assert psnr(pasted, frame) >= 40.0


@pytest.mark.parametrize("compose,extra", [("blend", {}), ("paste", {"feather": 6})])
def test_blend_and_feather_on_the_device_match_the_cpu(weights, tiny_avatar, speech, compose, extra):
    spec = ModelSpec.from_dict("t", {"checkpoint": weights["328"], "audio_encoder": weights["encoder"],
                                     "avatar": tiny_avatar, "compose": compose, **extra})
    wave = speech[:12000]
    on_device = synthesize(load_pipeline(spec, eager(), DEVICE, micro_batch=8), wave.to(DEVICE), 1, quality=90)
    on_cpu = synthesize(load_pipeline(spec, eager(), "cpu", micro_batch=8), wave, 1, quality=90)
    assert [f.avatar_frame for f in on_device.frames] == [f.avatar_frame for f in on_cpu.frames]
    assert worst_psnr(on_device.frames, on_cpu.frames) >= 40.0


def test_the_blended_model_is_served(served, speech):
    assert len(_synthesize(served.target, "blended", pcm_of(speech[:8000])).frames) > 0


def test_mixed_rectangle_sizes_composite_like_the_cpu():
    """One batch of frames whose crop rectangles have three sizes, blended: the device's composite is the CPU's
    within one level."""
    from test_compose import mixed_avatar

    from lipsync.model.avatar import Avatar, blend_mask
    from lipsync.model.compose import composite
    cpu = mixed_avatar()
    on_device = Avatar(cpu.frames.to(DEVICE), cpu.rects, alpha=blend_mask(328).to(DEVICE))
    ids = [0, 1, 2, 3, 1, 0]
    pred = torch.rand(len(ids), 3, 320, 320, generator=torch.Generator().manual_seed(3))
    got = composite(on_device, pred.to(DEVICE), ids).cpu()
    assert (got.int() - composite(cpu, pred, ids).int()).abs().max() <= 1


def test_a_batch_of_mixed_qualities_and_outputs_matches_the_cpu(device_pipeline, pipeline):
    """Jobs of several JPEG qualities, SQUARE and whole frames, and raw frames, batched together on the device and
    queued three deep (full batches back to back: composite and nvJPEG of one batch while the next infers): every
    job's frames decode to the CPU's (≥ 40 dB), raw frames likewise."""
    ids = [1, 2, 3, 4, 5, 4, 3, 2]
    features = torch.rand(len(ids), 32, 16, 16, generator=torch.Generator().manual_seed(5))
    jobs = [(50, False), (90, False), (90, True), (None, False)] * 3

    async def run(p):
        scheduler = ModelScheduler(p, DeviceWorkers(), max_batch=32, max_delay_ms=50)
        scheduler.start()
        try:
            return await asyncio.gather(*(scheduler.submit(features.to(p.device), ids, q, square=square)
                                          for q, square in jobs))
        finally:
            await scheduler.stop()
    got, want = asyncio.run(run(device_pipeline)), asyncio.run(run(pipeline))
    assert max(t["batch_size"] for _, t in got) == 32  # full batches, each of several qualities and outputs
    for (quality, _), (mine, _), (theirs, _) in zip(jobs, got, want):
        for x, y in zip(mine, theirs):
            a, b = (x.float(), y.float()) if quality is None else (decoded(x), decoded(y))
            assert psnr(a, b) >= 40.0


def test_the_idle_jpeg_cache_on_the_device(device_pipeline):
    """The avatar's idle JPEGs made on the device (nvJPEG) decode to what the CPU's encoder makes of the same frames
    (≥ 40 dB), and are encoded once per quality."""
    async def main():
        scheduler = ModelScheduler(device_pipeline, DeviceWorkers())
        first = await scheduler.idle_jpegs(80)
        again = await scheduler.idle_jpegs(80)
        return first, again
    first, again = asyncio.run(main())
    assert first is again and len(first) == device_pipeline.avatar.frame_count
    on_cpu = jpeg.encode_frames(device_pipeline.avatar.frames.cpu(), 80)
    for mine, theirs in zip(first, on_cpu):
        assert psnr(decoded(mine), decoded(theirs)) >= 40.0


def test_autotune_on_the_device_decides_once_and_reuses_it(tmp_path, caplog):
    candidates = ["eager/fp16", "eager/fp32"] if ON_CUDA else ["eager/fp32", "onnxruntime/fp32"]
    cfg = EngineConfig.from_dict({"backend": "auto", "cache_dir": str(tmp_path), "tune_seconds": 0.3,
                                  "tune_batches": {"cpu": [1, 2], "cuda": [4, 8]},
                                  "candidates": {DEVICE.split(":")[0]: candidates}})
    from test_autotune import SHAPES, Builds, small_net
    builds = Builds()
    device = torch.device(DEVICE)
    first = autotune.tuned_engine(small_net(), SHAPES, cfg, device, "small", {"v": 1}, build=builds)[1]
    assert set(builds.count) == set(candidates) and first.backend
    with caplog.at_level(logging.INFO, logger="lipsync.model.autotune"):
        again = autotune.tuned_engine(small_net(), SHAPES, cfg, device, "small", {"v": 1}, build=builds)[1]
    assert again == first and sum(builds.count.values()) == len(candidates) + 1  # only the winner, rebuilt
    assert "measured earlier on this machine" in caplog.text


def test_cuda_graphs_serve_two_models_and_a_reload(weights, tiny_avatar, tmp_path, speech, pipeline):
    """Two models whose engines replay CUDA graphs (compile, recorded at load on the inference thread), called in
    turn, one unloaded and loaded again: every answer equals the CPU's frames."""
    engine = "compile" if ON_CUDA else "eager"
    srv = ServerProcess([model_override("one", weights, tiny_avatar), model_override("two", weights, tiny_avatar),
                         f"device={DEVICE}", "engine.batch_buckets=[8]", "engine.max_batch=8", "engine.opt_batch=8",
                         "engine.cuda_graphs=true"], tmp_path, engine=engine)
    wave = speech[:10000]
    pcm = pcm_of(wave)
    reference = synthesize(pipeline, wave, start_frame=1, quality=90).frames

    async def unload(model: str):
        async with channel(srv.target) as ch:
            return await pb_grpc.LipSyncStub(ch).UnloadModel(pb.UnloadModelRequest(model_id=model))
    try:
        answers = [_synthesize(srv.target, m, pcm) for m in ("one", "two", "one")]
        assert asyncio.run(unload("one")).was_loaded
        answers.append(_synthesize(srv.target, "one", pcm))
        assert answers[-1].model_loaded  # loaded again
    finally:
        assert srv.stop() == 0, srv.logs()
    for answer in answers:
        assert worst_psnr(answer.frames, reference) >= 40.0


def test_two_workers_share_one_device(weights, tiny_avatar, tmp_path, speech, pipeline):
    """Two `lipsync serve` processes on the one device (K workers per GPU), called at once: both serve the CPU's
    frames."""
    servers = [ServerProcess([model_override("tiny", weights, tiny_avatar), f"device={DEVICE}"], tmp_path,
                             engine="eager") for _ in range(2)]
    wave = speech[:10000]
    reference = synthesize(pipeline, wave, start_frame=1, quality=90).frames

    async def both():
        return await asyncio.gather(*(asyncio.to_thread(_synthesize, s.target, "tiny", pcm_of(wave))
                                      for s in servers))
    try:
        answers = asyncio.run(both())
    finally:
        codes = [s.stop() for s in servers]
    assert codes == [0, 0]
    for answer in answers:
        assert answer.device.startswith(DEVICE.split(":")[0])
        assert worst_psnr(answer.frames, reference) >= 40.0


def test_the_device_discipline_holds_on_the_device(weights, tiny_avatar):
    """Every RPC on the device: no tensor operation on the event loop, no host→device copy outside the staging
    module on the device's threads (Converse included)."""
    from test_device_discipline import InProcessServer, every_rpc
    srv = InProcessServer([model_override("tiny", weights, tiny_avatar, variant="160"), f"device={DEVICE}",
                           f"server.live.time_scale={TIME_SCALE}"], device=DEVICE)
    try:
        seen = asyncio.run(every_rpc(srv.target))
    finally:
        srv.stop()
    assert srv.failed is None and all(seen.values()), seen
    assert not srv.ops.calls, srv.ops.calls[:20]
    assert not srv.copies.calls, srv.copies.calls[:20]
