"""Faults in the engine cache's own files, as a disk or an interrupted copy makes them: each entry is sealed with the
digests of its files, a damaged one is said in one WARNING line, deleted and rebuilt, and the frames after the
rebuild are a fresh cache's. A checkpoint replaced while a model loads cannot file the old weights' engines under
the new file's name. A cached decision that is readable but impossible is measured again."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import worst_psnr

from lipsync.model import autotune
from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import ModelSpec, load_pipeline
from lipsync.runtime.render import synthesize


def onnx_config(cache) -> EngineConfig:
    return EngineConfig.from_dict({"backend": "onnxruntime", "cache_dir": str(cache)})


@pytest.fixture(scope="module")
def reference(tiny_spec, speech, tmp_path_factory):
    """Frames of the tiny model from a fresh cache, and that cache's entries."""
    cache = tmp_path_factory.mktemp("fresh-cache")
    frames = synthesize(load_pipeline(tiny_spec, onnx_config(cache), "cpu", micro_batch=4), speech[:8000]).frames
    return frames, cache


def entry(cache, part: str, file: str):
    """The file `file` of the entry named t-<part>-<key>."""
    import re
    (found,) = [p / file for p in cache.iterdir() if re.fullmatch(rf"t-{part}-[0-9a-f]{{24}}", p.name)]
    return found


def damaged(reference, tmp_path, harm):
    """A copy of the fresh cache with `harm(cache)` done to it."""
    _, fresh = reference
    cache = tmp_path / "cache"
    shutil.copytree(fresh, cache)
    harm(cache)
    return cache


@pytest.mark.parametrize("harm", ["truncated export", "flipped weights", "flipped gate reference", "sealed file gone"])
def test_a_damaged_entry_is_rebuilt_and_gives_a_fresh_caches_frames(reference, tiny_spec, speech, tmp_path, caplog,
                                                                    harm):
    frames, fresh = reference

    def hurt(cache):
        if harm == "truncated export":  # an interrupted copy: half the file
            onnx = entry(cache, "generator", "model.onnx")
            onnx.write_bytes(onnx.read_bytes()[:onnx.stat().st_size // 2])
        elif harm == "flipped weights":  # 1 KB in the middle of the weights, bit-flipped
            onnx = entry(cache, "generator", "model.onnx")
            data = bytearray(onnx.read_bytes())
            middle = len(data) // 2
            data[middle:middle + 1024] = bytes(b ^ 0xFF for b in data[middle:middle + 1024])
            onnx.write_bytes(bytes(data))
        elif harm == "flipped gate reference":  # the accuracy gate's stored eager output: an exponent flipped
            ref = entry(cache, "generator-reference", "output.pt")
            data = bytearray(ref.read_bytes())
            for k in range(len(data) - 400, len(data) - 4, 4):
                data[k] ^= 0x40
            ref.write_bytes(bytes(data))
        else:
            entry(cache, "generator", "model.onnx").unlink()
    cache = damaged(reference, tmp_path, hurt)
    with caplog.at_level(logging.WARNING, logger="lipsync.model.engines"):
        rebuilt = synthesize(load_pipeline(tiny_spec, onnx_config(cache), "cpu", micro_batch=4), speech[:8000]).frames
    warned = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    if harm != "sealed file gone":  # a missing artefact is simply built (nothing to warn of)
        assert len(warned) == 1 and "sealed with" in warned[0], warned
    assert worst_psnr(rebuilt, frames) == float("inf")  # the same bytes as a fresh cache's
    again = json.loads(entry(cache, "generator", "meta.json").read_text())
    assert set(again["files"]) == {"model.onnx"}  # sealed anew


def test_every_entry_is_sealed_with_its_files_digests(reference):
    _, cache = reference
    metas = list(cache.glob("*/meta.json"))
    assert len(metas) >= 3  # the generator's export, its gate reference, the audio encoder's
    for meta in metas:
        sealed = json.loads(meta.read_text())["files"]
        assert sealed and all(len(d) == 64 for d in sealed.values())
    assert not list(cache.rglob(".*.tmp"))  # no temporary file left behind


def test_a_checkpoint_replaced_during_the_load_cannot_poison_the_cache(tiny_spec, weights, tiny_avatar, speech,
                                                                      tmp_path, monkeypatch):
    """The checkpoint is renamed over right after the load read it: the engines built from what was read are filed
    under the digest of what was read, so a later load of the new file builds its own and serves its frames."""
    import lipsync.model.pipeline as pipeline_module
    from lipsync.model.demo import make_weights

    own = tmp_path / "weights"
    old, _ = make_weights(own / "old", "328", seed=0)
    new, _ = make_weights(own / "new", "328", seed=1)
    served = tmp_path / "generator.pth"
    shutil.copy(old, served)
    spec = ModelSpec.from_dict("t", {"checkpoint": served, "audio_encoder": weights["encoder"],
                                     "avatar": tiny_avatar})
    real = pipeline_module.read_checkpoint

    def read_then_replace(path):
        data = real(path)
        if path == spec.checkpoint:
            shutil.copy(new, tmp_path / "incoming.pth")
            (tmp_path / "incoming.pth").replace(served)  # renamed over, as a deploy does
        return data
    monkeypatch.setattr(pipeline_module, "read_checkpoint", read_then_replace)
    cache = tmp_path / "cache"
    during = synthesize(load_pipeline(spec, onnx_config(cache), "cpu", micro_batch=4), speech[:8000]).frames
    monkeypatch.setattr(pipeline_module, "read_checkpoint", real)
    after = synthesize(load_pipeline(spec, onnx_config(cache), "cpu", micro_batch=4), speech[:8000]).frames
    fresh_new = synthesize(load_pipeline(spec, onnx_config(tmp_path / "fresh"), "cpu", micro_batch=4),
                           speech[:8000]).frames
    old_spec = ModelSpec.from_dict("t", {"checkpoint": old, "audio_encoder": weights["encoder"],
                                         "avatar": tiny_avatar})
    fresh_old = synthesize(load_pipeline(old_spec, onnx_config(tmp_path / "fresh-old"), "cpu", micro_batch=4),
                           speech[:8000]).frames
    assert worst_psnr(during, fresh_old) == float("inf")  # what was read is what was served
    assert worst_psnr(after, fresh_new) == float("inf")  # the new file's own engines, not the old weights'
    assert worst_psnr(after, fresh_old) < 40


def test_a_readable_but_impossible_decision_is_measured_again(tmp_path, caplog):
    from test_autotune import SHAPES, Builds, config, small_net

    cfg = config(tmp_path, candidates={"cpu": ["eager/fp32", "onnxruntime/fp32"]})
    builds = Builds()
    first = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 9}, build=builds)[1]
    (decision_file,) = (tmp_path / "decisions").glob("*.json")
    for wrong in ({"batch": 64}, {"backend": "renamedbackend"}):
        decision_file.write_text(json.dumps({**json.loads(decision_file.read_text()), **wrong}))
        before = sum(builds.count.values())
        with caplog.at_level(logging.WARNING, logger="lipsync.model.autotune"):
            again = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 9},
                                          build=builds)[1]
        assert sum(builds.count.values()) == before + 2  # both candidates measured again
        assert again.key == first.key and "is not one of the candidates" in caplog.text


