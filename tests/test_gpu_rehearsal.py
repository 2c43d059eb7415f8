"""The rehearsal of the GPU run, its fast part: on this machine, with every package the GPU host lacks made
unimportable (tools/gpu_rehearsal.py --simulate), the in-process GPU path imports on the bare image, the CUDA tests
collect with no error, and a server started with the device bundle alone serves. An import that would stop
`make gpu-check` on the GPU host fails here first. The device bundle's list is what pyproject.toml derives.
(`make gpu-rehearsal` is the whole thing: a Python 3.12 venv of the image's packages and every gpu-check step.)"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT, SPEECH
from test_server import ServerProcess, model_override

sys.path.insert(0, str(ROOT / "tools"))
import gpu_bundle  # noqa: E402
import gpu_rehearsal  # noqa: E402

from lipsync._proto import lipsync_pb2 as pb  # noqa: E402
from lipsync._proto import lipsync_pb2_grpc as pb_grpc  # noqa: E402
from lipsync.apps.client import channel  # noqa: E402
from lipsync.codec import audio  # noqa: E402


def on_the_host(folder, *code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT / "clients" / "python"), str(ROOT)])}
    return subprocess.run([sys.executable, *code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_the_bundle_is_what_pyproject_derives():
    assert gpu_bundle.derive() == gpu_bundle.listed(), "run `python tools/gpu_bundle.py write`"
    assert {"hydra-core", "grpcio-health-checking"} <= {r.split("==")[0] for r in gpu_bundle.listed()}
    assert not set(gpu_bundle.LEFT_OUT) & {r.split("==")[0] for r in gpu_bundle.listed()}


def test_the_blocker_stands_for_the_bare_image(tmp_path):
    """The guard fires: on the bare image hydra (a lipsync dependency the image lacks) cannot be imported; with
    the bundle it can, and PyAV (left out of the bundle) still cannot."""
    bare, bundled = gpu_rehearsal.blocker(False, tmp_path), gpu_rehearsal.blocker(True, tmp_path)
    refused = on_the_host(bare, "-c", "import hydra")
    assert refused.returncode != 0 and "the GPU host does not have it" in refused.stderr
    assert on_the_host(bundled, "-c", "import hydra, grpc_health.v1.health").returncode == 0
    assert "the GPU host does not have it" in on_the_host(bundled, "-c", "import av").stderr
    assert on_the_host(bundled, "-c", "import torch, grpc, onnxruntime, lipsync_client").returncode == 0


def test_the_gpu_path_imports_and_its_cuda_tests_collect_on_the_bare_image():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_rehearsal.py"), "--simulate", "--steps",
                           "imports"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "rehearsal passed" in done.stdout and "tests collected" in done.stdout


def test_a_server_with_the_bundle_alone_serves(weights, tiny_avatar, tmp_path):
    """`lipsync serve` (python -m lipsync, no console script) where only the image and the bundle are: starts,
    serves grpc.health.v1 and a Synthesize."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    bundled = gpu_rehearsal.blocker(True, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bundled), str(ROOT / "clients" / "python"), str(ROOT)])}
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160")], tmp_path, env=env)
    pcm = (audio.load_wav(SPEECH)[:6000].numpy() * 32767).astype(np.int16).tobytes()

    async def main():
        async with channel(srv.target) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            got = await pb_grpc.LipSyncStub(ch).Synthesize(pb.SynthesizeRequest(
                model_id="tiny", audio=pcm, format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000,
                                                                  channels=1)))
            return health, got
    try:
        health, got = asyncio.run(main())
    finally:
        assert srv.stop() == 0, srv.logs()
    assert health.status == health_pb2.HealthCheckResponse.SERVING and len(got.frames) > 0
    assert "the GPU host does not have it" not in srv.logs()
