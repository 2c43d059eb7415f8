"""Audio bytes → waveforms: PCM/WAV decoding, files, bounded decoding of compressed audio, resampling (SPEC §1).

Decoding runs on the CPU (request bytes); resampling runs on the waveform's device. `StreamResampler` gives
chunked input the same samples as `resample` of the whole.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torchaudio.functional as AF
from lipsync_client import audio as wire
from torch import Tensor

from lipsync.errors import InvalidRequest, ResourceExhausted
from lipsync.timebase import SAMPLE_RATE

ENCODINGS, MIN_RATE, MAX_RATE = wire.ENCODINGS, wire.MIN_RATE, wire.MAX_RATE  # what the wire allows: one definition


class AudioFormatError(InvalidRequest):
    """Audio that cannot be decoded as declared."""


class AudioTooLong(ResourceExhausted):
    """Audio longer than the limit that applies to it; raised while decoding, before the rest is decoded."""

    def __init__(self, name: str, seconds: float, limit_s: float, setting: str):
        more = "more than " if seconds > limit_s else ""
        super().__init__(f"{name} is {more}{seconds:.1f} s long; the limit is {setting} ({limit_s:g} s)")
        self.seconds, self.limit_s = seconds, limit_s


# --------------------------------------------------------------------------- decoding (§1)
class AudioFormat(wire.AudioFormat):
    """The client package's format, whose refusal here is a request error (INVALID_ARGUMENT to the caller)."""

    def validate(self) -> None:
        try:
            super().validate()
        except wire.AudioFormatError as exc:
            raise AudioFormatError(str(exc)) from None


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
    return _as_request(wire.read_wav, path)


def parse_wav(blob: bytes, file: str = "WAV data") -> tuple[bytes, AudioFormat]:
    """Parse RIFF/WAVE bytes into PCM bytes and format."""
    return _as_request(wire.parse_wav, blob, file)


def _as_request(read, *args) -> tuple[bytes, AudioFormat]:
    """The client package's WAV reader (one copy), its refusal raised as a request error."""
    try:
        data, fmt = read(*args)
    except wire.AudioFormatError as exc:
        raise AudioFormatError(str(exc)) from None
    return data, AudioFormat(fmt.encoding, fmt.sample_rate, fmt.channels)


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


def check_duration(samples: int, rate: int, limit_s: float, setting: str) -> None:
    """Refuse audio longer than `limit_s` from its sample count alone (before any more of it is decoded)."""
    if samples / rate > limit_s:
        raise ResourceExhausted(f"audio is {samples / rate:.1f} s; the limit per request is {limit_s:g} s ({setting})")


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
        if self.rate == self.new_rate or not wave.numel():  # an empty chunk (a client may send one) adds nothing:
            return wave  # a tail of no samples would reach torchaudio's resample at finish(), which cannot take one
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

