"""Engine selection by measurement: the fastest candidate that passes the accuracy gate wins, the decision is
cached per machine, and a tuned pipeline renders the same frames as the eager one."""
from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import pytest
import torch
from conftest import worst_psnr
from torch import nn

from lipsync.model import autotune
from lipsync.model.engines import (
    BUILDS,
    Engine,
    EngineConfig,
    build_engine,
    cpu_bf16_supported,
    cpu_int8_dot_product,
    psnr_8bit,
)
from lipsync.model.pipeline import encoder_config, load_pipeline
from lipsync.runtime.render import synthesize

SHAPES = [(3, 16, 16)]


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1),
                         nn.Sigmoid()).eval()


def config(tmp_path, **extra) -> EngineConfig:
    """Tuning on this (shared, loaded) machine; decisions final whatever the load (tune_max_load 1), except where a
    test asks otherwise."""
    return EngineConfig.from_dict({"backend": "auto", "cache_dir": str(tmp_path), "tune_seconds": 0.2,
                                   "tune_batches": {"cpu": [1, 2]}, "tune_max_load": 1.0, **extra})


class Builds:
    """build_engine, counted per candidate, with `delay_s` added to every call of the engines of `slow`."""

    def __init__(self, slow: str = "", delay_s: float = 0.02):
        self.slow, self.delay_s, self.count = slow, delay_s, {}

    def __call__(self, net, shapes, cfg, device, name, key_parts, **kwargs):
        candidate = f"{cfg.backend}/{cfg.precision}"
        self.count[candidate] = self.count.get(candidate, 0) + 1
        engine = build_engine(net, shapes, cfg, device, name, key_parts, **kwargs)
        if candidate == self.slow:
            run = engine._run

            def slowed(*inputs):
                time.sleep(self.delay_s)
                return run(*inputs)
            engine._run = slowed
        return engine


@pytest.mark.parametrize("slow", ["onnxruntime/fp32", "eager/fp32"])
def test_a_slower_candidate_is_never_chosen(tmp_path, slow):
    # probe_margin 1: every candidate is timed at every batch, however slow its probe
    cfg = config(tmp_path, candidates={"cpu": ["onnxruntime/fp32", "eager/fp32"]}, probe_margin=1.0)
    builds = Builds(slow, delay_s=0.1)  # far beyond what busy cores add to the small net's calls (seen: 20 ms)
    engine, decision = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 1},
                                             build=builds)
    fast = ({"onnxruntime/fp32", "eager/fp32"} - {slow}).pop()
    assert f"{decision.backend}/{decision.precision}" == fast and engine.backend == decision.backend
    rates = {(r["candidate"], r["batch"]): r["frames_per_s"] for r in decision.measured}
    assert set(rates) == {(c, b) for c in ("onnxruntime/fp32", "eager/fp32") for b in (1, 2)}
    assert max(v for (c, _), v in rates.items() if c == slow) < rates[(fast, decision.batch)]
    x = torch.rand(3, *SHAPES[0])
    torch.testing.assert_close(engine(x), small_net()(x), atol=1e-5, rtol=1e-5)


def test_a_candidate_far_slower_at_the_probe_is_built_gated_but_not_timed(tmp_path, caplog):
    cfg = config(tmp_path, candidates={"cpu": ["eager/fp32", "onnxruntime/fp32"]})  # probe_margin 0.3
    builds = Builds("eager/fp32", delay_s=0.05)  # ~100x the small net's own time per call
    with caplog.at_level(logging.INFO, logger="lipsync.model.autotune"):
        engine, decision = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 5},
                                                 build=builds)
    assert builds.count == {"eager/fp32": 1, "onnxruntime/fp32": 1}  # both built (and gated) once
    assert (decision.backend, engine.backend) == ("onnxruntime", "onnxruntime")
    eager = [r for r in decision.measured if r["candidate"] == "eager/fp32"]
    assert len(eager) == 1 and "frames_per_s" not in eager[0] and eager[0]["probe_frames_per_s"] < 25
    assert "more than 30% slower" in eager[0]["skipped"]
    timed = [(r["candidate"], r["batch"]) for r in decision.measured if "frames_per_s" in r]
    assert timed == [("onnxruntime/fp32", 1), ("onnxruntime/fp32", 2)]
    assert "not timed (slower at the probe): eager/fp32" in caplog.text


