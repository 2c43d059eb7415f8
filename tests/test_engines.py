"""Engine layer and export: ONNX vs onnxruntime, torch.compile vs eager, the engine cache, TensorRT where present."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from lipsync.model.engines import (
    BUILDS,
    EngineCache,
    EngineConfig,
    EngineError,
    build_engine,
    cache_key,
    choose_backend,
    tensorrt_available,
)
from lipsync.model.networks import AudioEncoder, Generator, load_audio_encoder, load_generator

TRT_OK, TRT_WHY = tensorrt_available()


@pytest.fixture(scope="module")
def export_run(weights, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`lipsync export` of the 328 generator and the audio encoder to ONNX, as a user runs it (the files the tests
    below hold against eager; one export each, the slow part here)."""
    out = tmp_path_factory.mktemp("onnx")
    done = subprocess.run([sys.executable, "-m", "lipsync", "export", "--checkpoint", str(weights["328"]),
                           "--format", "onnx", "--out", str(out / "g.onnx"), "--audio-encoder", str(weights["encoder"]),
                           "--audio-encoder-out", str(out / "e.onnx")], capture_output=True, text=True, timeout=600)
    return done, out / "g.onnx", out / "e.onnx"


@pytest.fixture(scope="module")
def onnx_files(export_run) -> tuple[Path, Path]:
    done, generator, encoder = export_run
    assert done.returncode == 0, done.stderr
    return generator, encoder


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_generator_matches_eager(weights, onnx_files, batch):
    net = load_generator(weights["328"])
    model = onnx.load(str(onnx_files[0]))
    assert [i.name for i in model.graph.input] == ["input", "audio"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic (dynamic) batch
    rng = np.random.default_rng(batch)
    visual = rng.random((batch, 6, 320, 320), dtype=np.float32)
    audio = rng.standard_normal((batch, 32, 16, 16), dtype=np.float32)
    got = onnxruntime.InferenceSession(str(onnx_files[0]), providers=["CPUExecutionProvider"]).run(
        None, {"input": visual, "audio": audio})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(visual), torch.from_numpy(audio)).numpy()
    assert got.shape == (batch, 3, 320, 320) and np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_encoder_matches_eager(weights, onnx_files, batch):
    net = load_audio_encoder(weights["encoder"])
    model = onnx.load(str(onnx_files[1]))
    assert [i.name for i in model.graph.input] == ["mel_spectrogram"]
    assert [o.name for o in model.graph.output] == ["audio_features"]
    mel = np.random.default_rng(batch).uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)
    got = onnxruntime.InferenceSession(str(onnx_files[1]), providers=["CPUExecutionProvider"]).run(
        None, {"mel_spectrogram": mel})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(mel)).numpy()
    assert got.shape == (batch, 512) and np.abs(got - ref).max() <= 1e-4


def test_export_cli_prints_a_summary(export_run):
    done, generator, encoder = export_run
    assert done.returncode == 0, done.stderr
    assert '"max_abs_error_vs_eager"' in done.stdout and '"input": "[B,6,320,320]"' in done.stdout
    assert generator.is_file() and encoder.is_file()


def test_compile_matches_eager_for_every_batch_size():
    torch.manual_seed(0)
    net = AudioEncoder().eval()
    # one graph to compile (inductor costs ~30 s a graph on 2 cores): batches 1..3 pad up to it, 5..7 split;
    # the choice among several buckets is test_hardening's (torch.compile passed through)
    config = EngineConfig.from_dict({"backend": "compile", "batch_buckets": [4], "max_batch": 4, "opt_batch": 4})
    before = BUILDS["compile"]
    engine = build_engine(net, [(1, 80, 16)], config, "cpu", "encoder")
    assert BUILDS["compile"] == before + 1 and engine.backend == "compile"
    mel = torch.rand(7, 1, 80, 16) * 8 - 4
    with torch.no_grad():
        ref = net(mel)
    for n in range(1, 8):
        torch.testing.assert_close(engine(mel[:n]), ref[:n], atol=1e-4, rtol=0)


def test_eager_engine_and_auto_choice():
    backend, reason = choose_backend(EngineConfig(), torch.device("cpu"))
    assert backend == "eager" and "CPU" in reason
    torch.manual_seed(0)
    net = Generator("160").eval()
    engine = build_engine(net, [(6, 160, 160), (32, 16, 16)], EngineConfig.from_dict({"backend": "eager"}), "cpu")
    assert engine.channels_last and engine.precision == "fp32" and engine.max_error <= 1e-4
    with pytest.raises(EngineError, match="refusing it"):
        build_engine(net, [(6, 160, 160), (32, 16, 16)],
                     EngineConfig.from_dict({"backend": "eager", "tolerance": {"fp32": -1.0}}), "cpu", "g")
    with pytest.raises(EngineError, match="fp16 is not supported on this CPU"):
        build_engine(net, [(6, 160, 160), (32, 16, 16)],
                     EngineConfig.from_dict({"backend": "eager", "precision": "fp16"}), "cpu")


def test_bad_engine_config_is_named():
    with pytest.raises(ValueError, match="engine.backend='fast': must be one of auto, tensorrt"):
        EngineConfig.from_dict({"backend": "fast"})
    with pytest.raises(ValueError, match="unknown engine settings"):
        EngineConfig.from_dict({"max_batchsize": 3})


