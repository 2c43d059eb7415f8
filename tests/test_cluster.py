"""`lipsync cluster`: real workers behind a real Envoy on 127.0.0.1 — routing by x-model-id, bounded load,
a killed worker, a draining worker, and the same frames as direct."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, worst_psnr
from test_server import S16

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import Say, channel, converse, open_stream, routing, worker_lost, worker_of
from lipsync.codec import audio
from lipsync.model import audio_features

MODELS = [f"m{k}" for k in range(16)]  # the same small model under 16 names: routing keys to spread


def envoy_missing() -> str | None:
    try:
        from lipsync.apps.cluster import envoy_binary
        binary = envoy_binary()
        subprocess.run([str(binary), "--version"], capture_output=True, check=True, timeout=30)
    except Exception as exc:  # not installed, or not runnable on this machine
        return f"Envoy is not available: {exc}"
    return None


pytestmark = pytest.mark.skipif(envoy_missing() is not None, reason=str(envoy_missing()))


class ClusterProcess:
    """`lipsync cluster` as a user starts it; parses its WORKER / READY lines."""

    def __init__(self, tmp: Path, overrides: list[str], workers: int = 2):
        self.proc = subprocess.Popen([sys.executable, "-m", "lipsync", "cluster", "--workers", str(workers),
                                      "--port", "0", "--log-dir", str(tmp), "--health-interval-s", "0.5",
                                      "--drain-s", "1.5", *overrides],
                                     stdout=subprocess.PIPE, stderr=open(tmp / "cluster.log", "w"), text=True,
                                     cwd=ROOT)
        self.workers: dict[str, dict[str, str]] = {}
        for line in self.proc.stdout:
            if line.startswith("WORKER "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                self.workers[fields["name"]] = fields
            if line.startswith("READY "):
                self.port = int(re.search(r"port=(\d+)", line)[1])
                break
        else:
            raise RuntimeError(f"cluster did not start: {(tmp / 'cluster.log').read_text()}")
        self.target = f"127.0.0.1:{self.port}"

    def next_line(self, prefix: str, timeout_s: float = 120) -> str:
        """The next line of the cluster's stdout that starts with `prefix` (after READY: restarted workers)."""
        import select
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                if line.startswith(prefix):
                    return line
        raise AssertionError(f"no {prefix!r} line within {timeout_s:g} s")

    def direct(self, worker: str) -> str:
        return f"127.0.0.1:{self.workers[worker]['port']}"

    def signal_worker(self, worker: str, sig: int) -> None:
        os.kill(int(self.workers[worker]["pid"]), sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def overrides(weights, tiny_avatar) -> list[str]:
    # the 160 variant: routing, not rendering, is under test here, and it renders several times faster on a CPU
    model = f"{{checkpoint:{weights['160']},audio_encoder:{weights['encoder']},avatar:{tiny_avatar},variant:'160'}}"
    return ["engine=onnxruntime", "models=none", "server.live.time_scale=3", *[f"+models.{m}={model}" for m in MODELS]]


@pytest.fixture(scope="module")
def cluster(weights, tiny_avatar, tmp_path_factory):
    # the default port=0 is passed through to Envoy, which then picks one; read it from READY
    c = ClusterProcess(tmp_path_factory.mktemp("cluster"), overrides(weights, tiny_avatar))
    yield c
    assert c.stop() == 0


@pytest.fixture(scope="module")
def pcm(speech) -> bytes:
    return (speech[2000:2000 + 4800].numpy() * 32767).astype(np.int16).tobytes()  # 0.3 s


async def _synthesize(target: str, model: str, pcm: bytes) -> tuple[pb.SynthesizeResponse, str]:
    async with channel(target) as ch:
        call = pb_grpc.LipSyncStub(ch).Synthesize(pb.SynthesizeRequest(model_id=model, audio=pcm, format=S16),
                                                 metadata=routing(model), timeout=120)
        return await call, await worker_of(call)


async def _route(target: str, model: str) -> str:
    """Which worker Envoy sends `model`'s calls to (a cheap call carrying the routing key)."""
    async with channel(target) as ch:
        call = pb_grpc.LipSyncStub(ch).ListModels(pb.ListModelsRequest(), metadata=routing(model), timeout=30)
        await call
        return await worker_of(call)


def routes(cluster) -> dict[str, str]:
    async def main():
        return {m: await _route(cluster.target, m) for m in MODELS}
    return asyncio.run(main())


async def _stream(target: str, model: str, pcm: bytes) -> tuple[list[pb.Frame], str]:
    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(model_id=model, format=S16))
        yield pb.StreamRequest(audio=pcm)
        yield pb.StreamRequest(end_of_audio=True)
    async with channel(target) as ch:
        call = open_stream(pb_grpc.LipSyncStub(ch).Stream, requests(), metadata=routing(model), timeout=120)
        frames = [f async for r in call for f in r.frames]
        return frames, await worker_of(call)


