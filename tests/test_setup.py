"""`make setup`'s installer (tools/install.py): uv gets the index settings pip is configured with."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("install", ROOT / "tools" / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

LISTED = """global.cert='/etc/ssl/ca.crt'
global.constraint='/etc/pip/constraints.txt'
global.extra-index-url='file:///a/simple file:///b/simple'
global.find-links='/opt/old'
:env:.find-links='/opt/wheels'
install.no-index='false'
global.timeout='60'
"""


def test_pip_settings_are_read_with_the_environment_over_the_files():
    settings = install.parse_config_list(LISTED)
    assert settings["find-links"] == "/opt/wheels"  # PIP_FIND_LINKS wins over pip.conf, as in pip
    assert settings["extra-index-url"] == "file:///a/simple file:///b/simple" and settings["cert"] == "/etc/ssl/ca.crt"


def test_uv_is_given_pips_indexes_and_its_best_version_rule():
    command = install.uv_command(["-e", ".[dev]"], install.parse_config_list(LISTED))
    assert command is not None  # uv is a dev dependency: beside this interpreter
    pairs = list(zip(command, command[1:]))
    assert ("--index-strategy", "unsafe-best-match") in pairs
    assert {("--extra-index-url", "file:///a/simple"), ("--extra-index-url", "file:///b/simple"),
            ("--find-links", "/opt/wheels"), ("--constraint", "/etc/pip/constraints.txt")} <= set(pairs)
    assert "/opt/old" not in command and "--no-index" not in command and "60" not in command
    assert command[-2:] == ["-e", ".[dev]"] and "--compile-bytecode" in command


def test_installed_packages_are_imported_from_bytecode():
    """make setup compiles site-packages: with PYTHONDONTWRITEBYTECODE set (as in CI), a package without its .pyc
    files is compiled from source by every process that imports it (import torch: 3.5 s instead of 1.7 on 2 cores)."""

    import grpc
    import torch
    for module in (torch, torch.nn.modules.conv, grpc):
        assert Path(importlib.util.cache_from_source(module.__file__)).is_file(), module.__name__
