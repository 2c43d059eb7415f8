"""Hydra configuration: compose `conf/` with command-line overrides (no working-directory changes)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the source tree: assets/ (shipped files), out/ (generated)
OmegaConf.register_new_resolver("lipsync.root", lambda: str(SOURCE_ROOT), replace=True)


def conf_dir() -> Path:
    """The `conf/` directory: $LIPSYNC_CONF if set, else the one beside the package."""
    root = Path(os.environ.get("LIPSYNC_CONF", Path(__file__).resolve().parent.parent / "conf"))
    if not (root / "config.yaml").is_file():
        raise FileNotFoundError(f"configuration directory not found or incomplete: {root} "
                                "(set LIPSYNC_CONF to the lipsync conf/ directory)")
    return root


class ConfigError(ValueError):
    """A configuration that cannot be used, explained in one line."""


def _compose(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lipsync"):
        return compose(config_name=name, overrides=overrides)


def load_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    """Compose `conf/<name>.yaml` with hydra overrides; a mistyped override is one line naming the valid keys."""
    overrides = list(overrides or [])
    try:
        cfg = _compose(name, overrides)
    except HydraException as exc:
        raise ConfigError(_explain(exc, name, overrides)) from None
    OmegaConf.resolve(cfg)
    return cfg


def _explain(exc: Exception, name: str, overrides: list[str]) -> str:
    text = str(exc)
    missing = re.search(r"Could not override '([^']+)'", text)
    if missing:
        key = missing.group(1)
        parent, _, leaf = key.rpartition(".")
        try:
            base = _compose(name, [o for o in overrides if not o.lstrip("+~").startswith(key)])
            section = OmegaConf.select(base, parent) if parent else base
            known = sorted(section.keys()) if isinstance(section, DictConfig) else []
        except HydraException:
            known = []
        where = f"`{parent}`" if parent else "the top level"
        return f"unknown setting {key!r}: {where} has {', '.join(known) or 'no such key'} (add a new key with +{key}=…)"
    group = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if group:
        options = re.findall(r"^\t(\S+)$", text, re.M)
        return f"{group.group(1)}={group.group(2)}: no such option; choose one of {', '.join(options)}"
    return text.splitlines()[0] if text else type(exc).__name__


def settings(cfg: Any, allowed: Any, what: str) -> dict[str, Any]:
    """A config section as a plain dict, refusing keys that `allowed` (names or a dataclass) does not have."""
    values = dict(cfg or {})
    names = set(getattr(allowed, "__dataclass_fields__", allowed))
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown {what} settings: {sorted(unknown)}; known: {sorted(names)}")
    return values
