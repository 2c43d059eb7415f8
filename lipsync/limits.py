"""Request limits (`server` config) and the validation of every client-supplied number and format."""
from __future__ import annotations

import logging
from typing import Any

from . import audio
from .audio import AudioFormat
from .errors import InvalidRequest, ResourceExhausted, clip
from .jpeg import MAX_QUALITY, MIN_QUALITY
from .live import LiveConfig

log = logging.getLogger(__name__)
ENCODINGS = ("s16le", "f32le", "wav")


class Limits:
    """Limits from the `server` config section, and checks of request fields against them."""

    def __init__(self, cfg: Any):
        self.live = LiveConfig.from_dict(cfg.get("live"))
        self.max_audio_s = float(cfg.max_audio_seconds)
        self.max_streams = int(cfg.max_streams)
        self.default_quality = int(cfg.jpeg_quality)
        self.max_start_frame = int(cfg.max_start_frame)
        self.max_message_bytes = int(float(cfg.max_message_mb) * 2**20)
        self.stream_buffer_frames = int(cfg.get("stream_buffer_frames", 250))
        self.config_timeout_s = float(cfg.get("config_timeout_s", 10))
        if not MIN_QUALITY <= self.default_quality <= MAX_QUALITY:
            raise ValueError(f"server.jpeg_quality={self.default_quality} is outside {MIN_QUALITY}..{MAX_QUALITY}")
        if min(self.max_audio_s, self.stream_buffer_frames, self.config_timeout_s) <= 0 \
                or self.max_message_bytes < 2**16:
            raise ValueError("server.max_audio_seconds, server.stream_buffer_frames and server.config_timeout_s "
                             "must be positive and server.max_message_mb at least 0.0625")

    def quality(self, q: int) -> int:
        if q == 0:
            return self.default_quality
        if not MIN_QUALITY <= q <= MAX_QUALITY:
            raise InvalidRequest(f"jpeg_quality {q} is outside {MIN_QUALITY}..{MAX_QUALITY}")
        return q

    def start_frame(self, n: int) -> int:
        if not 0 <= n <= self.max_start_frame:
            raise InvalidRequest(f"start_frame {n} is outside 0..{self.max_start_frame}")
        return n

    def audio_format(self, encoding: str | None, sample_rate: int, channels: int, allow_wav: bool) -> AudioFormat:
        """A request's audio format (encoding name, or None if the client sent an unknown enum value)."""
        if encoding is None:
            raise InvalidRequest("unknown audio encoding; use PCM_S16LE, PCM_F32LE or (Synthesize only) WAV")
        if encoding == "wav" and not allow_wav:
            raise InvalidRequest("WAV is not accepted for streams; send PCM_S16LE or PCM_F32LE")
        result = AudioFormat(encoding, sample_rate or audio.SAMPLE_RATE, channels or 1)
        if encoding != "wav":
            result.validate()
        return result

    def check_duration(self, samples: int, rate: int) -> None:
        if samples / rate > self.max_audio_s:
            raise ResourceExhausted(f"audio is {samples / rate:.1f} s; the limit per request is {self.max_audio_s:g} s "
                                    "(server.max_audio_seconds)")

    def check_response_size(self, frames: int, bytes_per_frame: float) -> None:
        """Refuse, before any work, a unary response that could not be sent."""
        estimate = frames * bytes_per_frame
        if estimate > self.max_message_bytes:
            raise ResourceExhausted(
                f"{frames} frames would make a response of about {estimate / 2**20:.1f} MB, over the "
                f"{self.max_message_bytes / 2**20:g} MB message limit (server.max_message_mb): use the Stream RPC "
                "for long audio, or a lower jpeg_quality")

    def check_consistency(self, max_queue_frames: int, max_batch: int) -> list[str]:
        """Contradictions between limits, as warnings for the startup log."""
        problems = []
        if max_queue_frames < 2 * max_batch:
            problems.append(f"registry.max_queue_frames={max_queue_frames} is below two batches of "
                            f"registry.max_batch={max_batch}: batches cannot fill")
        if self.stream_buffer_frames < audio.LOOKAHEAD + 1:
            problems.append(f"server.stream_buffer_frames={self.stream_buffer_frames} is below the look-ahead")
        for problem in problems:
            log.warning("configuration: %s", problem)
        return problems


def model_id(value: str) -> str:
    """A request's model id, refused when absurd (it is echoed into messages and logs)."""
    if not value:
        raise InvalidRequest("model_id is required")
    if len(value) > 256:
        raise InvalidRequest(f"model_id is {len(value)} characters long; model ids have at most 256 ({clip(value)})")
    return value
