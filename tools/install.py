"""Install packages into this interpreter's venv with uv, from the indexes pip is configured with; pip if uv fails.

`make setup` lays out ~6 GB of wheels (torch and its CUDA libraries). pip unpacks them one by one in over a minute
every time; uv links them from its cache in seconds after the first time. uv does not read pip's configuration, so
this passes pip's index settings (config files and PIP_* variables, as `pip config list` shows them) on, with pip's
rule of taking the best version across all indexes. Usage: python tools/install.py <pip install arguments>."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# pip setting → uv option; values of the list settings are whitespace-separated, as in pip.conf
LIST_OPTIONS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}
SINGLE_OPTIONS = {"index-url": "--index-url"}


def pip_settings() -> dict[str, str]:
    """pip's effective settings by key, from `pip config list`."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    return parse_config_list(listed.stdout)


def parse_config_list(text: str) -> dict[str, str]:
    """`pip config list` lines (`global.key='value'`, `:env:.key='value'`) → settings by key, the environment's
    PIP_* over the config files'."""
    settings: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        value = value.strip().strip("'\"")
        if section == ":env:":
            env[key] = value
        elif section in ("global", "install"):
            settings[key] = value
    return {**settings, **env}


def uv_command(args: list[str], settings: dict[str, str]) -> list[str] | None:
    """`uv pip install args` into this interpreter with pip's index settings; None where uv is not installed."""
    uv = Path(sys.executable).with_name("uv")
    uv = str(uv) if uv.is_file() else shutil.which("uv")
    if uv is None:
        return None
    # --compile-bytecode: uv leaves compiling to the first import, and where PYTHONDONTWRITEBYTECODE is set (CI, many
    # containers) that first import never writes it: every process compiled torch from source again (import torch
    # 3.5 → 1.7 s on 2 cores with the bytecode; the suite starts hundreds of processes). ~30 s once per venv.
    command = [uv, "pip", "install", "--python", sys.executable, "--quiet", "--index-strategy", "unsafe-best-match",
               "--compile-bytecode"]
    for key, value in settings.items():
        if key in LIST_OPTIONS:
            for item in value.split():
                command += [LIST_OPTIONS[key], item]
        elif key in SINGLE_OPTIONS:
            command += [SINGLE_OPTIONS[key], value]
        elif key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
            command.append("--no-index")
    return command + args


def main(args: list[str]) -> int:
    settings = pip_settings()
    command = uv_command(args, settings)
    if command is not None:
        env = dict(os.environ)
        cert = settings.get("cert")
        if cert and "SSL_CERT_FILE" not in env:
            env["SSL_CERT_FILE"] = cert
        if subprocess.run(command, env=env).returncode == 0:
            return 0
        print(f"uv could not install ({shlex.join(command)}); installing with pip", file=sys.stderr)
    return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args]).returncode  # pip compiles


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
