"""Audio: PCM/WAV decoding, resampling, mel spectrogram, mel windows and per-frame features (SPEC §1–§5).

Everything after decoding runs on the waveform's device. The whole-utterance path and the streaming path share
one implementation (`FeatureStream`), so a stream fed in any chunk sizes yields the whole-utterance features.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torchaudio.functional as AF
from torch import Tensor

from .errors import InvalidRequest, ResourceExhausted

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
N_FFT, HOP, N_MELS = 800, 200, 80
MEL_FMIN, MEL_FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
WINDOW_STEPS = 16  # mel frames per window
MIN_SAMPLES = 3000  # shortest audio that forms one mel window (16 mel frames); shorter audio is zero-padded
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 8  # padded embedding rows around each output frame (§5)
LOOKAHEAD = 6  # future embeddings frame i needs (e_{i+6}): ≈450 ms of audio
ENCODINGS = {"s16le": 2, "f32le": 4}
MIN_RATE, MAX_RATE = 8_000, 48_000

Encoder = Callable[[Tensor], Tensor]  # [B,1,80,16] → [B,512]


class AudioFormatError(InvalidRequest):
    """Audio that cannot be decoded as declared."""


class AudioTooLong(ResourceExhausted):
    """Audio longer than the limit that applies to it; raised while decoding, before the rest is decoded."""

    def __init__(self, name: str, seconds: float, limit_s: float, setting: str):
        more = "more than " if seconds > limit_s else ""
        super().__init__(f"{name} is {more}{seconds:.1f} s long; the limit is {setting} ({limit_s:g} s)")
        self.seconds, self.limit_s = seconds, limit_s


# --------------------------------------------------------------------------- decoding (§1)
@dataclass(frozen=True)
class AudioFormat:
    encoding: str = "s16le"
    sample_rate: int = SAMPLE_RATE
    channels: int = 1

    def validate(self) -> None:
        if self.encoding not in ENCODINGS:
            raise AudioFormatError(f"unsupported audio encoding {self.encoding!r}; expected one of {list(ENCODINGS)}")
        if not MIN_RATE <= self.sample_rate <= MAX_RATE:
            raise AudioFormatError(f"sample rate {self.sample_rate} Hz is outside {MIN_RATE}..{MAX_RATE} Hz")
        if self.channels not in (1, 2):
            raise AudioFormatError(f"{self.channels} channels are not supported; send mono or stereo")

    @property
    def frame_bytes(self) -> int:
        return ENCODINGS[self.encoding] * self.channels


def decode_pcm(data: bytes, fmt: AudioFormat, device: str | torch.device = "cpu", allow_empty: bool = False
               ) -> Tensor:
    """Raw PCM bytes → mono float32 waveform at the input rate, on `device`."""
    fmt.validate()
    if not data and not allow_empty:
        raise AudioFormatError("audio is empty")
    if len(data) % fmt.frame_bytes:
        raise AudioFormatError(f"{len(data)} bytes is not a multiple of {fmt.frame_bytes} "
                               f"({fmt.encoding}, {fmt.channels} channel(s))")
    if not data:
        return torch.zeros(0, device=device)
    dtype = torch.int16 if fmt.encoding == "s16le" else torch.float32
    raw = torch.frombuffer(bytearray(data), dtype=dtype)
    if fmt.encoding == "f32le" and not torch.isfinite(raw).all():
        raise AudioFormatError("audio contains NaN or Inf samples")
    wave = raw.to(device, non_blocking=False)
    wave = wave.float() / 32768.0 if dtype == torch.int16 else wave
    if fmt.channels == 2:
        wave = wave.view(-1, 2).mean(dim=1)
    return wave


def read_wav(path: str | Path) -> tuple[bytes, AudioFormat]:
    """Read a RIFF/WAVE file (16-bit PCM or 32-bit float) into its PCM bytes and format."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise AudioFormatError(f"audio file not found: {file}")
    return parse_wav(file.read_bytes(), str(file))