def test_decide_prefers_earlier_and_smaller_on_ties():
    rows = [{"candidate": "a", "batch": 1, "frames_per_s": 10.0}, {"candidate": "a", "batch": 4, "frames_per_s": 10.4},
            {"candidate": "b", "batch": 1, "frames_per_s": 10.2}, {"candidate": "c", "refused": "gate"},
            {"candidate": "b", "batch": 4, "frames_per_s": 11.0}]
    assert autotune.decide(rows, 0.05) == rows[4]  # 11.0 > 10.0 * 1.05; 10.4 and 10.2 are within the margin
    assert autotune.decide(rows[:4], 0.05) == rows[0]
    assert autotune.decide([{"candidate": "c", "refused": "gate"}], 0.05) is None


def test_a_candidate_failing_the_accuracy_gate_is_refused(tmp_path, caplog):
    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16, so the bf16 candidate is skipped before its gate")
    cfg = config(tmp_path, candidates={"cpu": ["eager/bf16", "eager/fp32"]}, tolerance={"bf16": 0.0})
    with caplog.at_level(logging.INFO, logger="lipsync.model.autotune"):
        engine, decision = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 2})
    assert (decision.backend, decision.precision) == ("eager", "fp32") and engine.precision == "fp32"
    refused = [r for r in decision.measured if r["candidate"] == "eager/bf16"]
    assert len(refused) == 1 and "differs from eager fp32" in refused[0]["refused"]
    # said at INFO (the gate refusing a precision is an outcome of tuning, not a fault to warn of)
    assert [r.levelname for r in caplog.records if "not eager/bf16" in r.getMessage()] == ["INFO"]


def test_reduced_precision_needs_the_psnr_bound(tmp_path):
    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16")
    net = small_net()
    ok = build_engine(net, SHAPES, EngineConfig.from_dict({"backend": "eager", "precision": "bf16"}), "cpu")
    assert 40 <= ok.psnr_db
    with pytest.raises(Exception, match="dB PSNR from eager fp32"):
        build_engine(net, SHAPES, EngineConfig.from_dict({"backend": "eager", "precision": "bf16",
                                                          "min_psnr_db": 1000.0}), "cpu")


def test_psnr_8bit_matches_opencv():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 32, 32), dtype=np.float32)
    b = np.clip(a + rng.normal(0, 0.01, a.shape).astype(np.float32), 0, 1)
    to8 = [np.round(np.clip(x, 0, 1) * 255).astype(np.uint8) for x in (a, b)]
    assert psnr_8bit(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(cv2.PSNR(*to8), abs=1e-6)


def test_the_decision_is_reused_and_invalidated_with_the_machine(tmp_path, monkeypatch, caplog):
    cfg = config(tmp_path, candidates={"cpu": ["eager/fp32", "onnxruntime/fp32"]})
    builds = Builds()
    first = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 3}, build=builds)[1]
    assert builds.count == {"eager/fp32": 1, "onnxruntime/fp32": 1}
    assert len(list((tmp_path / "decisions").glob("*.json"))) == 1
    chosen = f"{first.backend}/{first.precision}"
    with caplog.at_level(logging.INFO, logger="lipsync.model.autotune"):
        again = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 3},
                                      build=builds)[1]
    assert again == first and builds.count[chosen] == 2 and sum(builds.count.values()) == 3  # only the winner
    assert "measured earlier on this machine" in caplog.text
    real_key = autotune.machine_key
    monkeypatch.setattr(autotune, "machine_key", lambda device: {**real_key(device), "cpu": "another CPU"})
    moved = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 3}, build=builds)[1]
    assert moved.key != first.key and sum(builds.count.values()) == 5  # both candidates measured again
    assert len(list((tmp_path / "decisions").glob("*.json"))) == 2
    other_model = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 4},
                                        build=builds)[1]
    assert other_model.key not in (first.key, moved.key)


