"""The light client as a user installs it: a fresh venv (no system site-packages) with `pip install ./clients/python`
holds no torch, torchvision, torchaudio, OpenVINO, onnxruntime or CUDA library and ≤ 120 MB besides pip/setuptools;
then, with the `[pipecat,livekit]` extras, the package's own tests (Synthesize/Stream/Converse, the Pipecat service
and the LiveKit generator) run from that venv against a real `lipsync serve`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_server import ServerProcess, model_override

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_client  # noqa: E402

pytestmark = pytest.mark.slow
MAX_MB = 120


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    python = bench_client.make_venv(tmp_path_factory.mktemp("light") / "venv")
    bench_client.pip_install(python, str(bench_client.CLIENT), fast=True)
    return python, bench_client.distributions(python)


def test_install_is_light(light_venv):
    python, sizes = light_venv
    assert bench_client.heavy(sizes) == []
    assert {"lipsync-client", "grpcio", "protobuf", "numpy", "simplejpeg", "soxr"} <= set(sizes)
    assert "lipsync" not in sizes  # the server's distribution is not pulled in
    assert bench_client.counted_mb(sizes) <= MAX_MB, sizes


def test_client_tests_pass_from_the_light_venv(light_venv, weights, tiny_avatar, tmp_path_factory):
    python, _ = light_venv
    bench_client.pip_install(python, f"{bench_client.CLIENT}[pipecat,livekit]", "pytest>=8", fast=True)
    server = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"), "server.live.time_scale=3"],
                           tmp_path_factory.mktemp("light-server"))
    try:
        env = {**os.environ, "LIPSYNC_TEST_SERVER": server.target, "LIPSYNC_TEST_MODEL": "tiny",
               "LIPSYNC_TEST_SPEECH": str(ROOT / "assets" / "speech.wav")}
        env.pop("PYTHONPATH", None)
        run = subprocess.run([str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                             cwd=bench_client.CLIENT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:] + "\n--- server log ---\n" + server.logs()[-3000:]
    assert re.search(r"^8 passed", report, re.M) and "skipped" not in report, report[-3000:]  # nothing skipped
