"""The typed config tree (lipsync.config, api.limits): every section read through its dataclass, every bad value
refused where it is read with one line naming key, value and what is allowed; the composed YAML's defaults are the
dataclasses' own; request limits checked against the server section."""
from __future__ import annotations

import dataclasses

import pytest

from lipsync.api.limits import Limits, ServerConfig, model_id
from lipsync.api.security import AuthConfig, TlsConfig
from lipsync.api.server import LoggingConfig
from lipsync.apps import conf_files
from lipsync.apps.web.config import WebConfig
from lipsync.config import ConfigError, conf_dir, limit, load_config, section
from lipsync.errors import InvalidRequest, ResourceExhausted
from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import PipelineConfig
from lipsync.runtime.live import LiveConfig
from lipsync.runtime.registry import RegistryConfig


@dataclasses.dataclass
class Example:
    rate: int = limit(16000, low=8000, high=48000)
    gain: float = limit(1.0, above=0)
    mode: str = limit("fast", choices=("fast", "exact"))
    name: str | None = None


@pytest.mark.parametrize("values, message", [
    ({"rate": 4000}, "example.rate=4000: must be a whole number in 8000..48000"),
    ({"rate": "many"}, "example.rate='many': must be a whole number in 8000..48000"),
    ({"gain": 0}, "example.gain=0.0: must be a number > 0"),
    ({"mode": "slow"}, "example.mode='slow': must be one of fast, exact"),
    ({"rate": 1, "gain": -1}, "example.rate=1: must be a whole number in 8000..48000; example.gain=-1.0: must be"),
])
def test_a_section_refuses_bad_values_in_one_line(values, message):
    with pytest.raises(ConfigError) as info:
        section(Example, values, "example")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_section_converts_and_keeps_defaults():
    got = section(Example, {"rate": "22050", "name": "x"}, "example")
    assert got == Example(rate=22050, gain=1.0, mode="fast", name="x")


@pytest.mark.parametrize("cls, key", [(ServerConfig, "server"), (LiveConfig, "server.live"), (TlsConfig, "server.tls"),
                                      (AuthConfig, "server.auth"), (RegistryConfig, "registry"),
                                      (EngineConfig, "engine"), (PipelineConfig, "pipeline"),
                                      (LoggingConfig, "logging")])
def test_the_yaml_and_the_dataclasses_agree_on_every_default(cls, key):
    """The composed YAML reads back as the dataclass's own defaults (the files are written from them)."""
    cfg = load_config()
    node = cfg
    for part in key.split("."):
        node = node[part]
    read = cls.from_dict(node)
    for f in dataclasses.fields(cls):
        if f.name in ("live", "tls", "auth"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(read, f.name) == default, f"{key}.{f.name}: YAML {getattr(read, f.name)!r} vs {default!r}"


def test_the_conf_files_are_written_from_the_dataclasses():
    """conf/'s default files hold what the dataclasses say (`make conf` writes them): one place for defaults."""
    assert conf_files.stale(conf_dir()) == []
    web = WebConfig.from_dict(load_config(name="web").web)
    assert web == WebConfig()


def test_the_settings_reference_lists_every_key_of_conf():
    """docs/settings.md against the composed config itself (not the dataclasses it is written from)."""
    from omegaconf import OmegaConf

    text = (conf_dir().parent / "docs" / "settings.md").read_text()

    def keys(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and key in ("live", "tls", "auth"):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"
    serve = OmegaConf.to_container(load_config(), resolve=False)
    found = [k for section in ("server", "registry", "pipeline", "logging", "engine")
             for k in keys(serve[section], f"{section}.")]
    found += list(keys(OmegaConf.to_container(load_config(name="web"))["web"], "web."))
    assert len(found) > 90 and [k for k in found if f"| `{k}` |" not in text] == []


def test_limits_check_every_client_number():
    limits = Limits(ServerConfig.from_dict({"max_audio_seconds": 2, "max_start_frame": 100}))
    assert limits.quality(0) == 75 and limits.quality(90) == 90
    with pytest.raises(InvalidRequest, match="jpeg_quality 101 is outside 1..100"):
        limits.quality(101)
    with pytest.raises(InvalidRequest, match="start_frame 101 is outside 0..100"):
        limits.start_frame(101)
    assert limits.lookahead(0) == 6 and limits.lookahead(2) == 2
    with pytest.raises(InvalidRequest, match="lookahead_frames 7 is outside 0..6"):
        limits.lookahead(7)
    with pytest.raises(ResourceExhausted, match="limit per request is 2 s"):
        limits.check_duration(2 * 16000 + 1, 16000)
    with pytest.raises(InvalidRequest, match="unknown audio encoding"):
        limits.audio_format(None, 16000, 1, allow_wav=True)
    with pytest.raises(InvalidRequest, match="WAV is not accepted for streams"):
        limits.audio_format("wav", 16000, 1, allow_wav=False)
    with pytest.raises(InvalidRequest, match="3 channels"):
        limits.audio_format("s16le", 16000, 3, allow_wav=False)
    assert limits.audio_format("f32le", 0, 0, allow_wav=False).sample_rate == 16000  # 0: the defaults
    with pytest.raises(InvalidRequest, match="model_id is 300 characters long"):
        model_id("m" * 300)


def test_the_receive_limit_follows_the_longest_audio():
    small = Limits(ServerConfig.from_dict({"max_audio_seconds": 10, "max_message_mb": 100}))
    assert small.max_receive_bytes == 10 * 48000 * 2 * 4 + 2**16  # 10 s of 48 kHz stereo float, plus fields
    assert Limits(ServerConfig.from_dict({"max_audio_seconds": 3600})).max_receive_bytes == 100 * 2**20


def test_contradicting_limits_are_warned_about():
    limits = Limits(ServerConfig.from_dict({"stream_buffer_frames": 3}))
    problems = limits.check_consistency(max_queue_frames=10, max_batch=8)
    assert any("below two batches" in p for p in problems) and any("look-ahead" in p for p in problems)