def test_calls_through_envoy_equal_direct_ones(cluster, pcm):
    via, worker = asyncio.run(_synthesize(cluster.target, "m0", pcm))
    direct, same = asyncio.run(_synthesize(cluster.direct(worker), "m0", pcm))
    assert same == worker and len(via.frames) == audio_features.frame_count(len(pcm) // 2)
    assert worst_psnr(via.frames, direct.frames) >= 40
    streamed, stream_worker = asyncio.run(_stream(cluster.target, "m0", pcm))
    assert stream_worker == worker and worst_psnr(streamed, via.frames) >= 40


def test_a_live_session_through_envoy(cluster, speech):
    pcm = (speech[:8000].numpy() * 32767).astype(np.int16).tobytes()
    says = [Say(pcm, audio.AudioFormat("s16le", 16000, 1), at=0.1)]

    async def main():
        async with channel(cluster.target) as ch:
            return await converse(pb_grpc.LipSyncStub(ch), "m0", says, 3.0, timeout=120)
    result = asyncio.run(main())
    # 3 media seconds: 75 slots (one more may go out while the client's half-close travels)
    assert len(result.frames) in (75, 76) and [f.index for f in result.frames] == list(range(len(result.frames)))
    assert any(f.kind == pb.SPEECH for f in result.frames)


def test_a_model_stays_on_one_worker_and_models_spread(cluster, pcm):
    table = routes(cluster)
    assert set(table.values()) == {"worker-0", "worker-1"}  # 16 keys hash over both workers
    assert routes(cluster) == table  # and each key always to the same one
    first = next(m for m in MODELS if table[m] != table["m0"])
    served = [asyncio.run(_synthesize(cluster.target, m, pcm))[1] for m in ("m0", first, "m0", first)]
    assert served == [table["m0"], table[first], table["m0"], table[first]]
    for worker in ("worker-0", "worker-1"):  # each model was loaded only where it was routed
        async def listed(target=cluster.direct(worker)):
            async with channel(target) as ch:
                return await pb_grpc.LipSyncStub(ch).ListModels(pb.ListModelsRequest())
        loaded = {m.model_id for m in asyncio.run(listed()).models if m.loaded}
        assert loaded == {m for m in ("m0", first) if table[m] == worker}


def test_bounded_load_spills_a_burst_to_the_second_worker(cluster):
    async def held(model: str, release: asyncio.Event) -> str:
        async def requests():
            yield pb.StreamRequest(config=pb.StreamConfig(model_id=model, format=S16))
            await release.wait()
            yield pb.StreamRequest(end_of_audio=True)
        async with channel(cluster.target) as ch:
            call = open_stream(pb_grpc.LipSyncStub(ch).Stream, requests(), metadata=routing(model), timeout=120)
            worker = await worker_of(call)
            async for _ in call:
                pass
            return worker

    async def main():
        release = asyncio.Event()
        sessions = []
        for _ in range(10):  # one after another, each open before the next
            sessions.append(asyncio.ensure_future(held("m0", release)))
            await asyncio.sleep(0.25)
        release.set()
        return await asyncio.gather(*sessions)
    workers = asyncio.run(main())
    assert set(workers) == {"worker-0", "worker-1"}, workers
    home = routes(cluster)["m0"]
    # Envoy's rule (factor 150, 2 workers, slots rounded up): the 8th concurrent stream is the first to spill
    assert workers[:7] == [home] * 7 and workers.count(home) >= 7


def _held_stream(target: str, model: str, pcm: bytes, started: asyncio.Event, release: asyncio.Event):
    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(model_id=model, format=S16))
        yield pb.StreamRequest(audio=pcm)
        await release.wait()
        yield pb.StreamRequest(audio=pcm)
        yield pb.StreamRequest(end_of_audio=True)

    async def run() -> tuple[str, int, str]:
        async with channel(target) as ch:
            call = open_stream(pb_grpc.LipSyncStub(ch).Stream, requests(), metadata=routing(model), timeout=120)
            worker, frames = await worker_of(call), 0
            started.set()
            try:
                async for response in call:
                    frames += len(response.frames)
            except grpc.aio.AioRpcError as exc:
                return worker, frames, "worker lost" if worker_lost(exc) else f"{exc.code().name}: {exc.details()}"
            return worker, frames, "OK"
    return run()


