"""TLS, mutual TLS, bearer tokens with roles and quotas, slow-loris, SIGHUP reloads, no leaks: real servers on
127.0.0.1 with certificates from deploy/make-certs.sh (docs/security.md's set-up) and real clients."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT
from test_server import S16, ServerProcess, model_override

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync._proto import monolithic_pb2 as mono
from lipsync._proto import monolithic_pb2_grpc as mono_grpc
from lipsync.api.security import Principal, SecurityConfigError, TokenTable
from lipsync.apps.client import Credentials, channel, open_stream
from lipsync.model import audio_features

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="deploy/make-certs.sh needs openssl")

ADMIN, INFER, OTHER = "admin-" + "a" * 26, "infer-" + "b" * 26, "other-" + "c" * 26
PCM = np.zeros(3200, np.int16).tobytes()  # 0.2 s of silence


def make_certs(folder: Path, *names: str) -> Path:
    done = subprocess.run(["bash", str(ROOT / "deploy" / "make-certs.sh"), str(folder), *names],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    return {"a": make_certs(root / "a"), "b": make_certs(root / "b")}


def creds(pki, ca="a", client: str | None = "a", token: str | None = ADMIN) -> Credentials:
    return Credentials(token=token, ca=str(pki[ca] / "ca.pem"),
                       cert=str(pki[client] / "client.pem") if client else None,
                       key=str(pki[client] / "client.key") if client else None)


def tls_overrides(folder: Path, mutual: bool = True) -> list[str]:
    return [f"server.tls.cert={folder / 'server.pem'}", f"server.tls.key={folder / 'server.key'}",
            *([f"server.tls.client_ca={folder / 'ca.pem'}"] if mutual else [])]


async def _status(target: str, credentials: Credentials, rpc) -> tuple[str, str]:
    """The status name and details of one call (rpc takes the two stubs)."""
    async with channel(target, credentials=credentials) as ch:
        try:
            await asyncio.wait_for(rpc(pb_grpc.LipSyncStub(ch), mono_grpc.MonolithicServiceStub(ch)), 60)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
    return "OK", ""


def status(target: str, credentials: Credentials, rpc) -> tuple[str, str]:
    return asyncio.run(_status(target, credentials, rpc))


def health(s, m):
    return s.Health(pb.HealthRequest())


# --------------------------------------------------------------------------- TLS alone
@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    srv = ServerProcess(tls_overrides(pki["a"], mutual=False), tmp_path_factory.mktemp("tls"))
    yield srv
    srv.stop()


def test_tls_server_refuses_plaintext_and_foreign_cas(tls_server, pki):
    assert status(tls_server.target, creds(pki, client=None, token=None), health)[0] == "OK"
    assert status(tls_server.target, Credentials(), health)[0] == "UNAVAILABLE"  # plaintext client
    assert status(tls_server.target, creds(pki, ca="b", client=None), health)[0] == "UNAVAILABLE"  # unknown CA
    assert "over TLS (models" in tls_server.logs()


def test_a_plaintext_client_is_told_the_server_speaks_tls(tls_server, speech_1s_wav):
    done = subprocess.run([sys.executable, "-m", "lipsync", "client", "--server", tls_server.target, "--model", "x",
                           "--audio", str(speech_1s_wav), "--timeout", "20"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stdout and "pass --tls" in done.stdout, done.stdout


# --------------------------------------------------------------------------- mutual TLS and tokens
@pytest.fixture(scope="module")
def guarded(pki, weights, tiny_avatar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarded")
    tokens = tmp / "tokens"
    tokens.write_text(f"# lipsync tokens\n{ADMIN} admin name=ops\n{INFER} infer name=app streams=1 sessions=1\n"
                      f"{OTHER} infer name=other   # default quotas\n")
    (tmp / "scrape").write_text("scrape-token-0123456789\n")
    srv = ServerProcess([*tls_overrides(pki["a"]), f"server.auth.tokens_file={tokens}",
                         f"server.metrics_token_file={tmp / 'scrape'}", "server.config_timeout_s=1.5",
                         "server.max_streams=3", "server.strict_models=false", "server.live.time_scale=3",
                         model_override("tiny", weights, tiny_avatar, variant="160"),
                         model_override("spare", weights, tiny_avatar, variant="160"),
                         f"+models.missing={{checkpoint:{tmp / 'nope.pth'},audio_encoder:{weights['encoder']},"
                         f"avatar:{tiny_avatar}}}"], tmp)
    yield srv
    srv.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(guarded, pki):
    assert status(guarded.target, creds(pki), health)[0] == "OK"
    assert status(guarded.target, creds(pki, client=None), health)[0] == "UNAVAILABLE"  # no certificate
    assert status(guarded.target, creds(pki, client="b"), health)[0] == "UNAVAILABLE"  # another CA's
    assert status(guarded.target, Credentials(token=ADMIN), health)[0] == "UNAVAILABLE"  # plaintext


async def _stream_rpc(s, m):
    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=S16))
        yield pb.StreamRequest(audio=PCM)
        yield pb.StreamRequest(end_of_audio=True)
    return [r async for r in open_stream(s.Stream, requests())]


async def _converse_rpc(s, m):
    async def requests():
        yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="", format=S16))
    return [r async for r in open_stream(s.Converse, requests())]


RPCS = {  # method → (call, status for a caller allowed to make it)
    "Synthesize": (lambda s, m: s.Synthesize(pb.SynthesizeRequest(model_id="tiny", audio=PCM, format=S16)), "OK"),
    "Stream": (_stream_rpc, "OK"),
    "Converse": (_converse_rpc, "INVALID_ARGUMENT"),  # past the token check, stopped by the service itself
    "ListModels": (lambda s, m: s.ListModels(pb.ListModelsRequest()), "OK"),
    "GetModelStats": (lambda s, m: s.GetModelStats(pb.GetModelStatsRequest()), "OK"),
    "Health": (health, "OK"),
    "LoadModel": (lambda s, m: s.LoadModel(pb.LoadModelRequest(model_id="spare")), "OK"),
    "UnloadModel": (lambda s, m: s.UnloadModel(pb.UnloadModelRequest(model_id="spare")), "OK"),
    "compat.InferBatchComposite": (lambda s, m: m.InferBatchComposite(mono.CompositeBatchRequest(
        model_id="tiny", audio_features=np.zeros(8192, np.float32).tobytes(), batch_size=1)), "OK"),
    "compat.ListModels": (lambda s, m: m.ListModels(mono.ListModelsRequest()), "OK"),
    "compat.GetModelStats": (lambda s, m: m.GetModelStats(mono.GetModelStatsRequest()), "OK"),
    "compat.Health": (lambda s, m: m.Health(mono.HealthRequest()), "OK"),
    "compat.LoadModel": (lambda s, m: m.LoadModel(mono.LoadModelRequest(model_id="spare")), "OK"),
    "compat.UnloadModel": (lambda s, m: m.UnloadModel(mono.UnloadModelRequest(model_id="spare")), "OK"),
}
ADMIN_ONLY = {"LoadModel", "UnloadModel", "compat.LoadModel", "compat.UnloadModel"}


@pytest.mark.parametrize("method", list(RPCS))
def test_each_rpc_checks_the_token_and_its_role(guarded, pki, method):
    rpc, allowed = RPCS[method]
    assert status(guarded.target, creds(pki, token=None), rpc) == \
        ("UNAUTHENTICATED", "no token: send the metadata `authorization: Bearer TOKEN`")
    wrong = status(guarded.target, creds(pki, token="wrong-" + "x" * 26), rpc)
    assert wrong == ("UNAUTHENTICATED", "unknown token: the server does not accept this token"), wrong
    infer = status(guarded.target, creds(pki, token=INFER), rpc)
    if method in ADMIN_ONLY:
        assert infer == ("PERMISSION_DENIED", f"token 'app' lacks the admin role that {method.split('.')[-1]} needs")
    else:
        assert infer[0] == allowed, infer
    assert status(guarded.target, creds(pki, token=ADMIN), rpc)[0] == allowed


def test_standard_health_is_open_and_reflection_follows_config(guarded, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def probe():
        async with channel(guarded.target, credentials=creds(pki, token=None)) as ch:
            checked = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
            listed = [r async for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(ask())]
            return checked.status, len(listed[0].list_services_response.service)
    assert asyncio.run(probe()) == (health_pb2.HealthCheckResponse.SERVING, 4)  # server.auth.reflection=open


def test_token_quotas_keep_slots_for_other_tenants(guarded, pki):
    async def main():
        async with channel(guarded.target, credentials=creds(pki, token=INFER)) as ch:
            held = asyncio.Queue()

            async def requests():
                yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=S16))
                yield pb.StreamRequest(audio=PCM * 5)  # 1 s: frames come before the end of audio
                await held.get()  # keep the stream open until told
                yield pb.StreamRequest(end_of_audio=True)
            first = open_stream(pb_grpc.LipSyncStub(ch).Stream, requests()).__aiter__()
            await first.__anext__()  # open and flowing
            second = await _status(guarded.target, creds(pki, token=INFER), _stream_rpc)
            other = await _status(guarded.target, creds(pki, token=OTHER), _stream_rpc)
            held.put_nowait(None)
            rest = [r async for r in first]
            after = await _status(guarded.target, creds(pki, token=INFER), _stream_rpc)
            return second, other, rest[-1].end_of_stream, after
    second, other, ended, after = asyncio.run(main())
    assert second == ("RESOURCE_EXHAUSTED", "token 'app' has 1 streams open; its quota is 1")
    assert other[0] == "OK" and ended and after[0] == "OK"  # another tenant unaffected; the slot comes back


def test_live_session_quota(guarded, pki):
    async def main():
        async with channel(guarded.target, credentials=creds(pki, token=INFER)) as ch:
            done = asyncio.Event()

            async def requests():
                yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=S16))
                await done.wait()
            session = pb_grpc.LipSyncStub(ch).Converse(requests())
            opened = await session.read()

            async def second_session(s, m):
                async def one():
                    yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=S16))
                    await asyncio.sleep(30)
                async for _ in s.Converse(one()):
                    break
            second = await _status(guarded.target, creds(pki, token=INFER), second_session)
            done.set()
            session.cancel()
            return opened.session.session_id, second
    session_id, second = asyncio.run(main())
    assert session_id and second == ("RESOURCE_EXHAUSTED", "token 'app' has 1 sessions open; its quota is 1")


def test_idle_streams_are_closed_after_the_config_timeout(guarded, pki):
    async def idle(s, m):
        async def nothing():
            await asyncio.sleep(30)
            yield pb.StreamRequest()
        return [r async for r in s.Stream(nothing())]

    async def main():
        t0 = time.monotonic()
        results = await asyncio.gather(*[_status(guarded.target, creds(pki), idle) for _ in range(3)])
        return results, time.monotonic() - t0
    results, waited = asyncio.run(main())  # all of server.max_streams=3 held by silent clients …
    assert all(r == ("DEADLINE_EXCEEDED", "no config message within 1.5 s of opening the Stream "
                                          "(server.config_timeout_s)") for r in results), results
    assert waited < 15
    assert status(guarded.target, creds(pki), _stream_rpc)[0] == "OK"  # … and the slots were freed


def test_errors_name_roles_not_server_paths(guarded, pki):
    missing = status(guarded.target, creds(pki), lambda s, m: s.Synthesize(
        pb.SynthesizeRequest(model_id="missing", audio=PCM, format=S16)))
    assert missing == ("FAILED_PRECONDITION", "model 'missing' cannot be loaded: its checkpoint is missing "
                                              "(the server log has the details)")
    unknown = status(guarded.target, creds(pki), lambda s, m: s.Synthesize(
        pb.SynthesizeRequest(model_id="nobody", audio=PCM, format=S16)))
    assert unknown[0] == "NOT_FOUND" and "tiny" not in unknown[1] and "spare" not in unknown[1]

    async def compat_load(s, m):
        reply = await m.LoadModel(mono.LoadModelRequest(model_id="missing"))
        assert not reply.success and "checkpoint is missing" in reply.error and "/" not in reply.error
    assert status(guarded.target, creds(pki), compat_load)[0] == "OK"
    assert "nope.pth" in guarded.logs()  # the operator sees the full path


def test_audit_log_names_tokens_never_their_secret(guarded, pki):
    status(guarded.target, creds(pki), lambda s, m: s.UnloadModel(pb.UnloadModelRequest(model_id="spare")))
    status(guarded.target, creds(pki, token=INFER), lambda s, m: s.LoadModel(pb.LoadModelRequest(model_id="spare")))
    logs = guarded.logs()
    audit = [json.loads(line.split("lipsync.audit: ", 1)[1]) for line in logs.splitlines() if "lipsync.audit: " in line]
    assert any(a["event"] == "UnloadModel" and a["token"] == "ops" and a["model"] == "spare" and
               a["peer"].startswith("ipv") for a in audit)
    assert any(a["event"] == "auth_failed" and a["token"] == "app" and a["reason"] == "missing role admin"
               for a in audit)
    for secret in (ADMIN, INFER, OTHER):
        assert secret not in logs


def test_metrics_need_the_scrape_token(guarded, pki):
    assert status(guarded.target, creds(pki, token=None), health)[0] == "UNAUTHENTICATED"
    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics \(bearer token required\)", guarded.logs())[1]
    url = f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    scrape = urllib.request.Request(url, headers={"Authorization": "Bearer scrape-token-0123456789"})
    text = urllib.request.urlopen(scrape, timeout=10).read().decode()
    assert 'lipsync_auth_failures_total{code="UNAUTHENTICATED"}' in text
    for token, code in ((ADMIN, 200), (INFER, 401)):  # a tokens_file token with the metrics role (admin has it)
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            got = urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as exc:
            got = exc.code
        assert got == code, token


def test_metrics_on_a_token_server_need_a_token_without_a_scrape_file(tmp_path):
    """server.metrics_auth=auto: once gRPC checks tokens, /metrics does too (a metrics-role token)."""
    (tmp_path / "tokens").write_text(f"{INFER} infer\n{OTHER} metrics name=prometheus\n")
    srv = ServerProcess([f"server.auth.tokens_file={tmp_path / 'tokens'}"], tmp_path)
    try:
        port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics \(bearer token required\)", srv.logs())[1]
        url = f"http://127.0.0.1:{port}/metrics"
        for headers, code in (({}, 401), ({"Authorization": f"Bearer {INFER}"}, 401),
                              ({"Authorization": f"Bearer {OTHER}"}, 200)):
            try:
                got = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == code, headers
        # the metrics role alone cannot call the service
        listed = status(srv.target, Credentials(token=OTHER), lambda s, m: s.ListModels(pb.ListModelsRequest()))
        assert listed[0] == "PERMISSION_DENIED"
    finally:
        srv.stop()


def test_a_token_is_not_sent_in_plaintext_beyond_loopback(tmp_path):
    async def channels():
        with pytest.raises(ValueError, match="refusing to send the token in plaintext to 192.0.2.7:50051"):
            channel("192.0.2.7:50051", credentials=Credentials(token=INFER))
        for target, told in (("192.0.2.7:50051", True), ("localhost:50051", False), ("[::1]:1", False)):
            await channel(target, credentials=Credentials(token=INFER, insecure_token=told)).close()
    asyncio.run(channels())
    done = subprocess.run([sys.executable, "-m", "lipsync", "client", "--server", "192.0.2.7:50051", "--token",
                           INFER, "--audio", str(ROOT / "assets" / "speech.wav")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "refusing to send the token in plaintext" in done.stdout + done.stderr


def test_cli_client_over_mutual_tls_with_a_token_from_the_environment(guarded, pki, speech_1s_wav):
    env = {**os.environ, "LIPSYNC_TOKEN": INFER}
    done = subprocess.run([sys.executable, "-m", "lipsync", "client", "--server", guarded.target, "--model", "tiny",
                           "--audio", str(speech_1s_wav), "--tls-ca", str(pki["a"] / "ca.pem"),
                           "--tls-cert", str(pki["a"] / "client.pem"), "--tls-key", str(pki["a"] / "client.key")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout[done.stdout.index("{"):])["frames"] > 0
    refused = subprocess.run([sys.executable, "-m", "lipsync", "client", "--server", guarded.target, "--model", "tiny",
                              "--audio", str(speech_1s_wav), "--tls-ca", str(pki["a"] / "ca.pem"),
                              "--tls-cert", str(pki["a"] / "client.pem"), "--tls-key", str(pki["a"] / "client.key")],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "LIPSYNC_TOKEN": ""},
                             cwd=ROOT)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stdout


# --------------------------------------------------------------------------- SIGHUP
def test_sighup_swaps_certificates_and_tokens_while_a_stream_flows(pki, weights, tiny_avatar, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(pki["a"], live)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ADMIN} admin\n{INFER} infer\n")
    srv = ServerProcess([*tls_overrides(live), f"server.auth.tokens_file={tokens}",
                         model_override("tiny", weights, tiny_avatar, variant="160")], tmp_path)
    try:
        async def main():
            async with channel(srv.target, credentials=creds(pki, token=INFER)) as ch:
                swapped = asyncio.Event()

                async def requests():
                    yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=S16))
                    for k in range(6):
                        if k == 3:
                            for name in ("server.pem", "server.key", "ca.pem"):
                                shutil.copy(pki["b"] / name, live / name)
                            tokens.write_text(f"{OTHER} admin\n{INFER} infer\n")  # the stream's token stays
                            srv.proc.send_signal(signal.SIGHUP)
                            await asyncio.sleep(1.0)
                            swapped.set()
                        yield pb.StreamRequest(audio=PCM)
                    yield pb.StreamRequest(end_of_audio=True)
                frames, ended, checks = 0, False, None
                # open_stream sends the audio once the server has accepted the stream: the swap comes after
                async for response in open_stream(pb_grpc.LipSyncStub(ch).Stream, requests()):
                    frames += len(response.frames)
                    ended = ended or response.end_of_stream
                    if swapped.is_set() and not ended:
                        checks = (await _status(srv.target, creds(pki, token=ADMIN), health),
                                  await _status(srv.target, creds(pki, "b", "b", token=ADMIN), health),
                                  await _status(srv.target, creds(pki, "b", "b", token=OTHER), health))
                        swapped.clear()
                return frames, ended, checks
        frames, ended, checks = asyncio.run(main())
        # the stream opened before the swap ran to its end, every frame of its 1.2 s of audio
        assert ended and frames == audio_features.frame_count(6 * len(PCM) // 2) and checks is not None
        old_certs, old_token, new_both = checks
        assert old_certs[0] == "UNAVAILABLE"  # new connections get the new certificate and client CA
        assert old_token[0] == "UNAUTHENTICATED" and new_both[0] == "OK"
        assert "reloaded TLS files" in srv.logs() and "reloaded tokens" in srv.logs()
    finally:
        srv.stop()


def test_a_revoked_token_ends_its_live_session_and_stream(weights, tiny_avatar, tmp_path):
    """SIGHUP with a tokens file that no longer has a token: the live session and the stream admitted with it end
    with UNAUTHENTICATED; a session of a token that stays goes on."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{INFER} infer\n{OTHER} infer name=other\n{ADMIN} admin\n")
    srv = ServerProcess([f"server.auth.tokens_file={tokens}", "server.live.time_scale=10",
                         "server.live.duty_cycle=0.01",  # two idle sessions are admitted on a loaded CPU too
                         model_override("tiny", weights, tiny_avatar, variant="160")], tmp_path)
    try:
        async def session(token: str, revoke: asyncio.Event, frames: list):
            async def requests():
                yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=S16))
                await asyncio.sleep(3600)
            async with channel(srv.target, credentials=Credentials(token=token)) as ch:
                try:
                    async for response in open_stream(pb_grpc.LipSyncStub(ch).Converse, requests()):
                        frames.append(time.monotonic())
                        if len(frames) == 3:
                            revoke.set()
                        if len(frames) > 200:
                            return "still open"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, exc.details()

        async def stream(token: str):
            async def requests():
                yield pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=S16))
                await asyncio.sleep(3600)
            async with channel(srv.target, credentials=Credentials(token=token)) as ch:
                try:
                    async for _ in open_stream(pb_grpc.LipSyncStub(ch).Stream, requests()):
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, exc.details()

        async def main():
            revoke, kept_frames, gone_frames = asyncio.Event(), [], []
            gone = asyncio.ensure_future(session(INFER, revoke, gone_frames))
            kept = asyncio.ensure_future(session(OTHER, asyncio.Event(), kept_frames))
            streaming = asyncio.ensure_future(stream(INFER))
            await asyncio.wait_for(asyncio.wait([asyncio.ensure_future(revoke.wait()), gone],
                                                return_when=asyncio.FIRST_COMPLETED), 120)
            assert not gone.done(), gone.result()  # the session opened and received its first frames
            await asyncio.sleep(0.5)
            tokens.write_text(f"{OTHER} infer name=other\n{ADMIN} admin\n")
            srv.proc.send_signal(signal.SIGHUP)
            revoked_at = time.monotonic()
            outcome = await asyncio.wait_for(gone, 30)
            ended_after = time.monotonic() - revoked_at
            stream_outcome = await asyncio.wait_for(streaming, 30)
            before = len(kept_frames)
            await asyncio.sleep(3.0)
            assert not kept.done(), kept.result()
            kept.cancel()
            return outcome, ended_after, stream_outcome, len(kept_frames) - before
        outcome, ended_after, stream_outcome, kept_more = asyncio.run(main())
        assert outcome == ("UNAUTHENTICATED", "token 'token1' was revoked") and ended_after < 5, outcome
        assert stream_outcome == ("UNAUTHENTICATED", "token 'token1' was revoked"), stream_outcome
        assert kept_more >= 5  # the other token's session still receives its frames (one per 400 ms)
    finally:
        srv.stop()