def test_cache_key_changes_with_every_input():
    base = dict(checkpoint="abc", variant="328", gpu="NVIDIA H100", capability="9.0", torch="2.11",
                torch_tensorrt="2.11", tensorrt="10.13", precision="fp16", profile=[1, 24, 32])
    keys = {cache_key(**base)}
    for field, other in dict(checkpoint="abd", variant="160", gpu="NVIDIA H200", capability="8.9",
                             torch="2.12", torch_tensorrt="2.12", tensorrt="10.14", precision="bf16",
                             profile=[1, 16, 32]).items():
        keys.add(cache_key(**{**base, field: other}))
    assert len(keys) == 10
    assert cache_key(**base) == cache_key(**dict(reversed(list(base.items()))))


def test_engine_cache_hits_and_rebuilds_corrupt_entries(tmp_path, caplog):
    """The cache with real torch.export ExportedPrograms (what torch_tensorrt.save writes)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    example = (torch.rand(2, 4),)
    builds = []

    def build():
        builds.append(1)
        return torch.export.export(net, example)

    cache = EngineCache(tmp_path)
    args = dict(save=lambda p, path: torch.export.save(p, path), load=lambda path: torch.export.load(path),
                meta={"what": "test"})
    first = cache.get_or_build("k1", "net", build, **args)
    second = cache.get_or_build("k1", "net", build, **args)
    assert len(builds) == 1
    torch.testing.assert_close(second.module()(*example), first.module()(*example))
    cache.path("k1", "net").write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING):
        third = cache.get_or_build("k1", "net", build, **args)
    assert len(builds) == 2 and "unusable" in caplog.text and "rebuilding" in caplog.text
    torch.testing.assert_close(third.module()(*example), net(*example))
    cache.get_or_build("k2", "net", build, **args)
    assert len(builds) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT path needs torch_tensorrt and CUDA: {TRT_WHY}")
def test_tensorrt_fp16_engine_is_cached(tmp_path, weights):
    config = EngineConfig.from_dict({"backend": "tensorrt", "cache_dir": str(tmp_path), "opt_batch": 4,
                                     "max_batch": 8})
    net = load_generator(weights["328"])
    shapes = [(6, 320, 320), (32, 16, 16)]
    before = BUILDS["tensorrt"]
    engine = build_engine(net, shapes, config, "cuda", "g", {"checkpoint": "x"})
    assert BUILDS["tensorrt"] == before + 1 and engine.max_error <= 2e-2
    build_engine(load_generator(weights["328"]), shapes, config, "cuda", "g", {"checkpoint": "x"})
    assert BUILDS["tensorrt"] == before + 1  # second load hit the cache


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend,extra", [("eager", {}), ("compile", {"cuda_graphs": False}), ("compile", {})])
def test_cuda_backends_match_eager(weights, backend, extra):
    config = EngineConfig.from_dict({"backend": backend, "batch_buckets": [1, 8], "max_batch": 8,
                                     "opt_batch": 8, **extra})
    net = load_generator(weights["328"])
    engine = build_engine(net, [(6, 320, 320), (32, 16, 16)], config, "cuda", "g")
    assert engine.precision == "fp16" and engine.max_error <= 2e-2


class _CountingEncoder(AudioEncoder):
    """The audio encoder counting the forward passes run on it (its engine's copy counts its own)."""
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_eager_reference_is_computed_once_per_weights_and_probe(tmp_path):
    """The gate's eager fp32 output is cached by the weights' digest and the probe: a second load of the same
    checkpoint holds its engine to the stored output without running eager again; a changed probe or checkpoint
    digest computes it anew, and an engine that drifts from it is still refused."""
    config = EngineConfig.from_dict({"backend": "eager", "cache_dir": str(tmp_path)})
    gates = []
    for digest, seed in [("a" * 64, 3), ("a" * 64, 3), ("b" * 64, 3), ("a" * 64, 4)]:
        torch.manual_seed(0)  # the same weights every time
        net = _CountingEncoder().eval()
        probe = [torch.rand(2, 1, 80, 16, generator=torch.Generator().manual_seed(seed)) * 8 - 4]
        engine = build_engine(net, [(1, 80, 16)], config, "cpu", "encoder", {"checkpoint": digest}, probe=probe)
        gates.append((net.calls, engine.max_error))
    assert [calls for calls, _ in gates] == [1, 0, 1, 1]
    assert gates[0][1] == gates[1][1] <= 1e-4
    assert len(list(tmp_path.glob("encoder-reference-*/output.pt"))) == 3
    torch.manual_seed(1)  # other weights under a digest already measured: held to the stored output, refused
    with pytest.raises(EngineError, match="refusing it"):
        build_engine(_CountingEncoder().eval(), [(1, 80, 16)], config, "cpu", "encoder", {"checkpoint": "a" * 64},
                     probe=probe)


def test_an_unwritable_cache_does_not_stop_an_eager_engine(tmp_path, caplog):
    """The eager backend needs no file: where the cache directory cannot be made, the gate's reference is computed
    (and the engine held to it) with a warning, as before the reference was cached."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory would be")
    config = EngineConfig.from_dict({"backend": "eager", "cache_dir": str(blocked / "engines")})
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        engine = build_engine(_CountingEncoder().eval(), [(1, 80, 16)], config, "cpu", "encoder",
                              {"checkpoint": "c" * 64})
    assert engine.max_error <= 1e-4 and "cannot be cached" in caplog.text
