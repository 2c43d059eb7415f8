"""Audio (SPEC §1–§5) against librosa and a plain NumPy transcription of the spec."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from conftest import SPEECH

from lipsync.codec import audio as A
from lipsync.model import audio_features
from lipsync.model.networks import AudioEncoder

librosa = pytest.importorskip("librosa", reason="the mel reference needs librosa (the dev extra)")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(3)
    net = AudioEncoder().eval()
    # Non-trivial batch-norm statistics so features differ between frames.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def librosa_mel(x: np.ndarray) -> np.ndarray:
    y = np.append(x[0], x[1:] - 0.97 * x[:-1]).astype(np.float32)
    spec = np.abs(librosa.stft(y, n_fft=800, hop_length=200, win_length=800, window="hann", center=True,
                               pad_mode="constant"))
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, basis @ spec)) - 20
    return np.clip(0.08 * db + 4, -4, 4).T


def numpy_features(mel: np.ndarray, encode) -> np.ndarray:
    """SPEC §3 and §5 transcribed literally."""
    m = mel.shape[0]
    d = int(np.floor((m - 16) * 25 / 80)) + 2
    windows = []
    for v in range(d):
        s = int(np.floor(80 * v / 25))
        if s + 16 > m:
            s = m - 16
        windows.append(mel[s:s + 16].T[None])
    e = encode(np.stack(windows))
    p = np.concatenate([e[:1], e, e[-1:]])
    out = np.zeros((d + 2, 16, 512), np.float32)
    for i in range(d + 2):
        for r, j in enumerate(range(i - 8, i + 8)):
            if 0 <= j < d + 2:
                out[i, r] = p[j]
    return out.reshape(d + 2, 32, 16, 16)


def test_mel_matches_librosa_on_speech(speech):
    ours = audio_features.melspectrogram(speech).numpy()
    ref = librosa_mel(speech.numpy())
    assert ours.shape == ref.shape == (1 + speech.numel() // 200, 80)
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("samples", [3000, 3001, 640 * 10 + 17, 640 * 37, 12345])
def test_features_match_numpy_transcription(encoder, samples):
    wave = torch.from_numpy(np.random.default_rng(samples).standard_normal(samples).astype(np.float32) * 0.1)
    mel = audio_features.melspectrogram(wave).numpy()
    with torch.no_grad():
        ref = numpy_features(mel, lambda w: encoder(torch.from_numpy(w)).numpy())
    ours = audio_features.frame_features(wave, encoder).numpy()
    assert ours.shape == ref.shape == (audio_features.frame_count(samples), 32, 16, 16)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # first frame: 8 zero rows then P[0..7]; last frame: P[D-7..D+1] then zeros
    assert np.all(ours[0].reshape(16, 512)[:8] == 0) and np.all(ours[-1].reshape(16, 512)[9:] == 0)


def test_short_audio_is_zero_padded_to_one_window(encoder):
    short = torch.full((1000,), 0.05)
    padded = torch.cat([short, torch.zeros(2000)])
    ours = audio_features.frame_features(short, encoder)
    assert ours.shape[0] == audio_features.frame_count(1000) == audio_features.window_count(16) + 2 == 4
    torch.testing.assert_close(ours, audio_features.frame_features(padded, encoder), atol=1e-6, rtol=0)


def test_final_windows_formula():
    for m in range(0, 400):
        brute = sum(1 for v in range(400) if 80 * v // 25 + 16 <= m)
        assert audio_features.final_windows(m) == brute


def _stream(encoder, wave, sizes):
    stream, chunks, pos, i = audio_features.FeatureStream(encoder), [], 0, 0
    while pos < wave.numel():
        n = sizes[i % len(sizes)]
        first, feats = stream.push(wave[pos:pos + n])
        assert first == sum(c.shape[0] for c in chunks)
        chunks.append(feats)
        pos, i = pos + n, i + 1
    chunks.append(stream.finish()[1])
    return torch.cat(chunks)


@pytest.mark.parametrize("sizes", [[16000], [1] * 50 + [4000], [7, 640, 1, 3333, 16000, 999], "random"])
def test_stream_equals_whole_utterance(encoder, speech, sizes):
    wave = speech[:32000]
    if sizes == "random":
        sizes = [int(s) for s in np.random.default_rng(7).integers(1, 9000, size=40)]
    whole = audio_features.frame_features(wave, encoder)
    torch.testing.assert_close(_stream(encoder, wave, sizes), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("samples", [1, 500, 2999, 3000, 3200])
def test_stream_very_short_audio(encoder, samples):
    wave = torch.linspace(-0.3, 0.3, samples)
    torch.testing.assert_close(_stream(encoder, wave, [1, 2, 100]), audio_features.frame_features(wave, encoder),
                               atol=1e-5, rtol=0)


def test_stream_emits_with_450ms_lookahead(encoder):
    stream = audio_features.FeatureStream(encoder)
    first, feats = stream.push(torch.zeros(640 * 10 + 7240))
    assert first == 0 and feats.shape[0] >= 10  # frame i is final once ≈640·i + 7240 samples arrived


def test_pcm_decoding():
    x = np.array([0, 16384, -32768, 32767], np.int16)
    wave = A.decode_pcm(x.tobytes(), A.AudioFormat("s16le", 16000, 1))
    np.testing.assert_array_equal(wave.numpy(), x / 32768.0)
    stereo = np.array([[0.5, -0.5], [0.25, 0.75]], np.float32)
    wave = A.decode_pcm(stereo.tobytes(), A.AudioFormat("f32le", 16000, 2))
    np.testing.assert_allclose(wave.numpy(), [0.0, 0.5])


@pytest.mark.parametrize("data,fmt,message", [
    (b"\x00" * 3, A.AudioFormat("s16le"), "not a multiple"),
    (b"", A.AudioFormat("s16le"), "empty"),
    (np.array([np.nan], np.float32).tobytes(), A.AudioFormat("f32le"), "NaN"),
    (np.array([np.inf], np.float32).tobytes(), A.AudioFormat("f32le"), "NaN or Inf"),
    (b"\x00" * 4, A.AudioFormat("s16le", 7999), "outside"),
    (b"\x00" * 4, A.AudioFormat("s16le", 96000), "outside"),
    (b"\x00" * 6, A.AudioFormat("s16le", 16000, 3), "channels"),
    (b"\x00" * 4, A.AudioFormat("mp3"), "encoding"),
])
def test_bad_pcm_is_rejected(data, fmt, message):
    with pytest.raises(A.AudioFormatError, match=message):
        A.decode_pcm(data, fmt)


def _wav(path, samples: np.ndarray, rate: int, channels: int, tag: int):
    data = samples.tobytes()
    bits = samples.dtype.itemsize * 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", len(data)) + data)


def test_wav_files_of_each_kind_are_resampled_like_librosa_inputs(tmp_path):
    t = np.arange(44100) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    _wav(tmp_path / "f.wav", np.stack([tone, tone], 1), 44100, 2, 3)
    _wav(tmp_path / "s.wav", (tone * 32767).astype(np.int16), 44100, 1, 1)
    for name in ("f.wav", "s.wav"):
        wave = A.load_wav(tmp_path / name)
        assert wave.numel() == 16000
        ref = A.resample(torch.from_numpy(tone), 44100)
        torch.testing.assert_close(wave, ref, atol=2e-4, rtol=0)
    data, fmt = A.read_wav(SPEECH)
    assert fmt == A.AudioFormat("s16le", 22050, 1) and len(data) % 2 == 0
    (tmp_path / "bad.wav").write_bytes(b"RIFX0000WAVE")
    with pytest.raises(A.AudioFormatError, match="not a WAV"):
        A.read_wav(tmp_path / "bad.wav")


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_stream_resampler_equals_whole_resample(rate):
    x = torch.from_numpy(np.random.default_rng(rate).standard_normal(rate + 123).astype(np.float32))
    sizes = [1, 5, 300, 4000, 77]
    resampler, out, pos, i = A.StreamResampler(rate), [], 0, 0
    while pos < x.numel():
        out.append(resampler.push(x[pos:pos + sizes[i % 5]]))
        pos, i = pos + sizes[i % 5], i + 1
    out.append(resampler.finish())
    torch.testing.assert_close(torch.cat(out), A.resample(x, rate), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_empty_chunks_change_nothing(rate):
    """Clients may send empty audio messages, before any audio or between chunks: the same samples come out, and
    a stream of empty chunks alone ends with none."""
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(rate // 2).astype(np.float32))
    empty = x[:0]
    resampler = A.StreamResampler(rate)
    out = [resampler.push(empty), resampler.push(x[:1000]), resampler.push(empty), resampler.push(x[1000:]),
           resampler.push(empty), resampler.finish()]
    torch.testing.assert_close(torch.cat(out), A.resample(x, rate), atol=1e-5, rtol=0)
    silent = A.StreamResampler(rate)
    assert silent.push(empty).numel() == 0 and silent.finish().numel() == 0
