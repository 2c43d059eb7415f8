"""Request limits (`server` config) and the validation of every client-supplied number and format."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from lipsync import timebase
from lipsync.api.security import AuthConfig, TlsConfig
from lipsync.codec import audio
from lipsync.codec.audio import AudioFormat
from lipsync.codec.jpeg import MAX_QUALITY, MIN_QUALITY
from lipsync.config import Section, limit, section, setting
from lipsync.errors import InvalidRequest, ResourceExhausted, clip
from lipsync.model import audio_features
from lipsync.runtime.live import LiveConfig

log = logging.getLogger(__name__)


@dataclass
class ServerConfig(Section):
    """`server`: the gRPC server of `lipsync serve`."""
    WHERE = "server"
    host: str = setting("127.0.0.1", "loopback by default: set 0.0.0.0 (with TLS and tokens) to serve other "
                                     "machines")
    port: int = limit(50051, low=0, high=65535, help="the gRPC port (0 picks a free one; `READY port=N` says which)")
    metrics_port: int = limit(9090, low=-1, high=65535, help="Prometheus /metrics over HTTP; -1 disables, 0 picks "
                                                              "a free port")
    metrics_host: str = setting("127.0.0.1", "address of the metrics endpoint (0.0.0.0 for a scraper on another "
                                             "machine)")
    metrics_auth: str = setting("auto", "auto: scrapes need a token when the server checks tokens (a tokens_file "
                                        "token with the metrics or admin role, or metrics_token_file); open | token",
                                choices=("auto", "open", "token"))
    metrics_token_file: str | None = setting(None, "file holding a bearer token that scrapes may send (besides "
                                                   "tokens_file's)")
    max_message_mb: float = limit(100.0, low=0.0625, high=2047, help="gRPC max send message size; received "
                                  "messages are bounded by it and by the audio that max_audio_seconds allows (48 kHz "
                                  "stereo float)")
    max_concurrent_rpcs: int = limit(1024, low=1, help="RPCs in progress at once over all connections; more are "
                                                       "refused (RESOURCE_EXHAUSTED)")
    max_connection_streams: int = limit(128, low=1, help="HTTP/2 streams at once on one connection")
    keepalive_time_s: float = limit(30.0, above=0, help="HTTP/2 keepalive pings to idle clients this often")
    keepalive_timeout_s: float = limit(10.0, above=0, help="a client that does not answer a ping this fast is dropped")
    event_loop: str = setting("asyncio", "the event loop that runs gRPC, sessions and pacing: asyncio, or uvloop "
                                         "(pip install -e '.[uvloop]' from a checkout; 15-20 % less event-loop CPU per "
                                         "frame measured, docs/server.md)", choices=("asyncio", "uvloop"))
    shutdown_grace_s: float = limit(30.0, low=0, help="SIGTERM/SIGINT: finish in-flight work for up to this long")
    drain_s: float = limit(0.0, low=0, help="SIGTERM/SIGINT: report NOT_SERVING, keep serving this long (behind a "
                           "proxy: longer than its health-check interval), then refuse new work and finish the rest")
    worker_name: str | None = setting(None, "name in the x-lipsync-worker response header; null = HOSTNAME:PORT")
    max_streams: int = limit(256, low=0, help="concurrent Stream RPCs")
    max_audio_seconds: float = limit(600.0, above=0, help="per Synthesize request or stream")
    stream_buffer_frames: int = limit(250, low=1, help="Stream: frames rendered or in flight but not yet taken by "
                                                       "the client (flow control)")
    stream_idle_timeout_s: float = limit(60.0, above=0, help="Stream: a stream whose client sends nothing for this "
                                                             "long is closed (DEADLINE_EXCEEDED)")
    strict_models: bool = setting(True, "refuse to start when a declared model's files are broken (false: serve the "
                                        "others)")
    max_start_frame: int = limit(100_000_000, low=0, help="largest start_frame a request may ask for")
    jpeg_quality: int = limit(75, low=MIN_QUALITY, high=MAX_QUALITY, help="default when a request sends 0")
    config_timeout_s: float = limit(10.0, above=0, help="Stream/Converse: close a stream whose config message has "
                                                        "not come by then")
    live: LiveConfig = dataclasses.field(default_factory=LiveConfig)
    tls: TlsConfig = dataclasses.field(default_factory=TlsConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)

    @classmethod
    def from_dict(cls, cfg: Any) -> "ServerConfig":
        config = section(cls, cfg, cls.WHERE)
        for name, part in (("live", LiveConfig), ("tls", TlsConfig), ("auth", AuthConfig)):
            value = getattr(config, name)
            setattr(config, name, value if isinstance(value, part) else part.from_dict(value))
        return config


class Limits:
    """Limits from the `server` config section, and checks of request fields against them."""

    def __init__(self, cfg: Any):
        cfg = cfg if isinstance(cfg, ServerConfig) else ServerConfig.from_dict(cfg)
        self.config = cfg
        self.live = cfg.live
        self.max_audio_s = cfg.max_audio_seconds
        self.max_streams = cfg.max_streams
        self.default_quality = cfg.jpeg_quality
        self.max_start_frame = cfg.max_start_frame
        self.max_message_bytes = int(cfg.max_message_mb * 2**20)
        self.stream_buffer_frames = cfg.stream_buffer_frames
        self.config_timeout_s = cfg.config_timeout_s
        self.stream_idle_timeout_s = cfg.stream_idle_timeout_s

    @property
    def max_receive_bytes(self) -> int:
        """The largest request message worth receiving: the longest allowed audio in the largest format (48 kHz
        stereo float) plus room for the other fields, or the message limit if that is smaller."""
        return min(self.max_message_bytes, int(self.max_audio_s * audio.MAX_RATE * 2 * 4) + 2**16)

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

    def lookahead(self, frames: int) -> int:
        """A Stream's look-ahead in frames (0: the full look-ahead of SPEC §5)."""
        lookahead = frames or audio_features.LOOKAHEAD
        if not 1 <= lookahead <= audio_features.LOOKAHEAD:
            raise InvalidRequest(f"lookahead_frames {frames} is outside 0..{audio_features.LOOKAHEAD}")
        return lookahead

    def audio_format(self, encoding: str | None, sample_rate: int, channels: int, allow_wav: bool) -> AudioFormat:
        """A request's audio format (encoding name, or None if the client sent an unknown enum value)."""
        if encoding is None:
            raise InvalidRequest("unknown audio encoding; use PCM_S16LE, PCM_F32LE or (Synthesize only) WAV")
        if encoding == "wav" and not allow_wav:
            raise InvalidRequest("WAV is not accepted for streams; send PCM_S16LE or PCM_F32LE")
        result = AudioFormat(encoding, sample_rate or timebase.SAMPLE_RATE, channels or 1)
        if encoding != "wav":
            result.validate()
        return result

    def check_duration(self, samples: int, rate: int) -> None:
        audio.check_duration(samples, rate, self.max_audio_s, "server.max_audio_seconds")

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
        if self.stream_buffer_frames < audio_features.LOOKAHEAD + 1:
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