def test_a_decision_measured_on_a_busy_machine_is_provisional_until_a_quiet_load(tmp_path, monkeypatch, caplog):
    """Two processes keep both cores busy while the candidates are timed: the decision records the load and is kept
    as provisional (with a WARNING). A later load on a quiet machine measures again and keeps that decision as
    final; `retune` measures again whatever is cached."""
    import subprocess
    import sys
    cfg = config(tmp_path, candidates={"cpu": ["eager/fp32", "onnxruntime/fp32"]}, tune_max_load=0.25,
                 tune_seconds=0.6)
    builds = Builds()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        with caplog.at_level(logging.WARNING, logger="lipsync.model.autotune"):
            first = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 7},
                                          build=builds)[1]
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert first.provisional and first.machine_load > 0.25, (first.provisional, first.machine_load)
    assert "kept as provisional" in caplog.text
    assert all(len(r["rounds_frames_per_s"]) == autotune.TUNE_ROUNDS for r in first.measured if "batch" in r)
    # the machine is quiet now (as read at load; held to 0 here: this shared machine is never quiet on demand)
    monkeypatch.setattr(autotune, "machine_load_now", lambda seconds=0.5: 0.0)
    monkeypatch.setattr(autotune.MachineLoad, "share", lambda self: 0.0)
    with caplog.at_level(logging.INFO, logger="lipsync.model.autotune"):
        again = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 7},
                                      build=builds)[1]
    assert "measured again now that it is quiet" in caplog.text
    assert sum(builds.count.values()) == 4 and not again.provisional and again.machine_load == 0.0
    third = autotune.tuned_engine(small_net(), SHAPES, cfg, torch.device("cpu"), "small", {"v": 7}, build=builds)[1]
    assert third == again and sum(builds.count.values()) == 5  # final: only the winner is built
    retuned = autotune.tuned_engine(small_net(), SHAPES, EngineConfig.from_dict({**vars(cfg), "retune": True}),
                                    torch.device("cpu"), "small", {"v": 7}, build=builds)[1]
    assert sum(builds.count.values()) == 7 and retuned.key == again.key


def test_openvino_engines_against_eager(tmp_path):
    net = small_net()
    x = torch.rand(3, *SHAPES[0])
    fp32 = build_engine(net, SHAPES, EngineConfig.from_dict({"backend": "openvino", "cache_dir": str(tmp_path)}),
                        "cpu")
    assert (fp32.backend, fp32.precision) == ("openvino", "fp32") and fp32.max_error <= 1e-3
    assert any((tmp_path / "openvino").glob("*.blob")), "OpenVINO's compiled-model cache (CACHE_DIR) is empty"
    torch.testing.assert_close(fp32(x), net(x), atol=1e-5, rtol=1e-5)
    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16: the openvino/bf16 candidate is skipped")
    bf16 = build_engine(net, SHAPES, EngineConfig.from_dict({"backend": "openvino", "precision": "bf16",
                                                             "cache_dir": str(tmp_path)}), "cpu")
    assert bf16.psnr_db >= 40 and bf16(x).dtype == torch.float32 and bf16(x).shape == x.shape
    assert psnr_8bit(bf16(x), net(x)) >= 40


def test_the_audio_encoder_follows_the_generators_onnx_runtime_in_fp32():
    auto = EngineConfig.from_dict({"backend": "auto", "max_batch": 2, "opt_batch": 2})  # sized to the micro-batch
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)

    def generator(backend: str, precision: str, device=cpu) -> Engine:
        return Engine("g", backend, precision, device, 2, lambda *x: x[0], torch.float32, False)
    for backend, precision in (("openvino", "bf16"), ("onnxruntime", "fp32"), ("eager", "bf16")):
        chosen = encoder_config(auto, generator(backend, precision), cpu, 32)
        assert (chosen.backend, chosen.precision, chosen.max_batch) == (backend, "fp32", 32)
    pinned = EngineConfig.from_dict({"backend": "eager", "precision": "bf16", "max_batch": 4, "opt_batch": 4})
    assert encoder_config(pinned, generator("eager", "bf16"), cpu, 32) == pinned  # a pinned engine is the user's
    assert encoder_config(auto, generator("tensorrt", "fp16", cuda), cuda, 32) == auto


