"""conf/'s default files and the settings reference (docs/settings.md), written from the section dataclasses: each
setting's default and its comment live in one place (the dataclass field, `config.setting`); the YAML that hydra
composes and users read, and the reference, are made from them. `make conf` writes them, `--check` (run by the
tests) says which are out of date."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from pathlib import Path

import yaml

from lipsync.api.limits import ServerConfig
from lipsync.api.server import LoggingConfig
from lipsync.apps.web.config import WebConfig
from lipsync.config import SOURCE_ROOT, allowed, conf_dir, field_kinds
from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import PipelineConfig
from lipsync.runtime.registry import RegistryConfig

WIDTH = 118  # characters per line
COMMENT_COLUMN = 28  # where a setting's comment starts (further right when the setting is longer)

# file under conf/ → (section dataclass, the key it is nested under in that file, if any, and the module that
# defines it, named in the header)
FILES = {
    "server/default.yaml": (ServerConfig, None),
    "registry/default.yaml": (RegistryConfig, None),
    "pipeline/default.yaml": (PipelineConfig, None),
    "logging/default.yaml": (LoggingConfig, None),
    "engine/auto.yaml": (EngineConfig, None),
    "web.yaml": (WebConfig, "web"),
}


def value_text(value: object) -> str:
    """A default as YAML (flow style for lists and mappings; whole numbers without a decimal point)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _with_comment(text: str, comment: str, indent: str) -> list[str]:
    if not comment:
        return [text]
    column = max(COMMENT_COLUMN, len(text) + 1)
    if column > WIDTH - 30:  # no room beside it: the comment goes above
        return [f"{indent}# {line}" for line in textwrap.wrap(comment, WIDTH - len(indent) - 2)] + [text]
    lines = textwrap.wrap(comment, WIDTH - column - 2)
    return [f"{text.ljust(column)}# {lines[0]}", *(f"{' ' * column}# {line}" for line in lines[1:])]


def _summary(cls: type) -> str:
    """A section's docstring without its leading `key`: label, as one line of prose."""
    doc = " ".join((cls.__doc__ or "").split())
    doc = doc.split(": ", 1)[1] if doc.startswith("`") and ": " in doc else doc
    return doc[:1].upper() + doc[1:]


def section_lines(cls: type, indent: str = "") -> list[str]:
    defaults = cls()
    out = []
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            out += _with_comment(f"{indent}{f.name}:", _summary(type(default)), indent)
            out += section_lines(type(default), indent + "  ")
            continue
        line, comment = f"{indent}{f.name}: {value_text(default)}", f.metadata.get("help", "")
        if isinstance(default, dict) and len(line) > WIDTH:  # a long mapping: one key a line
            out += _with_comment(f"{indent}{f.name}:", comment, indent)
            out += [f"{indent}  {key}: {value_text(value)}" for key, value in default.items()]
            continue
        out += _with_comment(line, comment, indent)
    return out


def render(cls: type, nested_under: str | None) -> str:
    where = f"{cls.__module__}.{cls.__qualname__}"
    header = [f"# Written by `make conf` from {where} (each default and its comment live there).",
              *(f"# {line}" for line in textwrap.wrap(_summary(cls), WIDTH - 2))]
    body = [f"{nested_under}:", *section_lines(cls, "  ")] if nested_under else section_lines(cls)
    return "\n".join(header + body) + "\n"


def _rows(cls: type, prefix: str) -> list[str]:
    defaults, kinds = cls(), field_kinds(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            rows += _rows(type(default), f"{prefix}{f.name}.")
            continue
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{value_text(default)}` | {allowed(f, kinds[f.name])} | {help_text} |")
    return rows


def reference() -> str:
    """docs/settings.md: every key of conf/'s sections with its default, what is allowed and what it is for."""
    out = ["# Settings", "",
           "Every key of `conf/`, written by `make conf` from the section dataclasses (where each default and its",
           "comment live); `lipsync serve --check` and `serve` read the same dataclasses, and refuse a value outside",
           "*allowed* with one line naming the key. Override any key on the command line (`server.port=50100`).", ""]
    for name, (cls, key) in FILES.items():
        section = cls.WHERE
        out += [f"## `{section}` (conf/{name})", "", _summary(cls), "",
                "| key | default | allowed | what it is for |", "| --- | --- | --- | --- |",
                *_rows(cls, f"{section}."), ""]
    return "\n".join(out)


def outputs(root: Path) -> dict[Path, str]:
    """Every file this writes, and what it should hold."""
    files = {root / name: render(cls, key) for name, (cls, key) in FILES.items()}
    files[SOURCE_ROOT / "docs" / "settings.md"] = reference()
    return files


def stale(root: Path) -> list[Path]:
    """The files that differ from what the dataclasses make."""
    return [path for path, text in outputs(root).items() if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lipsync.apps.conf_files", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only say which files are out of date (exit 1)")
    args = parser.parse_args(argv)
    root = conf_dir()
    out_of_date = stale(root)
    if args.check:
        for path in out_of_date:
            print(f"{path} is out of date: run `make conf`", file=sys.stderr)
        return 1 if out_of_date else 0
    texts = outputs(root)
    for path in out_of_date:
        path.write_text(texts[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
