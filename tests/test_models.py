"""Networks against the checkpoint key lists of SPEC §4/§6, round trips, and the loader's error messages."""
from __future__ import annotations

import pytest
import torch
from conftest import SPEC

from lipsync.model.networks import (
    AudioEncoder,
    CheckpointError,
    Generator,
    load_audio_encoder,
    load_generator,
    parameter_count,
)


def spec_keys(name: str) -> list[tuple[str, list[int]]]:
    rows = [line.split("\t") for line in (SPEC / name).read_text().splitlines() if line]
    return [(k, eval(shape)) for k, shape, _ in rows]


@pytest.mark.parametrize("variant", ["328", "160"])
def test_generator_matches_spec_key_list(variant):
    state = Generator(variant).state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == spec_keys(f"synctalk2d_{variant}_state_dict.tsv")


def test_parameter_counts_match_spec():
    assert parameter_count(Generator("328")) == 12_186_935
    assert parameter_count(AudioEncoder()) == 2_812_672
    assert [(k, list(v.shape)) for k, v in AudioEncoder().state_dict().items()] == \
        spec_keys("audio_encoder_state_dict.tsv")


@pytest.mark.parametrize("variant,size", [("328", 320), ("160", 160)])
def test_generator_round_trip(weights, variant, size):
    torch.manual_seed(0)
    reference = Generator(variant).eval()
    loaded = load_generator(weights[variant], variant)
    visual, audio = torch.rand(2, 6, size, size), torch.rand(2, 32, 16, 16)
    with torch.no_grad():
        out = loaded(visual, audio)
        torch.testing.assert_close(out, reference(visual, audio), atol=0, rtol=0)
    assert out.shape == (2, 3, size, size) and bool(((out > 0) & (out < 1)).all())


def test_encoder_with_and_without_prefix(weights, tmp_path):
    plain = load_audio_encoder(weights["encoder"])  # stored without the prefix, like SyncTalk_2D's file
    prefixed = tmp_path / "prefixed.pth"
    torch.save(plain.state_dict(), prefixed)
    assert next(iter(torch.load(prefixed))).startswith("audio_encoder.")
    again = load_audio_encoder(prefixed)
    x = torch.randn(3, 1, 80, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), plain(x), atol=0, rtol=0)
        assert again(x).shape == (3, 512) and bool((again(x) >= 0).all())


def test_wrong_variant_is_named(weights):
    with pytest.raises(CheckpointError, match="looks like the 160 variant"):
        load_generator(weights["160"], "328")


def test_missing_and_misshaped_keys_are_listed(weights, tmp_path):
    state = torch.load(weights["328"])
    del state["outc.conv.bias"]
    state["inc.inconv.0.conv.0.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        load_generator(bad)
    text = str(err.value)
    assert str(bad) in text and "1 missing keys (outc.conv.bias)" in text
    assert "1 unexpected keys (extra.weight)" in text and "inc.inconv.0.conv.0.weight: file (3, 3)" in text


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a pickle")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_generator(junk)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_generator(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_audio_encoder(tmp_path / "list.pth")


def test_swapped_files_are_recognised(weights):
    with pytest.raises(CheckpointError, match="AudioEncoder checkpoint, not a generator"):
        load_generator(weights["encoder"])
    with pytest.raises(CheckpointError, match="generator checkpoint, not an audio encoder"):
        load_audio_encoder(weights["328"])