def test_a_silent_stream_is_closed_after_the_idle_timeout(weights, tiny_avatar, tmp_path):
    srv = ServerProcess(["server.stream_idle_timeout_s=2", "server.live.idle_timeout_s=2",
                         model_override("tiny", weights, tiny_avatar, variant="160")], tmp_path)
    try:
        async def silent(rpc: str):
            async def requests():
                config = pb.StreamRequest(config=pb.StreamConfig(model_id="tiny", format=S16)) if rpc == "Stream" \
                    else pb.ConverseRequest(config=pb.ConverseConfig(model_id="tiny", format=S16))
                yield config
                if rpc == "Stream":
                    yield pb.StreamRequest(audio=PCM)
                await asyncio.sleep(3600)
            started = time.monotonic()
            async with channel(srv.target) as ch:
                try:
                    async for _ in open_stream(getattr(pb_grpc.LipSyncStub(ch), rpc), requests()):
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, exc.details(), time.monotonic() - started

        async def main():
            return await asyncio.gather(silent("Stream"), silent("Converse"))
        for (code, details, seconds), setting in zip(asyncio.run(main()), ("server.stream_idle_timeout_s",
                                                                           "server.live.idle_timeout_s")):
            assert code == "DEADLINE_EXCEEDED" and setting in details and 2 <= seconds < 10, (code, details)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- configuration
