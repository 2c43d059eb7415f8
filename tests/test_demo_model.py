"""The shipped demo presenter (assets/demo_model, trained by train/) on speech it never heard: tests/data/
heldout-speech.wav is 2 s of the evaluation set (the held-out voice en-gb-scotland+f5 saying a held-out sentence).
The mouth it paints must follow the oracle's (openness read from the images the same way on both sides), silence
must keep it shut, and the pasted square must not show (benchmarks/bench_seam.py's metrics, issue 26)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync.codec.audio import load_audio, load_wav
from lipsync.config import SOURCE_ROOT
from lipsync.model import presenter
from lipsync.model.audio_features import frame_features
from lipsync.model.calibration import probe_features
from lipsync.model.engines import EngineConfig
from lipsync.model.networks import load_audio_encoder, load_generator, parameter_count
from lipsync.model.pipeline import ModelSpec, load_pipeline

sys.path.insert(0, str(SOURCE_ROOT / "benchmarks"))
import bench_seam  # noqa: E402

MODEL = SOURCE_ROOT / "assets" / "demo_model"
HELDOUT = Path(__file__).resolve().parent / "data" / "heldout-speech.wav"
SHUT = 0.03  # measured openness of a shut mouth is ≈ 0.013; openness 0.1 reads ≈ 0.039
MOUTH_ZONE = (0.2, 0.1, 0.8, 0.8)  # square-relative box the blotch leaves out (bench_seam's default)
RIDGE = 1.0  # grey levels: the outline of the square above JPEG's own error outside it (issue 26)
BLOTCH = 10.0  # grey levels: the largest 8×8 mean |output − avatar| inside the square, outside the mouth zone


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory):
    return presenter.write_avatar(tmp_path_factory.mktemp("presenter"), frames=30)


def demo_pipeline(avatar: Path, compose: str):
    spec = ModelSpec.from_dict("demo", {"checkpoint": MODEL / "generator_328.pth",
                                        "audio_encoder": MODEL / "audio_visual_encoder.pth", "avatar": avatar,
                                        "sequence": "loop", "compose": compose})
    # OpenVINO fp32 (the ONNX export is cached per checkpoint): 3x eager's speed here, same frames within 1e-3
    return load_pipeline(spec, EngineConfig.from_dict({"backend": "openvino"}), "cpu", micro_batch=4)


@pytest.fixture(scope="module")
def demo(avatar_dir):
    """The demo as conf/models/demo.yaml serves it: `compose: blend`."""
    return demo_pipeline(avatar_dir, "blend")


def openness(pipeline, wave: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """Render the speech on the avatar; the measured openness of every output frame and its avatar frame."""
    features = pipeline.features(wave)
    ids = pipeline.avatar.frames_for(0, 0, features.shape[0])
    measured = []
    with torch.no_grad():
        for k in range(0, len(ids), 4):
            frames = pipeline.compose(pipeline.infer(features[k:k + 4], ids[k:k + 4]), ids[k:k + 4])
            for frame, f in zip(frames, ids[k:k + 4]):
                measured.append(presenter.mouth_openness(frame.permute(1, 2, 0).numpy(), presenter.crop_rect(f)))
    return np.array(measured), ids


def test_shipped_weights_are_plain_synctalk_checkpoints():
    sizes = sum((MODEL / name).stat().st_size for name in ("generator_328.pth", "audio_visual_encoder.pth"))
    assert sizes <= 35 * 2**20
    raw = torch.load(MODEL / "generator_328.pth", map_location="cpu", weights_only=True)
    assert {v.dtype for v in raw.values() if v.is_floating_point()} == {torch.float16}
    assert parameter_count(load_generator(MODEL / "generator_328.pth")) == 12_186_935  # loads strictly (SPEC §6)
    load_audio_encoder(MODEL / "audio_visual_encoder.pth")


def oracle_openness(wave: torch.Tensor, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's openness parameter per frame and its frames' openness read like the model's."""
    target_open, target_width = presenter.mouth_track(wave.numpy(), len(ids))
    read = np.array([presenter.mouth_openness(presenter.render(f, float(o), float(w)), presenter.crop_rect(f))
                     for f, o, w in zip(ids, target_open, target_width)])
    return target_open, read


@pytest.fixture(scope="module")
def spoken(demo):
    """Held-out speech between 0.75 s pauses, rendered once: measured openness, oracle parameter, oracle read."""
    pause = torch.zeros(12000)
    wave = torch.cat([pause, load_wav(HELDOUT), pause])
    predicted, ids = openness(demo, wave)
    target, oracle = oracle_openness(wave, ids)
    return predicted, target, oracle