def parse_wav(blob: bytes, file: str = "WAV data") -> tuple[bytes, AudioFormat]:
    """Parse RIFF/WAVE bytes into PCM bytes and format."""
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise AudioFormatError(f"{file} is not a WAV file")
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(blob):
        chunk_id, size = blob[pos:pos + 4], struct.unpack("<I", blob[pos + 4:pos + 8])[0]
        body = blob[pos + 8:pos + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise AudioFormatError(f"{file}: truncated fmt chunk")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: real tag in the sub-format GUID
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            data = body
        pos += 8 + size + (size & 1)
    if fmt is None or data is None:
        raise AudioFormatError(f"{file} has no fmt or data chunk")
    tag, channels, rate, bits = fmt
    if (tag, bits) == (1, 16):
        encoding = "s16le"
    elif (tag, bits) == (3, 32):
        encoding = "f32le"
    else:
        raise AudioFormatError(f"{file}: WAV format tag {tag} with {bits} bits is not supported "
                               "(use 16-bit PCM or 32-bit float)")
    audio_format = AudioFormat(encoding, rate, channels)
    try:
        audio_format.validate()
    except AudioFormatError as exc:
        raise AudioFormatError(f"{file}: {exc}") from None
    data = data[:len(data) - len(data) % (bits // 8 * channels)]
    return data, audio_format


def load_wav(path: str | Path, device: str | torch.device = "cpu") -> Tensor:
    """WAV file → mono 16 kHz float32 waveform on `device`."""
    data, fmt = read_wav(path)
    return resample(decode_pcm(data, fmt, device), fmt.sample_rate)


MAX_FILE_SECONDS = 3600.0  # `lipsync render` / `lipsync client`: longest audio file decoded (--max-audio-seconds)


def read_audio(path: str | Path, max_seconds: float = MAX_FILE_SECONDS,
               setting: str = "--max-audio-seconds") -> tuple[bytes, AudioFormat]:
    """Any audio file → PCM bytes and format (see decode_audio)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise AudioFormatError(f"audio file not found: {file}")
    return decode_audio(file.read_bytes(), str(file), max_seconds, setting)


def decode_audio(blob: bytes, name: str = "audio data", max_seconds: float = MAX_FILE_SECONDS,
                 setting: str = "the audio limit") -> tuple[bytes, AudioFormat]:
    """Audio file bytes → PCM bytes and format: WAV is read as is; anything else PyAV decodes (mp3, ogg, m4a,
    flac …) becomes mono float32 at its own rate (brought within 8–48 kHz). `name` is what errors call it.

    Decoding stops with AudioTooLong as soon as the decoded length passes `max_seconds` (named `setting` in the
    message), so memory is bounded by the limit, never by what a small compressed file expands to."""
    if blob[8:12] == b"WAVE":
        data, fmt = parse_wav(blob, name)
        seconds = len(data) / fmt.frame_bytes / fmt.sample_rate
        if seconds > max_seconds:
            raise AudioTooLong(name, seconds, max_seconds, setting)
        return data, fmt
    import io

    import av
    import numpy as np

    try:
        with av.open(io.BytesIO(blob)) as container:
            if not container.streams.audio:
                raise AudioFormatError(f"{name} has no audio stream")
            stream = container.streams.audio[0]
            rate = min(max(stream.rate or SAMPLE_RATE, MIN_RATE), MAX_RATE)
            limit = int(max_seconds * rate)
            converter = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks: list[np.ndarray] = []
            total = 0
            for frame in [*container.decode(stream), None]:  # None: flush the converter
                for piece in converter.resample(frame):
                    chunks.append(piece.to_ndarray().reshape(-1))
                    total += len(chunks[-1])
                    if total > limit:
                        raise AudioTooLong(name, total / rate, max_seconds, setting)
    except av.error.FFmpegError as exc:
        raise AudioFormatError(f"{name}: not a readable audio file ({exc})") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return samples.tobytes(), AudioFormat("f32le", rate, 1)


def encode_s16(wave: Tensor) -> bytes:
    """float waveform in [-1, 1] → s16le bytes (the inverse of decode_pcm for s16le input)."""
    return (wave.detach().float().cpu() * 32768.0).round_().clamp_(-32768, 32767).to(torch.int16).numpy().tobytes()


def load_audio(path: str | Path, device: str | torch.device = "cpu", max_seconds: float = MAX_FILE_SECONDS
               ) -> Tensor:
    """Any audio file (see read_audio) → mono 16 kHz float32 waveform on `device`."""
    data, fmt = read_audio(path, max_seconds)
    return resample(decode_pcm(data, fmt, device), fmt.sample_rate)


LOWPASS_WIDTH, ROLLOFF = 6, 0.99  # torchaudio.functional.resample's defaults (sinc, Hann window)
MAX_KERNEL = 1 << 20  # torchaudio's polyphase kernel has new/g × (orig/g + 2·width) taps: above this, resample directly
DIRECT_CHUNK = 1 << 15  # output samples per step of the direct resampler (bounds its memory)


def _reduced(orig: int, new: int) -> tuple[int, int, int]:
    """(orig/g, new/g, width) of torchaudio's polyphase filter for orig → new Hz."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    return o, n, math.ceil(LOWPASS_WIDTH * o / (ROLLOFF * min(o, n)))


def uses_polyphase(orig: int, new: int) -> bool:
    """Whether torchaudio's polyphase kernel for orig → new Hz is small enough to build (common rates)."""
    o, n, width = _reduced(orig, new)
    return n * (o + 2 * width) <= MAX_KERNEL


def resample(wave: Tensor, sample_rate: int, new_rate: int = SAMPLE_RATE) -> Tensor:
    """Resample a mono waveform (default: to 16 kHz) on its device. Common rates use torchaudio's polyphase
    filter; rates whose kernel would be huge (e.g. 8001 Hz) evaluate the same windowed sinc directly, in
    bounded memory."""
    if sample_rate == new_rate:
        return wave
    if uses_polyphase(sample_rate, new_rate):
        return AF.resample(wave, sample_rate, new_rate)
    resampler = StreamResampler(sample_rate, new_rate)
    return torch.cat([resampler.push(wave), resampler.finish()])


def _direct_resample(signal: Tensor, first_input: int, outputs: range, orig: int, new: int) -> Tensor:
    """Output samples `outputs` of orig → new Hz resampling, from input samples signal = x[first_input:…]
    (zero outside): y[m] = Σ_n x[n]·h((n/orig − m/new)·min_rate·rolloff), h = torchaudio's Hann-windowed sinc."""
    o, n, width = _reduced(orig, new)
    base = min(o, n) * ROLLOFF
    taps = torch.arange(-width, width + 2, device=signal.device)
    pieces = []
    for lo in range(outputs.start, outputs.stop, DIRECT_CHUNK):
        m = torch.arange(lo, min(lo + DIRECT_CHUNK, outputs.stop), device=signal.device, dtype=torch.int64)
        anchor = m * o // n  # input sample at or before output m (in reduced units both are exact integers)
        frac = (m * o - anchor * n).double() / n
        t = ((taps[None] - frac[:, None]) * (base / o)).clamp_(-LOWPASS_WIDTH, LOWPASS_WIDTH)
        window = torch.cos(t * (math.pi / LOWPASS_WIDTH / 2)) ** 2
        t = t * math.pi
        kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * window * (base / o)
        index = anchor[:, None] + taps[None] - first_input
        valid = (index >= 0) & (index < signal.numel())
        values = signal[index.clamp(0, max(signal.numel() - 1, 0))] * valid if signal.numel() else \
            torch.zeros_like(kernel, dtype=signal.dtype)
        pieces.append((values.double() * kernel).sum(1).to(signal.dtype))
    return torch.cat(pieces) if pieces else signal.new_zeros(0)


class StreamResampler:
    """Chunked resampling (default: to 16 kHz) whose output equals `resample` of the concatenated input.

    Common rates: torchaudio's polyphase filter maps each block of `orig` input samples to `new` output samples
    using input within `width` samples either side; we keep a block-aligned tail of the input and resample it
    with enough left context, keeping only output blocks whose support is complete. Other rates: the windowed
    sinc is evaluated directly per output sample, keeping only the input tail the next outputs need.
    """

    def __init__(self, sample_rate: int, new_rate: int = SAMPLE_RATE):
        self.rate, self.new_rate = sample_rate, new_rate
        self.orig, self.new, self.width = _reduced(sample_rate, new_rate)
        self.polyphase = uses_polyphase(sample_rate, new_rate)
        self.context_blocks = math.ceil(self.width / self.orig) + 1
        self.tail: Tensor | None = None  # input from global block `tail_block` (polyphase) or sample `tail_start`
        self.tail_block = 0
        self.tail_start = 0
        self.done_blocks = 0  # output blocks (polyphase) or samples (direct) already emitted
        self.total_in = 0
        self.device = torch.device("cpu")

    def push(self, wave: Tensor) -> Tensor:
        self.device = wave.device
        if self.rate == self.new_rate:
            return wave
        self.total_in += wave.numel()
        self.tail = wave if self.tail is None else torch.cat([self.tail, wave])
        if not self.polyphase:
            # output m needs input up to anchor(m) + width + 1
            ready = max(0, ((self.total_in - self.width - 2) * self.new + self.new - 1) // self.orig)
            return self._emit_direct(ready)
        start_in = self.tail_block * self.orig
        available = start_in + self.tail.numel()
        # Output block j needs input up to j*orig + orig + width; keep a margin of one context.
        final_blocks = max(0, available // self.orig - self.context_blocks)
        return self._emit(final_blocks)

    def finish(self) -> Tensor:
        if self.rate == self.new_rate or self.tail is None:
            return torch.zeros(0, device=self.device)
        if not self.polyphase:
            return self._emit_direct(math.ceil(self.new_rate * self.total_in / self.rate))
        return self._emit(None)

    def _emit_direct(self, stop: int) -> Tensor:
        assert self.tail is not None
        if stop <= self.done_blocks:
            return self.tail.new_zeros(0)
        out = _direct_resample(self.tail, self.tail_start, range(self.done_blocks, stop), self.rate, self.new_rate)
        self.done_blocks = stop
        keep_from = max(self.tail_start, stop * self.orig // self.new - self.width - 1)
        self.tail = self.tail[keep_from - self.tail_start:]
        self.tail_start = keep_from
        return out

    def _emit(self, final_blocks: int | None) -> Tensor:
        assert self.tail is not None
        if final_blocks is not None and final_blocks <= self.done_blocks:
            return self.tail.new_zeros(0)
        out = AF.resample(self.tail, self.rate, self.new_rate)
        first = (self.done_blocks - self.tail_block) * self.new
        if final_blocks is None:
            total_out = math.ceil(self.new_rate * self.total_in / self.rate)
            stop = total_out - self.tail_block * self.new
            self.done_blocks = math.ceil(total_out / self.new)
        else:
            stop = (final_blocks - self.tail_block) * self.new
            self.done_blocks = final_blocks
        piece = out[first:stop]
        keep_from = max(self.tail_block, self.done_blocks - self.context_blocks)
        self.tail = self.tail[(keep_from - self.tail_block) * self.orig:]
        self.tail_block = keep_from
        return piece


# --------------------------------------------------------------------------- mel spectrogram (§2)
@lru_cache(maxsize=8)
def _mel_basis(device: torch.device) -> tuple[Tensor, Tensor]:
    fbank = AF.melscale_fbanks(N_FFT // 2 + 1, MEL_FMIN, MEL_FMAX, N_MELS, SAMPLE_RATE, norm="slaney",
                               mel_scale="slaney").to(device)
    window = torch.hann_window(N_FFT, periodic=True, device=device)
    return fbank, window


def _mel_from_frames(padded: Tensor) -> Tensor:
    """Pre-emphasised, padded signal → normalised log-mel frames [M,80] for each hop-spaced 800-sample frame."""
    fbank, window = _mel_basis(padded.device)
    frames = padded.unfold(0, N_FFT, HOP) * window
    magnitude = torch.fft.rfft(frames, dim=1).abs()
    mel = magnitude @ fbank
    db = 20.0 * torch.log10(mel.clamp_min(1e-5)) - 20.0
    return (0.08 * db + 4.0).clamp(-4.0, 4.0)


def preemphasis(wave: Tensor, previous: Tensor | None = None) -> Tensor:
    """y[n] = x[n] − 0.97·x[n−1], with x[−1] = `previous` (0 at the start of audio)."""
    before = wave[:-1] if previous is None else torch.cat([previous.reshape(1), wave[:-1]])
    if previous is None:
        return torch.cat([wave[:1], wave[1:] - PREEMPHASIS * before])
    return wave - PREEMPHASIS * before


def melspectrogram(wave: Tensor) -> Tensor:
    """16 kHz mono float waveform [N] → normalised log-mel [1 + N//200, 80], on its device."""
    half = N_FFT // 2
    padded = torch.nn.functional.pad(preemphasis(wave.float()), (half, half))
    return _mel_from_frames(padded)


# --------------------------------------------------------------------------- windows and features (§3, §5)
def window_count(mel_frames: int) -> int:
    """D: the number of mel windows (and encoder embeddings) of an utterance with M mel frames."""
    return (mel_frames - WINDOW_STEPS) * FPS // 80 + 2


def window_start(video_frame: int) -> int:
    return 80 * video_frame // FPS


def features_from_rows(rows: Tensor) -> Tensor:
    """Consecutive padded embedding rows [n+15, 512] → features [n,32,16,16] (frame k sees rows k..k+15)."""
    blocks = rows.unfold(0, CONTEXT_BEFORE + CONTEXT_AFTER, 1)  # [n, 512, 16]
    return blocks.transpose(1, 2).reshape(-1, 32, 16, 16)


def rows_from_features(features: Tensor) -> Tensor:
    """The inverse of features_from_rows: features [n,32,16,16] of consecutive frames → their rows [n+15, 512]
    (16× smaller: what a live session keeps of frames it will render later)."""
    rows = features.reshape(features.shape[0], CONTEXT_BEFORE + CONTEXT_AFTER, 512)
    return torch.cat([rows[0], rows[1:, -1]])


def context_embeddings(frame: int, windows: int) -> list[int]:
    """§5 steps 2–3 for output frame `frame` of an utterance of D = `windows` embeddings: for each of its 16 rows
    P[frame−8 … frame+7], the embedding it holds (P[r] = e[clamp(r − 1, 0, D − 1)]), or −1 for a zero row."""
    return [min(max(r - 1, 0), windows - 1) if 0 <= r < windows + 2 else -1
            for r in range(frame - CONTEXT_BEFORE, frame + CONTEXT_AFTER)]


def final_windows(mel_frames: int) -> int:
    """How many windows v have all 16 mel frames among the first `mel_frames` (no end clamp can move them)."""
    spare = mel_frames - WINDOW_STEPS
    return 0 if spare < 0 else -(-5 * (spare + 1) // 16)


def frame_count(samples: int) -> int:
    """Output frames (D + 2) for an utterance of `samples` 16 kHz samples."""
    return window_count(1 + max(samples, MIN_SAMPLES) // HOP) + 2


class FeatureStream:
    """Incremental §2–§5: push 16 kHz audio chunks, get each output frame's features once they are final.

    `push` returns (first_frame_index, features[n,32,16,16]) for frames that no later audio can change;
    `finish` applies the end-of-audio rules and returns the rest. Frame indices are global for the stream.
    """

    def __init__(self, encoder: Encoder | None, device: str | torch.device = "cpu", lookahead: int = LOOKAHEAD):
        if not 0 <= lookahead <= LOOKAHEAD:
            raise ValueError(f"look-ahead must be 0..{LOOKAHEAD} frames, got {lookahead}")
        self.encoder, self.lookahead = encoder, lookahead
        self.device = torch.device(device)
        half = N_FFT // 2
        self.signal = torch.zeros(half, device=self.device)  # pre-emphasised, zero-padded signal tail
        self.signal_start = 0  # global index (in padded coordinates) of signal[0]
        self.samples = 0  # real samples received
        self.last_sample: Tensor | None = None
        self.mel = torch.zeros(0, N_MELS, device=self.device)  # mel rows from `mel_start` on
        self.mel_start = 0
        self.mel_done = 0  # final mel frames computed
        self.rows = torch.zeros(0, 512, device=self.device)  # padded embedding rows P, from `rows_start` on
        self.rows_start = 0
        self.windows_done = 0
        self.frames_done = 0
        self.finished = False
        self.awaiting = False  # windows handed out whose embeddings have not come back yet

    # -- stages
    def _append_audio(self, wave: Tensor) -> None:
        if wave.numel() == 0:
            return
        wave = wave.to(self.device, torch.float32)
        self.signal = torch.cat([self.signal, preemphasis(wave, self.last_sample)])
        self.last_sample = wave[-1:]
        self.samples += wave.numel()

    def _compute_mel(self, stop: int) -> None:
        """Compute mel frames [mel_done, stop) from the padded signal."""
        if stop <= self.mel_done:
            return
        lo = self.mel_done * HOP - self.signal_start
        hi = (stop - 1) * HOP + N_FFT - self.signal_start
        new = _mel_from_frames(self.signal[lo:hi])
        self.mel = torch.cat([self.mel, new])
        self.mel_done = stop
        keep = self.mel_done * HOP - self.signal_start  # next frame starts here
        self.signal, self.signal_start = self.signal[keep:], self.signal_start + keep

    def _take_windows(self, stop: int, mel_frames: int | None) -> Tensor:
        """Mel windows [windows_done, stop) as [n,1,80,16]; `mel_frames` (end of audio only) enables the end
        clamp of §3."""
        if stop <= self.windows_done:
            return torch.zeros(0, 1, N_MELS, WINDOW_STEPS, device=self.device)
        limit = (mel_frames if mel_frames is not None else 1 << 62) - WINDOW_STEPS
        starts = [min(window_start(v), limit) - self.mel_start for v in range(self.windows_done, stop)]
        idx = torch.tensor(starts, device=self.device)[:, None] + torch.arange(WINDOW_STEPS, device=self.device)
        windows = self.mel[idx].transpose(1, 2).unsqueeze(1)
        self.windows_done = stop
        # A later window starts at or after the last one taken (the end clamp never goes further back).
        drop = window_start(stop - 1) - self.mel_start
        self.mel, self.mel_start = self.mel[drop:], self.mel_start + drop
        return windows

    def _emit(self, stop: int) -> tuple[int, Tensor]:
        """Features for frames [frames_done, stop); P rows before 0 or past the last row are zeros."""
        first = self.frames_done
        if stop <= first:
            return first, torch.zeros(0, 32, 16, 16, device=self.device)
        lo, hi = first - CONTEXT_BEFORE, stop - 1 + CONTEXT_AFTER  # P rows [lo, hi) feed these frames
        rows_end = self.rows_start + self.rows.shape[0]
        take = self.rows[max(lo, 0) - self.rows_start:min(hi, rows_end) - self.rows_start]
        block = torch.cat([self.rows.new_zeros(max(0, -lo), 512), take,
                           self.rows.new_zeros(max(0, hi - rows_end), 512)])
        self.frames_done = stop
        drop = max(0, stop - CONTEXT_BEFORE - self.rows_start)
        self.rows, self.rows_start = self.rows[drop:], self.rows_start + drop
        return first, features_from_rows(block)

    def _begin_step(self, after_end: str) -> None:
        if self.finished:
            raise RuntimeError(after_end)
        if self.awaiting:
            raise RuntimeError("accept() the embeddings of the previous windows first")

    # -- public: two phases, so that a scheduler can batch the encoder across streams
    def windows(self, wave: Tensor) -> Tensor:
        """Add 16 kHz mono samples; return the mel windows [n,1,80,16] that became final (encode them, then
        pass the embeddings to `accept`)."""
        self._begin_step("audio pushed after end of audio")
        self._append_audio(wave)
        padded_len = self.signal_start + self.signal.shape[0]
        self._compute_mel(max(0, (padded_len - N_FFT) // HOP + 1))
        # Window v is final (no end clamp possible) once mel frames s_v..s_v+15 are final.
        self.awaiting = True
        return self._take_windows(final_windows(self.mel_done), None)

    def end_windows(self, wave: Tensor | None = None) -> Tensor:
        """End of audio (after the optional last samples `wave`): pad short audio to 3000 samples, apply the end
        rules, return every window not yet returned."""
        self._begin_step("end of audio signalled twice")
        self.finished = self.awaiting = True
        if wave is not None:
            self._append_audio(wave)
        if self.samples < MIN_SAMPLES:
            self._append_audio(torch.zeros(MIN_SAMPLES - self.samples, device=self.device))
        self.signal = torch.cat([self.signal, self.signal.new_zeros(N_FFT // 2)])
        mel_frames = 1 + self.samples // HOP
        self._compute_mel(mel_frames)
        return self._take_windows(window_count(mel_frames), mel_frames)

    def accept(self, embeddings: Tensor) -> tuple[int, Tensor]:
        """Embeddings [n,512] of the windows just returned → (first frame index, features [k,32,16,16] of the
        frames that became final)."""
        if not self.awaiting:
            raise RuntimeError("accept() without windows to encode")
        self.awaiting = False
        embeddings = embeddings.to(self.device, torch.float32)
        if self.rows_start == 0 and self.rows.shape[0] == 0 and embeddings.shape[0]:
            embeddings = torch.cat([embeddings[:1], embeddings])  # P[0] = e0 (front padding row)
        self.rows = torch.cat([self.rows, embeddings])
        if self.finished:
            self.rows = torch.cat([self.rows, self.rows[-1:]])  # P[D+1] = e_{D-1}
            return self._emit(self.windows_done + 2)
        # Frame i needs P[i+7] = e_{i+6}: final once window i+6 is encoded. A smaller look-ahead emits earlier
        # and treats the embeddings not yet heard as zeros (lower latency, no longer equal to the whole utterance).
        return self._emit(max(0, self.windows_done - self.lookahead))

    def _encode(self, windows: Tensor) -> Tensor:
        if windows.shape[0] == 0:
            return torch.zeros(0, 512, device=self.device)
        if self.encoder is None:
            raise RuntimeError("this FeatureStream has no encoder: use windows()/accept()")
        return self.encoder(windows)

    @torch.no_grad()
    def push(self, wave: Tensor) -> tuple[int, Tensor]:
        """Add 16 kHz mono samples; return (first frame index, features of the newly final frames)."""
        return self.accept(self._encode(self.windows(wave)))

    @torch.no_grad()
    def finish(self, wave: Tensor | None = None) -> tuple[int, Tensor]:
        """End of audio (after the optional last samples): (first frame index, features of all remaining frames)."""
        return self.accept(self._encode(self.end_windows(wave)))

    @property
    def frames_emitted(self) -> int:
        return self.frames_done


def frame_features(wave: Tensor, encoder: Encoder) -> Tensor:
    """16 kHz mono waveform → per-frame generator audio input [D+2,32,16,16] (SPEC §3–§5), on its device."""
    return FeatureStream(encoder, wave.device).finish(wave)[1]