# --------------------------------------------------------------------------- an unusable cache directory
@pytest.mark.parametrize("where", ["a file", "not writable"])
def test_an_unusable_cache_dir_is_a_configuration_fault(weights, tiny_avatar, tmp_path, speech, where):
    """engine.cache_dir a regular file, or a directory that cannot be made (/proc): `serve --check` names the setting
    (exit 1); the server starts with one WARNING line naming it; an eager model serves (it needs no file); a model
    whose engine is a file in the cache is FAILED_PRECONDITION naming the setting, never INTERNAL, and no load is
    attempted on each request."""
    import asyncio
    import subprocess
    import sys

    import numpy as np
    from conftest import ROOT
    from test_server import ServerProcess, model_override

    from lipsync._proto import lipsync_pb2 as pb
    from lipsync.apps.client import channel
    cache = tmp_path / "not-a-dir"
    if where == "a file":
        cache.write_text("a file where the cache should be")
    else:
        cache = "/proc/lipsync-engine-cache"
    setting = f"engine.cache_dir={cache}"
    check = subprocess.run([sys.executable, "-m", "lipsync", "serve", "--check", "models=none", setting],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert check.returncode == 1 and f"engine.cache_dir='{cache}' is not usable" in check.stdout, check.stdout
    pcm = (speech[:6000].numpy() * 32767).astype(np.int16).tobytes()
    fmt = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000, channels=1)

    async def synthesize(target: str):
        async with channel(target) as ch:
            from lipsync._proto import lipsync_pb2_grpc as pb_grpc
            stub = pb_grpc.LipSyncStub(ch)
            outcomes = []
            for _ in range(2):
                try:
                    outcomes.append(len((await stub.Synthesize(pb.SynthesizeRequest(model_id="tiny", audio=pcm,
                                                                                    format=fmt))).frames))
                except Exception as exc:  # grpc.aio.AioRpcError
                    outcomes.append((exc.code().name, exc.details()))
            return outcomes
    for engine in ("eager", "onnxruntime"):
        srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"), setting],
                            tmp_path / engine if (tmp_path / engine).mkdir() is None else tmp_path, engine=engine)
        try:
            outcomes = asyncio.run(synthesize(srv.target))
        finally:
            srv.stop()
        logs = srv.logs()
        assert f"engine.cache_dir='{cache}' is not usable" in logs and "Traceback" not in logs
        if engine == "eager":
            assert all(isinstance(n, int) and n > 0 for n in outcomes), outcomes
        else:
            for code, details in outcomes:
                assert code == "FAILED_PRECONDITION" and "engine.cache_dir" in details and str(cache) not in details
            assert "exporting" not in logs  # refused before any build, on every request