@pytest.fixture
def fresh_cluster(weights, tiny_avatar, tmp_path):
    """A cluster of its own, for a test that takes a worker down."""
    c = ClusterProcess(tmp_path, overrides(weights, tiny_avatar))
    yield c
    assert c.stop() == 0


async def _stream_then_signal(c: ClusterProcess, pcm: bytes, sig: int):
    """Open a stream for m0, then signal the worker serving it; returns (stream task, release event, worker)."""
    started, release = asyncio.Event(), asyncio.Event()
    stream = asyncio.ensure_future(_held_stream(c.target, "m0", pcm, started, release))
    await started.wait()
    home = await _route(c.target, "m0")
    c.signal_worker(home, sig)
    return stream, release, home


def test_a_killed_worker_is_routed_around(fresh_cluster, pcm):
    c = fresh_cluster

    async def main():
        stream, _, home = await _stream_then_signal(c, pcm, signal.SIGKILL)
        worker, _, code = await stream
        t0 = time.monotonic()
        while True:  # new sessions for its model succeed elsewhere, loading it there
            try:
                _, served = await _synthesize(c.target, "m0", pcm)
                return home, worker, code, served, time.monotonic() - t0
            except grpc.aio.AioRpcError:
                assert time.monotonic() - t0 < 20, "Envoy kept routing to the dead worker"
                await asyncio.sleep(0.2)
    home, worker, code, served, seconds = asyncio.run(main())
    assert worker == home and code == "worker lost"  # the in-flight stream ends (reset by Envoy)
    assert served != home and seconds < 20


def test_a_killed_worker_comes_back_and_the_first_call_after_the_kill_succeeds(fresh_cluster, pcm):
    """SIGKILL to the worker of a model: the very next call succeeds (Envoy retries it on another host, never the
    one that just failed), and `lipsync cluster` restarts the worker on its port; Envoy routes to it again."""
    c = fresh_cluster
    home = asyncio.run(_route(c.target, "m0"))
    c.signal_worker(home, signal.SIGKILL)
    _, served = asyncio.run(_synthesize(c.target, "m0", pcm))  # right after the kill: no retry loop here
    assert served != home
    back = dict(kv.split("=", 1) for kv in c.next_line(f"WORKER name={home} ").split()[1:])
    assert back["restarts"] == "1" and back["port"] == c.workers[home]["port"] and back["pid"] != \
        c.workers[home]["pid"]
    deadline = time.monotonic() + 60
    while asyncio.run(_route(c.target, "m0")) != home:  # its health check passes: its models route to it again
        assert time.monotonic() < deadline, "the restarted worker never took its model back"
        time.sleep(0.5)


def test_a_healthy_minority_keeps_serving(weights, tiny_avatar, tmp_path, pcm):
    """Two of three workers killed: every call goes to the one left (no panic routing to the dead), until they
    are back."""
    c = ClusterProcess(tmp_path, overrides(weights, tiny_avatar), workers=3)
    try:
        alive = "worker-2"
        for name in ("worker-0", "worker-1"):
            c.signal_worker(name, signal.SIGKILL)

        async def calls():  # models whose home was a dead worker among them: each call must still be served
            return [(await _synthesize(c.target, model, pcm))[1] for model in MODELS[:6]]
        served = asyncio.run(calls())
    finally:
        assert c.stop() == 0
    # (the killed ones restart meanwhile: they may serve the later calls)
    assert served[0] == alive and len(served) == 6, served


def test_a_draining_worker_finishes_its_stream_and_gets_nothing_new(fresh_cluster, pcm):
    c = fresh_cluster

    async def main():
        stream, release, home = await _stream_then_signal(c, pcm, signal.SIGTERM)
        await asyncio.sleep(1.0)  # two health checks: Envoy sees NOT_SERVING
        _, served = await _synthesize(c.target, "m0", pcm)
        release.set()
        return home, await stream, served
    home, (worker, frames, code), served = asyncio.run(main())
    assert worker == home and code == "OK" and frames == audio_features.frame_count(len(pcm))  # two chunks of 0.3 s
    assert served != home
    log_file, t0 = Path(c.workers[home]["log"]), time.monotonic()
    while "INFO lipsync.api.server: stopped" not in log_file.read_text():  # it exits once its work is done
        assert time.monotonic() - t0 < 60, log_file.read_text()[-2000:]
        time.sleep(0.2)
    assert "shutting down: reported NOT_SERVING" in log_file.read_text()
