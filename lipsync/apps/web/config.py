"""`lipsync web`'s settings (the `web` section of conf/web.yaml): read without the bridge's media packages, so
that `make conf`, `--help` and the settings reference need none of them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipsync_client.avatar import OUTPUTS

from lipsync import timebase
from lipsync.codec import audio
from lipsync.config import ConfigError, Section, limit, section, setting


@dataclass
class WebConfig(Section):
    """`web`: `lipsync web`, the browser page (--host/--port set web.host/web.port)."""
    WHERE = "web"
    host: str = setting("127.0.0.1", "address the page listens on (0.0.0.0: every interface; see allowed_hosts)")
    port: int = limit(8080, low=0, high=65535, help="the page's port (0 picks a free one)")
    certfile: str = setting("", "HTTPS for the page (with keyfile): browsers open the microphone only on https:// "
                                "pages or on localhost")
    keyfile: str = setting("", "the HTTPS certificate's private key")
    sample_rate: int = setting(48000, "session audio in and out (WebRTC's Opus runs at 48 kHz)")
    jpeg_quality: int = limit(0, low=0, high=100, help="0: the server's default")
    output: str = limit("square", choices=tuple(OUTPUTS), help="frames the server sends this bridge: square (each "
                        "speech frame's generated square, pasted here onto the avatar's frames, fetched once per "
                        "session; about a third of the server's JPEG work) or full (whole JPEG frames)")
    video_backlog: int = limit(3, low=1, help="frames waiting for this bridge's video encoder before the oldest is "
                                              "dropped")
    audio_backlog: int = limit(25, low=1, help="40 ms audio frames waiting for the Opus encoder before the oldest is "
                                               "dropped")
    gate_threshold_dbfs: float = setting(-45.0, "the microphone's audio is cut into utterances by level (the avatar "
                                                "repeats what was said): a 20 ms block at least this loud is speech")
    gate_min_speech_ms: int = limit(250, low=0, help="shorter bursts are ignored")
    gate_hangover_ms: int = limit(600, low=0, help="this much quiet ends an utterance")
    gate_preroll_ms: int = limit(200, low=0, help="audio kept from just before the level rose")
    max_utterance_s: float = limit(30.0, above=0, help="microphone utterances are cut here; longer files or texts "
                                                       "are refused")
    max_upload_mb: float = limit(20.0, above=0, help="largest audio file the page may upload")
    max_sessions: int = limit(8, low=1, help="browsers bridged at once")
    max_text_chars: int = limit(1000, low=1, help="longest text the page may send to text to speech")
    tts_command: str = setting("espeak-ng", "text to speech (text on stdin, WAV on stdout); the page says so when it "
                                            "is missing")
    tts_voice: str = setting("en-us", "espeak-ng voice (-v); a name, never an option")
    tts_timeout_s: float = limit(20.0, above=0, help="a text-to-speech run that takes longer is killed")
    max_tts_jobs: int = limit(2, low=1, help="text-to-speech runs at once on this bridge (and one per session)")
    allowed_hosts: list[str] = setting([], "host names browsers use for this page besides loopback and web.host (a "
                                           "page whose name is rebound to this address gets 421); empty while "
                                           "web.host is a wildcard (0.0.0.0): any name, with a warning at start")
    token_file: str = setting("", "a file holding a token (16+ characters) the page requires: open it once as "
                                  "/?token=TOKEN (kept in a cookie)")

    @classmethod
    def from_dict(cls, cfg: Any) -> "WebConfig":
        values = dict(cfg or {})
        if "allowed_hosts" in values:
            values["allowed_hosts"] = [str(h) for h in (values["allowed_hosts"] or [])]
        config = section(cls, values, cls.WHERE)
        if config.sample_rate % timebase.FPS or not audio.MIN_RATE <= config.sample_rate <= audio.MAX_RATE:
            raise ConfigError(f"web.sample_rate={config.sample_rate}: must be a multiple of {timebase.FPS} within "
                              f"{audio.MIN_RATE}..{audio.MAX_RATE}")
        if bool(config.certfile) != bool(config.keyfile):
            raise ConfigError("web.certfile and web.keyfile go together: set both or neither")
        if str(config.tts_voice).startswith("-"):
            raise ConfigError(f"web.tts_voice={config.tts_voice!r}: a voice name, not an option")
        return config

    def token(self) -> str | None:
        """The bridge's own token (web.token_file, read once), or None when the page is open."""
        if not self.token_file:
            return None
        path = Path(self.token_file).expanduser().resolve()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"web.token_file={path}: cannot be read ({exc.strerror or exc})") from None
        if len(token) < 16 or any(c.isspace() for c in token):
            raise ConfigError(f"web.token_file={path}: must hold one token of at least 16 characters")
        return token
