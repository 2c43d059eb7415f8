"""Faults, limits and configuration: no input, fault or setting takes a model or the server down."""
from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
import torch
from conftest import ROOT
from test_server import ServerProcess, _code, call, model_override, synth

from lipsync._proto import lipsync_pb2 as pb
from lipsync.codec import audio
from lipsync.errors import InvalidRequest, status_of
from lipsync.model import audio_features
from lipsync.model.engines import EngineConfig, build_engine, compile_buckets
from lipsync.model.networks import CheckpointError, load_generator
from lipsync.runtime.messages import Audio, EndOfAudio
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler
from lipsync.runtime.streaming import StreamSession


# --------------------------------------------------------------------------- engines and batches
def test_compiled_engine_serves_a_batch_between_buckets(monkeypatch):
    """micro-batch 12 with buckets [1,2,4,8]: the engine's largest bucket is its max batch, never a hang. The
    bucketing is what is under test, so torch.compile passes the module through (inductor itself is checked
    against eager in test_engines; on 2 cores it costs half a minute per process)."""
    compiled: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(options) or module)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    config = EngineConfig.from_dict({"backend": "compile", "batch_buckets": [1, 2, 4, 8], "max_batch": 12,
                                     "opt_batch": 8, "warmup": False})
    engine = build_engine(net, [(3, 8, 8)], config, "cpu", "tiny")
    assert compiled == [{"mode": None, "dynamic": False, "fullgraph": True}] and compile_buckets(config)[-1] == 12
    x = torch.rand(12, 3, 8, 8)
    for n in (12, 11, 5):  # the max batch itself, and batches padded up to 12 and to 8
        torch.testing.assert_close(engine(x[:n]), net(x[:n]), atol=1e-5, rtol=1e-5)


def test_a_failing_batch_fails_only_its_requests(pipeline, monkeypatch):
    """A batch that raises (even StopIteration, which cannot cross into an asyncio future) fails exactly its
    requests; the batcher keeps serving the next ones."""
    real_infer, calls = pipeline.infer, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise StopIteration
        return real_infer(*args, **kwargs)
    monkeypatch.setattr(pipeline, "infer", flaky)

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4, max_delay_ms=0)
        scheduler.start()
        feats, ids = torch.zeros(4, 32, 16, 16), pipeline.avatar.frames_for(0, 0, 4)
        first = scheduler.submit(feats, ids, 75)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(first, 60)
        jpegs, _ = await asyncio.wait_for(scheduler.submit(feats, ids, 75), 60)
        await scheduler.stop()
        return jpegs
    assert len(asyncio.run(main())) == 4


