"""Shared fixtures: real (seeded, untrained) checkpoints and small synthetic avatars written to temp dirs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync.model.demo import make_avatar, make_weights
from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import ModelSpec, load_pipeline

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "tests" / "data" / "spec"  # the key lists of SPEC §4/§6
SPEECH = ROOT / "assets" / "speech.wav"

torch.set_num_threads(max(1, torch.get_num_threads()))


def decoded(jpeg: bytes) -> torch.Tensor:
    """JPEG bytes → float RGB [3,H,W] (torchvision's decoder)."""
    from torchvision.io import decode_jpeg
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def worst_psnr(a: list, b: list) -> float:
    """The lowest PSNR between frames (anything with `.jpeg`) of two renders, frame by frame."""
    assert len(a) == len(b)
    return min(psnr(decoded(x.jpeg), decoded(y.jpeg)) for x, y in zip(a, b))


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("weights")
    g328, enc = make_weights(out, "328", seed=0)
    g160, _ = make_weights(out / "v160", "160", seed=0)
    return {"328": g328, "160": g160, "encoder": enc}


@pytest.fixture(scope="session")
def tiny_avatar(tmp_path_factory) -> Path:
    """6 frames, 256×192, avatar-directory layout."""
    return make_avatar(tmp_path_factory.mktemp("avatar"), frames=6, width=256, height=192)


@pytest.fixture(scope="session")
def synctalk_dataset(tmp_path_factory) -> Path:
    """5 frames in SyncTalk_2D's full_body_img/ + landmarks/ layout."""
    return make_avatar(tmp_path_factory.mktemp("dataset"), frames=5, width=256, height=192, layout="synctalk")


@pytest.fixture(scope="session")
def speech() -> torch.Tensor:
    from lipsync.codec.audio import load_wav
    return load_wav(SPEECH)


@pytest.fixture(scope="session")
def speech_1s_wav(tmp_path_factory, speech) -> Path:
    """The first second of assets/speech.wav as a 16 kHz s16 WAV: enough speech for CLI round trips."""
    import wave

    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes((speech[:16000].numpy() * 32767).astype(np.int16).tobytes())
    return path


@pytest.fixture(scope="session")
def tiny_spec(weights, tiny_avatar) -> ModelSpec:
    """The seeded 328 model on the tiny avatar."""
    return ModelSpec.from_dict("t", {"checkpoint": weights["328"], "audio_encoder": weights["encoder"],
                                     "avatar": tiny_avatar})


@pytest.fixture(scope="session")
def eager_pipeline(tiny_spec):
    """`tiny_spec` loaded on the CPU with the eager engine and 4-frame micro-batches: the reference the other
    engines are held to, and the all-torch path whose host copies test_pipeline guards."""
    return load_pipeline(tiny_spec, EngineConfig.from_dict({"backend": "eager"}), "cpu", micro_batch=4)


@pytest.fixture(scope="session")
def pipeline(tiny_spec):
    """`tiny_spec` on the CPU with the onnxruntime engine and 4-frame micro-batches, for the tests of what runs
    around the engine (scheduling, streams, live sessions): eager's frames (95 dB) for a quarter of its CPU."""
    return load_pipeline(tiny_spec, EngineConfig.from_dict({"backend": "onnxruntime"}), "cpu", micro_batch=4)


# Files in the order `make test` hands them to its workers (pytest-xdist --dist loadfile --no-loadscope-reorder):
# the longest first, so that no worker starts a long file while the others are finishing (longest processing time
# first), as ranked by their seconds in a `make test` on a 2-core EPYC (2026-12-07, AVX-512); files not listed
# follow in their usual order.
LONGEST_FIRST = ["test_live.py", "test_docs.py", "test_light_client.py", "test_security.py", "test_cluster.py",
                 "test_hardening.py", "test_server.py", "test_web.py", "test_engines.py", "test_demo_model.py",
                 "test_autotune.py", "test_device_discipline.py", "test_gpu_rehearsal.py", "test_render.py",
                 "test_pipeline.py", "test_pipecat.py", "test_livekit.py",
                 "test_scheduler.py", "test_streaming.py", "test_registry.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
