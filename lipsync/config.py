"""Typed settings: the section dataclasses every part of lipsync reads its settings through, and composing `conf/`
with command-line overrides (hydra, imported only when a configuration is composed from files: the in-process
pipeline and the GPU path import this module without it)."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from omegaconf import DictConfig

SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the source tree: assets/ (shipped files), out/ (generated)
INSTALL_HINT = "hydra-core is not installed: pip install hydra-core (or `make setup`; a GPU host: `make gpu-bundle`)"


def conf_dir() -> Path:
    """The `conf/` directory: $LIPSYNC_CONF if set, else the one beside the package."""
    root = Path(os.environ.get("LIPSYNC_CONF", Path(__file__).resolve().parent.parent / "conf"))
    if not (root / "config.yaml").is_file():
        raise FileNotFoundError(f"configuration directory not found or incomplete: {root} "
                                "(set LIPSYNC_CONF to the lipsync conf/ directory)")
    return root


class ConfigError(ValueError):
    """A configuration that cannot be used, explained in one line."""


def _hydra() -> Any:
    """hydra and omegaconf, imported on first use (with `${lipsync.root:}` registered for conf/'s paths)."""
    try:
        import hydra
        from omegaconf import OmegaConf
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from None
    if not OmegaConf.has_resolver("lipsync.root"):
        OmegaConf.register_new_resolver("lipsync.root", lambda: str(SOURCE_ROOT))
    return hydra


def _compose(name: str, overrides: list[str]) -> DictConfig:
    hydra = _hydra()
    with hydra.initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="lipsync"):
        return hydra.compose(config_name=name, overrides=overrides)


def load_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    """Compose `conf/<name>.yaml` with hydra overrides; a mistyped override is one line naming the valid keys."""
    _hydra()  # first: without hydra, the install hint
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    try:
        cfg = _compose(name, overrides)
    except HydraException as exc:
        raise ConfigError(_explain(exc, name, overrides)) from None
    OmegaConf.resolve(cfg)
    return cfg


def _explain(exc: Exception, name: str, overrides: list[str]) -> str:
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

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


# --------------------------------------------------------------------------- typed sections
T = TypeVar("T")


def setting(default: Any, help: str = "", *, low: float | None = None, high: float | None = None,
            choices: tuple = (), above: float | None = None) -> Any:
    """A config dataclass field: its default (the one place defaults live: conf/ is written from these), what it
    is for (`help`, the comment beside it there), and what is allowed: `low`/`high` inclusive bounds, `above` an
    exclusive lower bound, `choices` the allowed values. `section()` checks them where the section is read."""
    meta = {"low": low, "high": high, "choices": tuple(choices), "above": above, "help": help}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def limit(default: Any, *, low: float | None = None, high: float | None = None, choices: tuple = (),
          above: float | None = None, help: str = "") -> Any:
    """`setting` with its bounds first (for fields whose bounds say most of what they are)."""
    return setting(default, help, low=low, high=high, choices=choices, above=above)


def allowed(f: dataclasses.Field, kind: Any = None) -> str:
    """What a field allows, in words (the end of every config error, and the settings reference)."""
    meta = f.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    name = {int: "a whole number", float: "a number", bool: "true or false", str: "text", list: "a list",
            dict: "a mapping"}.get(kind, "a value")
    low, high, above = meta.get("low"), meta.get("high"), meta.get("above")
    if above is not None:
        return f"{name} in ({above:g}, {high:g}]" if high is not None else f"{name} > {above:g}"
    if low is not None and high is not None:
        return f"{name} in {low:g}..{high:g}"
    if low is not None:
        return f"{name} >= {low:g}"
    if high is not None:
        return f"{name} <= {high:g}"
    return name


def field_kinds(cls: type) -> dict[str, Any]:
    """Each field of a section dataclass with its plain type (int, float, bool, str, list, dict)."""
    hints = _hints(cls)
    return {f.name: _kind(f, hints) for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(f: dataclasses.Field, hints: dict[str, Any] | None = None) -> Any:
    """The plain type of a field: int, float, bool, str, list, dict (Optional[X] → X)."""
    hint = f.type if not isinstance(f.type, str) else (hints or {}).get(f.name, f.type)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
        origin = typing.get_origin(hint)
    return origin or hint


def _coerce(value: Any, kind: Any) -> Any:
    if value is None or kind in (Any, typing.Any) or not isinstance(kind, type):
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value) if not isinstance(value, str) else int(value.strip())
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)) or hasattr(value, "keys"):
            raise ValueError
        return str(value)
    if kind is list:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or hasattr(value, "keys"):
            raise ValueError
        return list(value)
    if kind is dict:
        if not hasattr(value, "keys"):
            raise ValueError
        return dict(value)
    return value


def section(cls: type[T], cfg: Any, where: str) -> T:
    """A config section (mapping) as the dataclass `cls`: unknown keys refused, every value converted to its
    field's type and checked against its `limit`. Every problem is a ConfigError of one line that names the key,
    the value and what is allowed (all of a section's problems, joined)."""
    values = settings(cfg, cls, where)
    hints = _hints(cls)
    problems = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        key, value, kind = f"{where}.{f.name}", values[f.name], _kind(f, hints)
        try:
            value = _coerce(value, kind)
        except (TypeError, ValueError):
            problems.append(f"{key}={value!r}: must be {allowed(f, kind)}")
            continue
        meta = f.metadata
        bad = value is not None and (
            (meta.get("choices") and value not in meta["choices"])
            or (meta.get("low") is not None and value < meta["low"])
            or (meta.get("high") is not None and value > meta["high"])
            or (meta.get("above") is not None and not value > meta["above"]))
        if bad:
            problems.append(f"{key}={value!r}: must be {allowed(f, kind)}")
        values[f.name] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return cls(**values)


class Section:
    """Base of the config dataclasses: `from_dict` reads the section at `WHERE` (its key in the composed config,
    named in every error) through `section()`."""
    WHERE: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[T], cfg: Any) -> T:
        return section(cls, cfg, cls.WHERE)