@pytest.mark.slow
def test_a_tuned_pipeline_renders_the_eager_frames(tiny_spec, eager_pipeline, speech, tmp_path):
    cfg = config(tmp_path, candidates={"cpu": ["openvino/fp32", "eager/fp32"]}, tune_seconds=0.5)
    tuned = load_pipeline(tiny_spec, cfg, "cpu")
    assert tuned.micro_batch in (1, 2) and tuned.generator.backend in ("openvino", "eager")
    assert tuned.generator.max_error <= 1e-3
    assert tuned.encoder.backend == tuned.generator.backend and tuned.encoder.precision == "fp32"
    wave = speech[:8000]  # 11 frames
    reference = synthesize(eager_pipeline, wave).frames
    assert worst_psnr(synthesize(tuned, wave).frames, reference) >= 40
    pinned = load_pipeline(tiny_spec, EngineConfig.from_dict({**vars(cfg), "backend": "onnxruntime"}), "cpu", 2)
    assert pinned.generator.backend == "onnxruntime" and pinned.micro_batch == 2
    assert worst_psnr(synthesize(pinned, wave).frames, reference) >= 40
    if cpu_bf16_supported():  # reduced precision: the frames stay within 40 dB of the fp32 ones
        bf16 = load_pipeline(tiny_spec, EngineConfig.from_dict({**vars(cfg), "backend": "openvino",
                                                                "precision": "bf16"}), "cpu", 2)
        assert bf16.generator.precision == "bf16" and bf16.generator.psnr_db >= 40
        assert worst_psnr(synthesize(bf16, wave).frames, reference) >= 40


def test_openvino_int8_is_quantized_once_cached_and_gated_in_the_mouth_zone(tmp_path, capfd):
    """...and quantizing writes nothing on stdout, which carries only `lipsync serve`'s READY line (NNCF's
    progress bar there once kept a cold server from being seen ready)."""
    pytest.importorskip("nncf", reason="nncf is not installed")
    torch.manual_seed(0)  # six convolutions: the first and last two stay in floating point, two are quantized
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Conv2d(16, 3, 3, padding=1), nn.Sigmoid()).eval()
    generator = torch.Generator().manual_seed(3)
    calibration = [[torch.rand(1, *SHAPES[0], generator=generator)] for _ in range(8)]
    cfg = EngineConfig.from_dict({"backend": "openvino", "precision": "int8", "cache_dir": str(tmp_path),
                                  "min_psnr_db": 20})
    before = BUILDS["openvino-int8"]
    engine = build_engine(net, SHAPES, cfg, "cpu", "small", {"v": 6}, calibration=calibration)
    again = build_engine(net, SHAPES, cfg, "cpu", "small", {"v": 6}, calibration=calibration)
    assert BUILDS["openvino-int8"] == before + 1  # the second build read the cached IR
    assert capfd.readouterr().out == ""
    assert engine.precision == "int8" and 20 <= engine.mouth_psnr_db < 200 and 20 <= engine.psnr_db
    x = torch.rand(2, *SHAPES[0], generator=generator)
    assert torch.equal(engine(x), again(x))
    assert psnr_8bit(engine(x), net(x)) >= 20
    strict = EngineConfig.from_dict({"backend": "openvino", "precision": "int8", "cache_dir": str(tmp_path),
                                     "min_psnr_db": 1000})
    with pytest.raises(Exception, match="in the mouth zone"):
        build_engine(net, SHAPES, strict, "cpu", "small", {"v": 6}, calibration=calibration)
    with pytest.raises(Exception, match="int8 runs on the openvino backend only"):
        build_engine(net, SHAPES, EngineConfig.from_dict({"backend": "eager", "precision": "int8"}), "cpu")


def test_int8_is_offered_to_auto_only_where_the_cpu_has_int8_dot_products():
    ok, why = autotune.available("openvino/int8", torch.device("cpu"))
    assert ok == cpu_int8_dot_product()
    assert ok or "no int8 dot-product instructions" in why
    config = encoder_config(EngineConfig.from_dict({"backend": "openvino", "precision": "int8"}), None,
                            torch.device("cpu"), 32)
    assert config.precision == "fp32"  # the audio encoder is never quantized: features are compared exactly
