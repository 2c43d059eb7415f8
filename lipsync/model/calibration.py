"""Calibration inputs for int8 engines: the avatar's own frames with audio features of speech-like sound.

Post-training quantization sets each activation's int8 range from what the network sees on these inputs, so they
must look like serving: the model's real crops (every part of the avatar's loop) and audio features spanning
silence, voiced vowels and fricative noise. The sound is synthesised (seeded, no files needed): a gliding glottal
pulse train through two moving formant resonances, in syllables of ~200 ms with pauses, plus noise bursts.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lipsync.model.audio_features import Encoder, frame_features
from lipsync.timebase import SAMPLE_RATE

# Names how calibration inputs are made (the sound, its length, the pairing): bumped when any of it changes, since
# a cached int8 model is found by this and the inputs' sources, not by the inputs themselves.
CALIBRATION_RECIPE = 1


def speech_like(seconds: float, seed: int = 0, start: float = 0.0) -> Tensor:
    """[N] float32 16 kHz mono in [-1, 1]: voiced syllables, fricatives and pauses, from `start` seconds into the
    sound (its pitch and vowels glide at rates of their own, so a later start is other speech)."""
    generator = torch.Generator().manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    t = start + torch.arange(n) / SAMPLE_RATE
    f0 = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t)  # pitch glides between 80 and 160 Hz
    phase = torch.cumsum(2 * math.pi * f0 / SAMPLE_RATE, 0)
    pulses = sum(torch.sin(k * phase) / k for k in range(1, 30))  # a glottal-like harmonic series
    voiced = torch.zeros(n)
    for formant, rate, width in ((700.0, 2.1, 300.0), (1700.0, 1.3, 600.0)):
        centre = formant + width * torch.sin(2 * math.pi * rate * t)  # the vowel moves
        voiced += _resonate(pulses, centre)
    noise = torch.randn(n, generator=generator) * 0.3
    syllable = (torch.sin(2 * math.pi * 2.5 * t).clamp(min=0) ** 0.5)  # ~200 ms syllables, then a pause
    fricative = (torch.sin(2 * math.pi * 0.9 * t + 1.0) > 0.85).float()  # short noise bursts ("s", "f")
    wave = voiced * syllable + noise * fricative
    return (0.5 * wave / wave.abs().max().clamp(min=1e-6)).float()


def _resonate(source: Tensor, centre: Tensor) -> Tensor:
    """A crude moving band-pass: the source modulated by a cosine at the centre frequency, smoothed."""
    phase = torch.cumsum(2 * math.pi * centre / SAMPLE_RATE, 0)
    carrier = torch.cos(phase)
    kernel = torch.hann_window(33)
    kernel = kernel / kernel.sum()
    smoothed = torch.nn.functional.conv1d((source * carrier)[None, None], kernel[None, None], padding=16)[0, 0]
    return smoothed * carrier


def probe_features(encoder: Encoder, count: int) -> Tensor:
    """[count,D,16,16] audio features of speech-like sound the calibration never saw (another seed, from 3 s in):
    the accuracy gate's audio, so that reduced precisions are judged on what the encoder produces in serving.
    Seeded unit noise there (std 1.0 against 0.5–0.6 for speech) put the trained demo's int8 engine at 36 dB in
    the mouth zone, against 41 dB on speech."""
    with torch.inference_mode():
        features = frame_features(speech_like((count + 4) / 25, seed=1, start=3.0), encoder).float()
    return features[-count:]


def calibration_inputs(model_inputs: Tensor, encoder: Encoder, count: int) -> list[list[Tensor]]:
    """`count` generator inputs [[1,6,S,S], [1,D,16,16]]: `model_inputs` (the avatar's visual inputs, spread over
    its frames) paired with the features of consecutive frames of speech-like sound."""
    with torch.inference_mode():
        features = frame_features(speech_like(count / 25 + 1.0), encoder).float().cpu()
    visual = model_inputs.float().cpu()
    return [[visual[i % visual.shape[0]][None], features[i % features.shape[0]][None]] for i in range(count)]
