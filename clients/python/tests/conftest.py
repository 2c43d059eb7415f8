"""The client package's tests run against a real lipsync server that the caller started: LIPSYNC_TEST_SERVER
(host:port), LIPSYNC_TEST_MODEL (a model it serves) and LIPSYNC_TEST_SPEECH (a speech WAV). The server's suite does
this from a fresh venv with only this package installed (tests/test_light_client.py)."""
from __future__ import annotations

import os

import pytest


def _setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(f"{name} is not set: these tests need a running lipsync server (see conftest.py)")
    return value


@pytest.fixture(scope="session")
def target() -> str:
    return _setting("LIPSYNC_TEST_SERVER")


@pytest.fixture(scope="session")
def model() -> str:
    return _setting("LIPSYNC_TEST_MODEL")


@pytest.fixture(scope="session")
def speech() -> tuple[bytes, object]:
    import lipsync_client as ls
    return ls.read_wav(_setting("LIPSYNC_TEST_SPEECH"))
