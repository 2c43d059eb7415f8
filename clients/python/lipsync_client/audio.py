"""Audio as the server takes it: formats, WAV files, and resampling a stream to a session's rate (numpy + soxr)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from lipsync_client._proto import lipsync_pb2 as pb
from lipsync_client.timing import SAMPLE_RATE

ENCODINGS = {"s16le": 2, "f32le": 4}  # bytes per sample
MIN_RATE, MAX_RATE = 8_000, 48_000
ENCODING_ENUMS = {"s16le": pb.PCM_S16LE, "f32le": pb.PCM_F32LE, "wav": pb.WAV}


class AudioFormatError(ValueError):
    """Audio that cannot be read or sent as declared."""


@dataclass(frozen=True)
class AudioFormat:
    """Raw PCM as sent: little-endian 16-bit integers or 32-bit floats, interleaved when stereo."""
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


def format_message(fmt: AudioFormat) -> pb.AudioFormat:
    """The `AudioFormat` message that declares `fmt` to the server."""
    return pb.AudioFormat(encoding=ENCODING_ENUMS[fmt.encoding], sample_rate=fmt.sample_rate, channels=fmt.channels)


def read_wav(path: str | Path) -> tuple[bytes, AudioFormat]:
    """A RIFF/WAVE file (16-bit PCM or 32-bit float) → its PCM bytes and format, ready to send."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise AudioFormatError(f"audio file not found: {file}")
    return parse_wav(file.read_bytes(), str(file))


def parse_wav(blob: bytes, file: str = "WAV data") -> tuple[bytes, AudioFormat]:
    """RIFF/WAVE bytes → PCM bytes and format. Walks the chunks (any order, odd sizes padded) and reads the real
    sample format of WAVE_FORMAT_EXTENSIBLE files."""
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
    return data[:len(data) - len(data) % (bits // 8 * channels)], audio_format


class MonoResampler:
    """s16 PCM at any rate and channel count, chunk by chunk → s16 mono at `rate`. One soxr stream per input rate,
    run in float32 so that chunked input gives the very samples a single call would (soxr's int16 mode rounds per
    call); what a stream still holds (its filter delay, a few ms) comes out with the next chunk."""

    def __init__(self, rate: int):
        self.rate = rate
        self._streams: dict[int, object] = {}

    def __call__(self, pcm: bytes, sample_rate: int, channels: int = 1) -> bytes:
        import numpy as np  # here, not at import: `import lipsync_client` stays quick for programs that never resample

        samples = np.frombuffer(pcm, np.int16)
        if channels > 1:
            samples = samples[:len(samples) - len(samples) % channels].reshape(-1, channels).mean(axis=1)
        if sample_rate == self.rate:
            return np.round(samples).astype(np.int16).tobytes() if channels > 1 else pcm
        if sample_rate not in self._streams:
            import soxr
            self._streams[sample_rate] = soxr.ResampleStream(sample_rate, self.rate, 1, dtype="float32")
        out = self._streams[sample_rate].resample_chunk(samples.astype(np.float32) / 32768.0)
        return np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16).tobytes()