# --------------------------------------------------------------------------- audio
def test_resampling_any_allowed_rate_is_cheap():
    """Rates with a huge polyphase kernel (8001 Hz: 16000 phases) resample directly, in bounded memory."""
    script = textwrap.dedent("""
        import resource, time, torch
        from lipsync.codec import audio
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        for rate in (8001, 47999, 44101):
            out = audio.resample(torch.rand(rate) - 0.5, rate)
            assert out.numel() == 16000, out.numel()
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(grown, time.perf_counter() - t0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    grown_mb, seconds = map(float, done.stdout.split())
    assert grown_mb < 300 and seconds < 20, (grown_mb, seconds)


def test_direct_resampling_matches_torchaudio():
    wave = torch.rand(44100) - 0.5
    resampler = audio.StreamResampler(44100)
    resampler.polyphase = False  # force the direct evaluation on a rate torchaudio handles too
    direct = torch.cat([resampler.push(wave[:10000]), resampler.push(wave[10000:]), resampler.finish()])
    torch.testing.assert_close(direct, audio.resample(wave, 44100), atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels,rate,text", [(0, 16000, "0 channels"), (1, 0, "sample rate 0")])
def test_wav_header_fields_are_validated(channels, rate, text):
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2, 2, 16)
    blob = b"RIFF" + struct.pack("<I", 36 + 8) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + \
        b"data" + struct.pack("<I", 8) + bytes(8)
    with pytest.raises(audio.AudioFormatError, match=text):
        audio.parse_wav(blob)


# --------------------------------------------------------------------------- statuses
def test_only_request_errors_are_client_errors():
    assert status_of(InvalidRequest("bad")) == ("INVALID_ARGUMENT", "bad")
    assert status_of(ValueError("a bug"))[0] == "INTERNAL"  # a plain ValueError is a bug, not bad input
    assert status_of(KeyError("x"))[0] == "INTERNAL"


def test_wrong_variant_says_what_to_do(weights):
    with pytest.raises(CheckpointError) as info:
        load_generator(weights["160"], "328")
    assert str(info.value).startswith("this looks like the 160 variant: pass --variant 160")


# --------------------------------------------------------------------------- flow control
def test_a_stream_that_is_not_read_stops_reading(pipeline, speech):
    """A client that sends 10 s of audio but takes no frames: the server renders at most its buffer ahead."""
    pcm = (speech.repeat(3)[:160000].numpy() * 32767).astype(np.int16).tobytes()

    async def main():
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=4)
        scheduler.start()
        session = StreamSession(scheduler, audio.AudioFormat("s16le", 16000, 1), 0, 75, audio_features.LOOKAHEAD,
                                buffer_frames=12, max_audio_s=600)
        read = []

        async def messages():
            for lo in range(0, len(pcm), 3200):
                read.append(lo)
                yield Audio(pcm[lo:lo + 3200])
            yield EndOfAudio()
        chunks = session.run(messages())
        await chunks.__anext__()  # the client takes one chunk, then stops reading
        await asyncio.sleep(6)
        buffered, consumed = session._buffered, len(read)
        await chunks.aclose()
        await scheduler.stop()
        return buffered, consumed
    buffered, consumed = asyncio.run(main())
    assert buffered <= 12 + 5  # the buffer, plus the frames of the step that filled it
    assert consumed * 3200 < len(pcm) // 2  # the reader stopped long before the end of the audio


def _server_cfg(**changes):
    from lipsync.config import load_config
    cfg = load_config()
    for key, value in changes.items():
        cfg.server[key] = value
    return cfg.server


# --------------------------------------------------------------------------- a server with tight limits
@pytest.fixture(scope="module")
def tight(weights, tiny_avatar, tmp_path_factory):
    """Queue of 8 frames, 100 kB messages."""
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"),
                         model_override("cold", weights, tiny_avatar, variant="160"),
                         "registry.max_queue_frames=8", "server.max_message_mb=0.1"],
                        tmp_path_factory.mktemp("tight"))
    yield srv
    srv.stop()


def _pcm(speech, seconds: float) -> bytes:
    return (speech.repeat(4)[:int(seconds * 16000)].numpy() * 32767).astype(np.int16).tobytes()


def test_requests_longer_than_the_queue_are_split(tight, speech):
    pcm = _pcm(speech, 0.6)  # 15 frames, the queue holds 8
    response = call(tight, lambda s, m: s.Synthesize(synth(pcm)))
    assert len(response.frames) == audio_features.frame_count(len(pcm) // 2) > 8


def test_a_response_that_cannot_be_sent_is_refused_before_work(tight, speech):
    before = call(tight, lambda s, m: s.GetModelStats(pb.GetModelStatsRequest(model_id="tiny"))).models[0].info.frames
    pcm8k = (audio.resample(speech.repeat(2)[:48000], 16000, 8000).numpy() * 32767).astype(np.int16).tobytes()
    request = synth(pcm8k, format=pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=8000))  # 48 kB in, 75 frames out
    code, details = _code(tight, lambda s, m: s.Synthesize(request))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Stream" in details and "max_message_mb" in details
    after = call(tight, lambda s, m: s.GetModelStats(pb.GetModelStatsRequest(model_id="tiny"))).models[0].info.frames
    assert after == before


def test_a_live_utterance_longer_than_the_queue_plays(tight, speech):
    from lipsync._proto import lipsync_pb2_grpc as pb_grpc
    from lipsync.apps.client import Say, channel, converse

    pcm = _pcm(speech, 0.6)  # 15 frames, the queue holds 8

    async def main():
        async with channel(tight.target) as ch:
            return await converse(pb_grpc.LipSyncStub(ch), "tiny", [Say(pcm, audio.AudioFormat("s16le", 16000, 1),
                                                                         0.1, id="u")], 60.0,
                                  until_played=True)  # its start is planned from the measured speed: late when busy
    result = asyncio.run(main())
    finished = [e.finished for _, e in result.events if e.WhichOneof("event") == "finished"]
    assert finished and not finished[0].interrupted, result.summary()
    assert finished[0].frames_played == audio_features.frame_count(len(pcm) // 2) > 8


def test_a_cancelled_cold_load_is_shared_not_repeated(tight, speech):
    pcm = _pcm(speech, 0.3)
    code, _ = _code(tight, lambda s, m: s.Synthesize(synth(pcm, model_id="cold"), timeout=0.2))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    response = call(tight, lambda s, m: s.Synthesize(synth(pcm, model_id="cold")))
    assert len(response.frames) == audio_features.frame_count(len(pcm) // 2)
    assert tight.logs().count("loading model cold on") == 1


def test_concurrent_loads_respect_max_models(weights, tiny_avatar, tmp_path):
    srv = ServerProcess([model_override("a", weights, tiny_avatar, variant="160"),
                         model_override("b", weights, tiny_avatar, variant="160"), "registry.max_models=1"], tmp_path)
    try:
        async def both(s, m):
            return await asyncio.gather(s.LoadModel(pb.LoadModelRequest(model_id="a")),
                                        s.LoadModel(pb.LoadModelRequest(model_id="b")))
        call(srv, both)
        listed = call(srv, lambda s, m: s.ListModels(pb.ListModelsRequest()))
        assert sum(x.loaded for x in listed.models) == 1
        assert "eviction to make room" in srv.logs()
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("changes,code,text", [
    (dict(model_id="x" * 100_000), grpc.StatusCode.INVALID_ARGUMENT, "100000 characters"),
    (dict(model_id="tiny", device="bogus"), grpc.StatusCode.INVALID_ARGUMENT, "not a device name"),
    (dict(model_id="tiny", device="cuda:7"), grpc.StatusCode.INVALID_ARGUMENT, "not served here"),
])
def test_bad_load_requests(tight, changes, code, text):
    got, details = _code(tight, lambda s, m: s.LoadModel(pb.LoadModelRequest(**changes)))
    assert got == code and text in details and len(details) < 400, (got, details[:300])


# --------------------------------------------------------------------------- start-up
def _serve(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1",
                           "server.metrics_port=-1", "models=none", "engine=eager", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_a_busy_port_is_refused_in_one_line(tight):
    done = _serve([f"server.port={tight.port}"])
    assert done.returncode == 2 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert f"cannot listen on 127.0.0.1:{tight.port} (server.host / server.port)" in last
    assert "Traceback" not in done.stderr


def test_a_second_server_moves_off_the_default_metrics_port(tmp_path):
    """The default metrics port (9090) taken, as by a first server on this machine: the second serves anyway, its
    metrics on a free port, and says so in one WARNING line (a port set in the configuration is refused instead,
    below)."""
    import re
    import socket

    from lipsync.api.server import DEFAULT_METRICS_PORT
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", DEFAULT_METRICS_PORT))
        held.listen()
    except OSError:
        pass  # already taken by something else: taken either way
    log = tmp_path / "second.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1", "server.port=0",
                                 f"server.metrics_port={DEFAULT_METRICS_PORT}", "models=none", "engine=eager"],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        try:
            ready = proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(60)
            held.close()
    text = log.read_text()
    assert ready.startswith("READY port="), text[-2000:]
    moved = re.search(rf"metrics port {DEFAULT_METRICS_PORT} is taken .*: /metrics is on port (\d+) instead", text)
    assert moved and int(moved.group(1)) != DEFAULT_METRICS_PORT, text[-2000:]


def test_a_busy_metrics_port_is_refused_in_one_line(tight):
    import re
    port = int(re.search(r"metrics on http://[\d.]+:(\d+)", tight.logs()).group(1))
    done = _serve(["server.port=0", f"server.metrics_port={port}"])
    assert done.returncode == 2 and "(server.metrics_host / server.metrics_port): Address already in use" in \
        done.stderr and "Traceback" not in done.stderr


def test_broken_models_stop_the_start(weights, tiny_avatar, tmp_path):
    broken = model_override("broken", {**weights, "328": weights["160"]}, tiny_avatar)  # a 160 checkpoint as 328
    done = _serve(["server.port=0", broken, model_override("good", weights, tiny_avatar)])
    assert done.returncode == 2 and "1 declared model(s) are broken (broken)" in done.stderr
    assert "this looks like the 160 variant" in done.stderr  # the log says why, at ERROR
    check = subprocess.run([sys.executable, "-m", "lipsync", "serve", "--check", "models=none", broken,
                            model_override("good", weights, tiny_avatar)], capture_output=True, text=True,
                           timeout=120, cwd=ROOT)
    assert check.returncode == 1
    assert '"good": "ok"' in check.stdout and '"broken": "checkpoint: this looks like' in check.stdout


def test_check_holds_a_drawn_avatars_model_to_its_weights(weights, tmp_path):
    """A model whose avatar is drawn on its first load (`synthetic`, as the demo): `serve --check` still checks its
    checkpoint and audio encoder (a container that did not ship them fails here, not at the first call), and
    accepts the avatar not drawn yet."""
    def declared(name: str, checkpoint) -> str:
        return (f"+models.{name}={{checkpoint:{checkpoint},audio_encoder:{weights['encoder']},"
                f"avatar:{tmp_path / name / 'presenter'},synthetic:true}}")
    check = subprocess.run([sys.executable, "-m", "lipsync", "serve", "--check", "models=none",
                            declared("shipped", weights["328"]), declared("unshipped", tmp_path / "missing.pth")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert check.returncode == 1, check.stdout + check.stderr
    assert '"shipped": "ok"' in check.stdout and '"unshipped": "checkpoint:' in check.stdout


def test_uvloop_without_its_package_is_one_line():
    """server.event_loop=uvloop where uvloop is not installed (hidden from this process): the install hint, exit 2."""
    script = ("import sys; sys.modules['uvloop'] = None; from lipsync.apps.cli import main; "
              "sys.exit(main(['serve', 'server.event_loop=uvloop', 'models=none', 'server.port=0', "
              "'server.metrics_port=-1']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("lipsync serve: server.event_loop='uvloop': the uvloop package is not installed "
                                   "(pip install -e '.[uvloop]' from a checkout)")


def test_a_mistyped_override_is_one_line():
    done = _serve(["server.prot=1"])
    assert done.returncode == 2
    assert done.stderr.strip() == ("lipsync serve: unknown setting 'server.prot': `server` has auth, "
                                   "config_timeout_s, drain_s, event_loop, host, jpeg_quality, keepalive_time_s, "
                                   "keepalive_timeout_s, live, max_audio_seconds, max_concurrent_rpcs, "
                                   "max_connection_streams, max_message_mb, max_start_frame, max_streams, "
                                   "metrics_auth, metrics_host, metrics_port, metrics_token_file, port, "
                                   "shutdown_grace_s, stream_buffer_frames, stream_idle_timeout_s, strict_models, "
                                   "tls, worker_name (add a new key with +server.prot=…)")


# every invalid value of conf/ is refused at start: exit 2, one line naming the key, the value and what is allowed
BAD_SETTINGS = [
    ("registry.eviction=fifo", "registry.eviction='fifo': must be one of lfu, lru"),
    ("server.live.duty_cycle=2", "server.live.duty_cycle=2.0: must be a number in (0, 1]"),
    ("registry.memory_budget_mb=-5", "registry.memory_budget_mb=-5.0: must be a number >= 0"),
    ("server.max_streams=-1", "server.max_streams=-1: must be a whole number >= 0"),
    ("registry.max_queue_frames=-3", "registry.max_queue_frames=-3: must be a whole number >= 1"),
    ("server.port=abc", "server.port='abc': must be a whole number in 0..65535"),
    ("server.port=70000", "server.port=70000: must be a whole number in 0..65535"),
    ("server.strict_models=maybe", "server.strict_models='maybe': must be true or false"),
    ("server.jpeg_quality=0", "server.jpeg_quality=0: must be a whole number in 1..100"),
    ("server.config_timeout_s=0", "server.config_timeout_s=0.0: must be a number > 0"),
    ("server.event_loop=uv", "server.event_loop='uv': must be one of asyncio, uvloop"),
    ("server.metrics_auth=sometimes", "server.metrics_auth='sometimes': must be one of auto, open, token"),
    ("server.live.time_scale=0", "server.live.time_scale=0.0: must be a number in (0, 1000]"),
    ("server.live.max_utterance_s=-1", "server.live.max_utterance_s=-1.0: must be a number > 0"),
    ("server.max_message_mb=0.01", "server.max_message_mb=0.01: must be a number in 0.0625..2047"),
    ("engine.backend=fast", "engine.backend='fast': must be one of auto, tensorrt, compile, onnxruntime, openvino, "
                            "eager"),
    ("engine.max_batch=0", "engine.max_batch=0: must be a whole number in 1..1024"),
    ("engine.tune_seconds=-1", "engine.tune_seconds=-1.0: must be a number > 0"),
    ("pipeline.micro_batch.cpu=x", "pipeline.micro_batch.cpu='x': must be auto or a whole number in 1..1024"),
    ("logging.level=LOUD", "logging.level='LOUD': must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("device=tpu", "device='tpu': must be auto, cpu, cuda or cuda:N of this machine"),
    ("registry.devices=[cuda:0]", "registry.devices='cuda:0': must be auto, cpu, cuda or cuda:N of this machine "
                                  "(CUDA is not available here)"),
    ("+models.x={checkpoint:/a,audio_encoder:/b,avatar:/c,variant:'999'}",
     "models.x.variant='999': must be one of 328, 160"),
    ("+models.x={checkpoint:/a,audio_encoder:/b,avatar:/c,feather:-2}",
     "models.x.feather=-2: must be a whole number in 0..164"),
    ("+models.x={checkpoint:/a,audio_encoder:/b,avatar:/c,compose:soft}",
     "models.x.compose='soft': must be one of paste, blend"),
]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the device cases assume no CUDA")
def test_every_invalid_setting_is_one_line():
    """All cases in one process per case would cost minutes of imports: `lipsync serve --check` runs them in
    process through the console entry point, and two run as real processes (exit code and stderr)."""
    import contextlib
    import io

    from lipsync.apps.cli import main
    for override, message in BAD_SETTINGS:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["serve", "--check", "models=none", override])
        lines = [line for line in err.getvalue().splitlines() if not line[:4].isdigit()]  # log lines start 2026-…
        assert code == 2 and lines == [f"lipsync serve: {message}"], (override, code, err.getvalue())
    for override, message in BAD_SETTINGS[:2]:
        done = _serve([override])
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == f"lipsync serve: {message}", \
            done.stderr
        assert "Traceback" not in done.stderr


def _threads(pid: int) -> int:
    return int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("Threads:")))


def test_half_open_metrics_connections_are_bounded_and_timed_out(tight):
    """40 connections that send half a request: no thread per connection, at most 16 held, all closed by the
    head timeout (5 s); a real scrape still works during and after."""
    import re
    import socket
    import urllib.request
    port = int(re.search(r"metrics on http://[\d.]+:(\d+)", tight.logs()).group(1))
    threads = _threads(tight.proc.pid)
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /metr")
        socks.append(s)
    time.sleep(1.0)
    assert _threads(tight.proc.pid) <= threads + 2  # the loop's executor may start a thread for a scrape
    closed_now = 0
    for s in socks:
        s.settimeout(0.2)
        try:
            closed_now += s.recv(1) == b""
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed_now += 1
    assert closed_now >= 40 - 16  # beyond the bound, closed at once
    started = time.monotonic()
    for s in socks:
        s.settimeout(10)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
        s.close()
    assert time.monotonic() - started < 8  # the held ones by the head timeout
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "lipsync_requests_total" in text and "lipsync_queue_frames" in text


def test_streamed_answers_are_sized_before_the_work(weights, tiny_avatar, tmp_path, speech):
    """With a small server.max_message_mb (64 KB) and JPEG quality 98: one audio message of a whole second is
    answered in responses that each fit (not one response gRPC refuses to send after the frames were encoded), the
    frames are all there and in order; GetAvatar's frames, one a message, come too."""
    from lipsync._proto import lipsync_pb2_grpc as pb_grpc
    from lipsync.apps.client import channel, open_stream
    S16 = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=16000, channels=1)
    srv = ServerProcess([model_override("tiny", weights, tiny_avatar, variant="160"),
                         "server.max_message_mb=0.0625"], tmp_path)
    pcm = (speech[:16000].numpy() * 32767).astype(np.int16).tobytes()  # 32 KB: one message under the limit

    async def main():
        async with channel(srv.target) as ch:
            stub = pb_grpc.LipSyncStub(ch)

            async def requests():
                yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=S16, jpeg_quality=98))
                yield pb.StreamRequest(audio=pcm)
                yield pb.StreamRequest(end_of_audio=True)
            responses = [r async for r in open_stream(stub.Stream, requests())]
            avatar = [f async for f in stub.GetAvatar(pb.GetAvatarRequest(model_id="tiny", jpeg_quality=98))]
            return responses, avatar
    try:
        responses, avatar = asyncio.run(main())
    finally:
        srv.stop()
    frames = [f for r in responses for f in r.frames]
    assert [f.index for f in frames] == list(range(audio_features.frame_count(16000)))
    assert max(r.ByteSize() for r in responses) <= 64 * 1024 and len(responses) > 3
    assert len(avatar) == 6 and "Traceback" not in srv.logs()