def test_tokens_file_rules(tmp_path):
    file = tmp_path / "tokens"
    file.write_text(f"  # comment\n{ADMIN} admin\n{INFER} infer name=app streams=2 sessions=0\n")
    table = TokenTable(file, default_streams=5, default_sessions=7)
    assert table.lookup(ADMIN) == Principal("token2", frozenset({"infer", "metrics", "admin"}), 5, 7)
    assert table.lookup(INFER) == Principal("app", frozenset({"infer"}), 2, 0)
    assert table.lookup("nope" * 8) is None and table.lookup("") is None
    for text, error in [("short infer", "at least 16 characters"), (f"{ADMIN} root", "unknown role(s) ['root']"),
                        (f"{ADMIN}", "expected `TOKEN ROLE"), (f"{ADMIN} infer color=red", "unknown option 'color'"),
                        (f"{ADMIN} infer streams=many", "whole numbers"), ("# nothing", "has no tokens"),
                        (f"{ADMIN} infer name=x\n{INFER} infer name=x", "name 'x' is used twice")]:
        file.write_text(text)
        with pytest.raises(SecurityConfigError, match=re.escape(error)) as caught:
            TokenTable(file, 0, 0)
        assert str(file) in str(caught.value)


def _serve(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lipsync", "serve", "server.host=127.0.0.1", "server.port=0",
                           "server.metrics_port=-1", "models=none", *overrides], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_broken_security_files_stop_the_start_in_one_line(tmp_path, pki):
    done = _serve(f"server.tls.cert={tmp_path / 'none.pem'}", f"server.tls.key={pki['a'] / 'server.key'}")
    assert done.returncode == 2 and done.stderr.strip() == \
        f"lipsync serve: server.tls.cert (certificate) not found: {tmp_path / 'none.pem'}"
    mismatched = _serve(f"server.tls.cert={pki['a'] / 'server.pem'}", f"server.tls.key={pki['b'] / 'server.key'}")
    assert mismatched.returncode == 2 and "cannot be used" in mismatched.stderr and "Traceback" not in mismatched.stderr
    tokens = tmp_path / "tokens"
    tokens.write_text("abc infer\n")
    bad = _serve(f"server.auth.tokens_file={tokens}")
    assert bad.returncode == 2 and f"{tokens}:1: tokens must be at least 16 characters" in bad.stderr


