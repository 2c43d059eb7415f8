"""Hydra configuration: compose `conf/` with command-line overrides (no working-directory changes)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf


def conf_dir() -> Path:
    """The `conf/` directory: $LIPSYNC_CONF if set, else the one beside the package."""
    root = Path(os.environ.get("LIPSYNC_CONF", Path(__file__).resolve().parent.parent / "conf"))
    if not (root / "config.yaml").is_file():
        raise FileNotFoundError(f"configuration directory not found or incomplete: {root} "
                                "(set LIPSYNC_CONF to the lipsync conf/ directory)")
    return root


def load_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lipsync"):
        cfg = compose(config_name=name, overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return cfg


def settings(cfg: Any, allowed: Any, what: str) -> dict[str, Any]:
    """A config section as a plain dict, refusing keys that `allowed` (names or a dataclass) does not have."""
    values = dict(cfg or {})
    names = set(getattr(allowed, "__dataclass_fields__", allowed))
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {what} settings: {sorted(unknown)}; known: {sorted(names)}")
    return values