def test_mouth_opens_with_held_out_speech_and_shuts_in_its_pauses(spoken):
    predicted, target, _ = spoken
    speaking, silent = target > 0.3, target < 0.02
    assert speaking.sum() > 25 and silent.sum() > 20
    assert (predicted[silent] < SHUT).mean() >= 0.9  # shut in the pauses (the edges of speech may lag a frame)
    assert np.median(predicted[speaking]) > 0.08  # open while the speech is voiced


def test_mouth_follows_each_sound_of_held_out_speech(spoken):
    predicted, target, oracle = spoken
    speech = slice(19, len(predicted) - 19)  # the 2 s of speech, without the pauses around it
    assert oracle[speech].std() > 0.03  # the clip has open and shut moments
    assert np.corrcoef(predicted[speech], oracle[speech])[0, 1] >= 0.7


def test_silence_keeps_the_mouth_shut(demo):
    predicted, _ = openness(demo, torch.zeros(16000))
    # frame 0's features begin with eight zero rows (SPEC §5): the recipe's finishing stage taught it they say
    # nothing (before it, a parted-lip slit read ≈ 0.047 there)
    assert (predicted < SHUT).all(), predicted.round(3)


def recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_train", SOURCE_ROOT / "train" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def test_whole_utterance_edges_zero_exactly_the_first_or_last_frames_rows():
    import random

    recipe = recipe_module()
    features = torch.ones(64, 32, 16, 16)
    rows = recipe.utterance_edges(features, 1.0, random.Random(0), full=1.0).reshape(64, 16, 512)
    zero = rows.abs().sum(2) == 0
    leading, trailing = zero[:, :8].all(1) & ~zero[:, 8:].any(1), zero[:, 9:].all(1) & ~zero[:, :9].any(1)
    assert (leading | trailing).all() and leading.any() and trailing.any()  # SPEC §5: frame 0 and the last frame
    assert torch.equal(recipe.utterance_edges(features, 0.0, random.Random(0), full=1.0), features)


def test_training_features_are_the_servers():
    """The recipe's batched features (train/train.py, encoder run on just the windows a batch needs) equal
    lipsync.model.audio_features.frame_features for the same frames, edges included: the model learns what it is
    served."""
    recipe = recipe_module()
    encoder = load_audio_encoder(MODEL / "audio_visual_encoder.pth").eval()
    wave = load_wav(HELDOUT)
    windows = recipe.mel_windows_of(wave)
    served = frame_features(wave, encoder)
    frames = [0, 1, 7, 8, 9, 30, served.shape[0] - 2, served.shape[0] - 1]
    with torch.no_grad():
        trained = recipe.batch_features(encoder, windows, frames)
    assert served.shape[0] == windows.shape[0] + 2
    rows = trained.reshape(len(frames), 16, 512)
    assert torch.equal(rows.abs().sum(2) == 0, served[frames].reshape(len(frames), 16, 512).abs().sum(2) == 0)
    torch.testing.assert_close(trained, served[frames], rtol=1e-5, atol=1e-5)  # batch composition may round


def seams(pipeline) -> dict:
    return bench_seam.measure(pipeline, load_wav(HELDOUT), MOUTH_ZONE, None)


def test_the_pasted_square_does_not_show(demo, avatar_dir):
    """Held-out speech rendered as the demo serves it: no outline along the square (ridge) and no spot outside the
    mouth (blotch); SyncTalk_2D's exact paste of the same model shows both, so the bounds can fail."""
    blended = seams(demo)
    assert blended["ridge"]["value"] <= RIDGE, blended["ridge"]
    assert blended["blotch"]["value"] <= BLOTCH, blended["blotch"]
    pasted = seams(demo_pipeline(avatar_dir, "paste"))
    assert pasted["ridge"]["value"] > 2 * RIDGE, pasted["ridge"]
    assert pasted["blotch"]["value"] > BLOTCH, pasted["blotch"]


def test_the_accuracy_gate_probes_with_speech_the_encoder_produces():
    """Reduced precisions are judged on speech features, not noise: the gate's probe lies, element by element,
    inside the range of the features of real speech (assets/speech.wav, espeak-ng) — 98 % of its values against
    39 % for the seeded unit noise it used before, on which the demo's int8 engine read 36 dB instead of 40."""
    encoder = load_audio_encoder(MODEL / "audio_visual_encoder.pth")
    with torch.inference_mode():
        speech = frame_features(load_audio(SOURCE_ROOT / "assets" / "speech.wav"), encoder).float()
    probe = probe_features(encoder, 2)
    inside = ((probe >= speech.amin(0)) & (probe <= speech.amax(0))).float().mean().item()
    assert probe.shape == (2, *speech.shape[1:]) and inside >= 0.9, inside
    assert 0.5 < probe.std().item() / speech.std().item() < 1.5