def test_check_warns_about_an_open_port():
    done = subprocess.run([sys.executable, "-m", "lipsync", "serve", "--check", "models=none", "server.host=0.0.0.0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0
    assert json.loads(done.stdout)["security"] == (
        "warning: listening on 0.0.0.0 without TLS (server.tls.cert/key) or tokens (server.auth.tokens_file): "
        "anyone who can reach this port can call every RPC, including LoadModel and UnloadModel")


def test_the_readme_security_setup(tmp_path, weights, tiny_avatar, speech_1s_wav):
    """The Security page's first block (docs/security.md), command by command: certificates and tokens as written;
    the server and client lines with a free port, the tiny model and a short WAV."""
    text = (ROOT / "docs" / "security.md").read_text()
    block = text[text.index("# Security"):]
    block = block[block.index("```bash\n") + 8:]
    lines = block[:block.index("```")].replace("\\\n", "").splitlines()
    setup, serve, client = lines[0:2], lines[2], lines[4]
    assert serve.startswith(".venv/bin/lipsync serve ") and ".venv/bin/lipsync client " in client
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for line in setup:
        done = subprocess.run(["bash", "-c", line.replace("deploy/", f"{ROOT}/deploy/", 1)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    args = serve.split()[2:] + ["models=none", model_override("tiny", weights, tiny_avatar, variant="160")]
    srv = ServerProcess(args, tmp_path, cwd=tmp_path)
    try:
        line = client.replace("localhost:50051", f"localhost:{srv.port}").replace("assets/speech.wav",
                                                                                   str(speech_1s_wav))
        line = line.replace(".venv/bin/lipsync", str(Path(sys.executable).parent / "lipsync"))  # cwd is tmp_path
        done = subprocess.run(["bash", "-c", line + " --model tiny"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout[done.stdout.index("{"):])["frames"] == audio_features.frame_count(16000)
        assert "over mutual TLS, tokens required" in srv.logs()
    finally:
        srv.stop()


def test_reflection_can_require_a_token():
    from lipsync.api.security import AccessInterceptor, Security, TlsFiles

    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    closed = AccessInterceptor(Security(TlsFiles({}), None, reflection_open=False))
    opened = AccessInterceptor(Security(TlsFiles({}), None, reflection_open=True))
    assert closed._needs(method) == "infer" and opened._needs(method) is None
    assert closed._needs("/grpc.health.v1.Health/Check") is None
    assert closed._needs("/monolithic.MonolithicService/UnloadModel") == "admin"
    assert closed._needs("/lipsync.v1.LipSync/Converse") == "infer"


def test_a_client_without_a_certificate_is_told_the_server_wants_one(guarded, pki, speech_1s_wav):
    """TLS against mutual TLS with no client certificate: the handshake is dropped ("Socket closed"); the client's
    one line says what is likely missing."""
    done = subprocess.run([sys.executable, "-m", "lipsync", "client", "--server", guarded.target, "--model", "tiny",
                           "--audio", str(speech_1s_wav), "--tls-ca", str(pki["a"] / "ca.pem"), "--timeout", "20",
                           "--token", ADMIN], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stdout and "--tls-cert" in done.stdout, done.stdout


def test_a_token_scoped_to_models_sees_only_those(weights, tiny_avatar, tmp_path):
    """`models=tiny` on a token's line: for it every other model is NOT_FOUND with the very message of an undeclared
    one (ListModels, stats, Synthesize, GetAvatar, the Go API alike); an infer token's GetAvatar of a model not in
    memory does not load (or evict) it: FAILED_PRECONDITION until something that renders loads it; an admin's
    does."""
    scoped = "scoped-" + "d" * 25
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ADMIN} admin name=ops\n{scoped} infer name=tenant models=tiny\n")
    srv = ServerProcess([f"server.auth.tokens_file={tokens}",
                         model_override("tiny", weights, tiny_avatar, variant="160"),
                         model_override("spare", weights, tiny_avatar, variant="160")], tmp_path)
    pcm = (np.random.default_rng(0).standard_normal(8000) * 3000).astype(np.int16).tobytes()

    async def codes(token: str, model: str) -> dict:
        async with channel(srv.target, credentials=Credentials(token=token)) as ch:
            stub, compat = pb_grpc.LipSyncStub(ch), mono_grpc.MonolithicServiceStub(ch)
            out = {"list": [m.model_id for m in (await stub.ListModels(pb.ListModelsRequest())).models],
                   "go_list": [m.model_id for m in (await compat.ListModels(mono.ListModelsRequest())).models]}
            for name, call in (("avatar", lambda: _first(stub.GetAvatar(pb.GetAvatarRequest(model_id=model)))),
                               ("synthesize", lambda: stub.Synthesize(pb.SynthesizeRequest(
                                   model_id=model, audio=pcm, format=S16))),
                               ("avatar_after", lambda: _first(stub.GetAvatar(pb.GetAvatarRequest(model_id=model)))),
                               ("stats", lambda: stub.GetModelStats(pb.GetModelStatsRequest(model_id=model)))):
                try:
                    await call()
                    out[name] = ("OK", "")
                except grpc.aio.AioRpcError as exc:
                    out[name] = (exc.code().name, exc.details())
            go = await compat.InferBatchComposite(mono.CompositeBatchRequest(model_id=model, batch_size=1,
                                                                             raw_audio=np.zeros(640, "<f4").tobytes()))
            out["go"] = go.error
            return out
    try:
        tenant_tiny = asyncio.run(codes(scoped, "tiny"))
        tenant_spare = asyncio.run(codes(scoped, "spare"))
        tenant_ghost = asyncio.run(codes(scoped, "ghost"))
        admin_spare = asyncio.run(codes(ADMIN, "spare"))
    finally:
        srv.stop()
    assert tenant_tiny["list"] == tenant_tiny["go_list"] == ["tiny"]
    assert tenant_tiny["avatar"][0] == "FAILED_PRECONDITION" and "is not loaded" in tenant_tiny["avatar"][1]
    assert [tenant_tiny[k][0] for k in ("synthesize", "avatar_after", "stats")] == ["OK", "OK", "OK"]
    for key in ("avatar", "synthesize", "stats"):  # a model outside the scope reads as one that does not exist
        assert tenant_spare[key] == ("NOT_FOUND", tenant_ghost[key][1].replace("'ghost'", "'spare'")), key
    assert tenant_spare["go"] == tenant_ghost["go"].replace("'ghost'", "'spare'") and "unknown model" in \
        tenant_spare["go"]
    assert sorted(admin_spare["list"]) == ["spare", "tiny"] and admin_spare["avatar"] == ("OK", "")


async def _first(stream):
    async for item in stream:
        return item
