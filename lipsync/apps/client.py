"""`lipsync client`: drive a lipsync server with a WAV by Synthesize or Stream, alone or as N concurrent
sessions, or play a conversation script through a live session (Converse); save JPEG frames and/or an MP4,
print per-stage timings, fps and latency percentiles (or the conversation's latencies and late frames)."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc

from lipsync import timebase
from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.api import convert
from lipsync.api.headers import ACCEPTED_HEADER, MODEL_HEADER, WORKER_HEADER
from lipsync.apps.options import add_connection_options, command_parser
from lipsync.codec import audio
from lipsync.model import audio_features


@dataclass
class SessionResult:
    frames: list[pb.Frame] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)  # per frame (stream) or per request (unary)
    stage_ms: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    model_load_ms: float = 0.0
    workers: set[str] = field(default_factory=set)  # x-lipsync-worker of the server(s) that answered


def routing(model: str, metadata=None) -> tuple[tuple[str, str], ...]:
    """Call metadata with the routing key `x-model-id` (a proxy in front of several workers hashes on it, so a
    model's sessions meet on the worker that has it loaded), plus any `metadata` given."""
    return ((MODEL_HEADER, model), *tuple(metadata or ()))


async def worker_of(call) -> str:
    """The `x-lipsync-worker` response header of a call ("" if the server sent none)."""
    return next((str(v) for k, v in (await call.initial_metadata() or ()) if k == WORKER_HEADER), "")


@dataclass
class Credentials:
    """How a client proves itself: TLS (server CA, optional client certificate for mutual TLS) and/or a bearer
    token. Paths are PEM files; `tls` without `ca` trusts the system's roots."""
    token: str | None = None
    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # the name to check the server certificate against, when dialling an IP
    insecure_token: bool = False    # send the token over plaintext to a host that is not this machine

    @property
    def secure(self) -> bool:
        return self.tls or bool(self.ca or self.cert)

    def check_token_transport(self, target: str) -> None:
        """Refuse to send a bearer token in plaintext beyond this machine (anyone on the path could reuse it),
        unless told to (`insecure_token`, --allow-insecure-token)."""
        if self.token and not self.secure and not self.insecure_token and not is_local_target(target):
            raise ValueError(f"refusing to send the token in plaintext to {target}: use TLS (--tls or --tls-ca), or "
                             "pass --allow-insecure-token if the network is trusted")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key (and the key its certificate)")
        return grpc.ssl_channel_credentials(_read_pem(self.ca, "CA"), _read_pem(self.key, "client key"),
                                            _read_pem(self.cert, "client certificate"))


def is_local_target(target: str) -> bool:
    """Whether a gRPC target names this machine: loopback addresses, localhost or a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.split("///", 1)[-1] if target.startswith(("dns:", "ipv4:", "ipv6:")) else target
    host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 \
        else host
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def explain(exc: grpc.aio.AioRpcError, credentials: Credentials) -> str:
    """A failed call in one line, with the likely cause where the status alone misleads."""
    text = f"{exc.code().name}: {exc.details()}"
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not credentials.secure and \
            any(sign in (exc.details() or "") for sign in ("Socket closed", "Connection reset", "handshake")):
        text += " (the server may speak TLS: pass --tls or --tls-ca CA.pem)"
    return text


def _read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"{what} not found: {file}")
    return file.read_bytes()


class _Bearer:
    """Adds `authorization: Bearer TOKEN` to every call's metadata."""

    def __init__(self, token: str):
        self.pair = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), self.pair))


class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):
        return await continuation(self._details(details), requests)


def _token_interceptors(token: str) -> list[_Bearer]:
    """One per call shape: grpc.aio sorts interceptors by type."""
    return [kind(token) for kind in (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)]


def open_stream(method: Callable, requests: AsyncIterator, **kwargs):
    """Start a request-streaming call (Stream, Converse): the first message (the config) goes out at once, the
    rest only after the server has accepted the call, and none once the call has ended.

    grpc.aio reports a write that follows the server's final status as INTERNAL ("Internal error from Core")
    instead of that status (grpc/grpc#36066). The server answers an accepted stream with the header
    `lipsync-accepted` (config valid, model ready); a refusal before it (token, role, quota, config, model) is the
    status alone, so nothing is written after it and the client sees the real status."""
    call = None

    async def guarded() -> AsyncIterator:
        accepted = False
        async for message in requests:
            if call.done():
                return
            yield message
            if not accepted:
                metadata = await call.initial_metadata()
                if not any(key == ACCEPTED_HEADER for key, _ in (metadata or ())):
                    return  # refused: the status says why
                accepted = True
    call = method(guarded(), **kwargs)
    return call


def worker_lost(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed because the server (or, behind a proxy, the worker) serving it went away: start a new
    session. Directly that is UNAVAILABLE; Envoy resets a stream whose worker dies after it answered, which gRPC
    reports as INTERNAL "… RST_STREAM …"."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE or (
        exc.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (exc.details() or ""))


def channel(target: str, max_message_mb: int = 100, credentials: Credentials | None = None) -> grpc.aio.Channel:
    """A channel to a lipsync server: plaintext, or TLS/mutual TLS and a bearer token per `credentials`."""
    size = max_message_mb * 2**20
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    credentials = credentials or Credentials()
    credentials.check_token_transport(target)
    interceptors = _token_interceptors(credentials.token) if credentials.token else None
    if not credentials.secure:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if credentials.server_name:
        options.append(("grpc.ssl_target_name_override", credentials.server_name))
    return grpc.aio.secure_channel(target, credentials.channel_credentials(), options=options,
                                   interceptors=interceptors)


def credentials_from_args(args: argparse.Namespace) -> Credentials:
    """--tls/--tls-ca/--tls-cert/--tls-key/--tls-server-name and --token (else $LIPSYNC_TOKEN)."""
    return Credentials(token=args.token or os.environ.get("LIPSYNC_TOKEN") or None, tls=args.tls, ca=args.tls_ca,
                       cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name,
                       insecure_token=args.allow_insecure_token)


def _add(stage_ms: dict[str, float], timings: pb.StageTimings) -> None:
    for name in ("audio", "queue", "inference", "composite", "encode", "total"):
        stage_ms[name] = stage_ms.get(name, 0.0) + getattr(timings, f"{name}_ms")


async def synthesize(stub: pb_grpc.LipSyncStub, model: str, pcm: bytes, fmt: audio.AudioFormat,
                     batch_frames: int = 0, start_frame: int = 0, quality: int = 0,
                     timeout: float | None = None) -> SessionResult:
    """Whole audio in one Synthesize, or chunks of `batch_frames` frames, each its own request."""
    result, t0 = SessionResult(), time.perf_counter()
    step = batch_frames * timebase.SAMPLES_PER_FRAME * fmt.sample_rate // timebase.SAMPLE_RATE * fmt.frame_bytes \
        if batch_frames else len(pcm)
    audio_format = convert.format_message(fmt)
    offset = 0
    for lo in range(0, len(pcm), step):
        sent = time.perf_counter()
        call = stub.Synthesize(pb.SynthesizeRequest(
            model_id=model, audio=pcm[lo:lo + step], format=audio_format, start_frame=start_frame + offset,
            jpeg_quality=quality), timeout=timeout, metadata=routing(model))
        response = await call
        result.workers.add(await worker_of(call))
        result.latencies_ms.append((time.perf_counter() - sent) * 1e3)
        for f in response.frames:
            result.frames.append(pb.Frame(index=offset + f.index, avatar_frame=f.avatar_frame, jpeg=f.jpeg,
                                          pts_ms=(offset + f.index) * timebase.FRAME_MS))
        offset += len(response.frames)
        _add(result.stage_ms, response.timings)
        result.model_load_ms += response.model_load_ms
    result.wall_s = time.perf_counter() - t0
    return result


async def stream(stub: pb_grpc.LipSyncStub, model: str, pcm: bytes, fmt: audio.AudioFormat, chunk_ms: float = 40,
                 realtime: bool = False, start_frame: int = 0, quality: int = 0, timeout: float | None = None,
                 send_end: bool = True, progress: Callable[[int], None] | None = None) -> SessionResult:
    """Stream the audio in `chunk_ms` chunks (paced in real time if asked); frame latency is measured from
    the moment the audio a frame needs (its 450 ms look-ahead) was sent."""
    result, t0 = SessionResult(), time.perf_counter()
    chunk = max(fmt.frame_bytes, int(fmt.sample_rate * chunk_ms / 1000) * fmt.frame_bytes)
    sent_at: list[tuple[int, float]] = []  # (16 kHz samples sent so far, time)
    total_samples = len(pcm) // fmt.frame_bytes * timebase.SAMPLE_RATE // fmt.sample_rate

    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(
            model_id=model, start_frame=start_frame, jpeg_quality=quality,
            format=convert.format_message(fmt)))
        started = time.perf_counter()
        for lo in range(0, len(pcm), chunk):
            if realtime:
                due = started + lo / fmt.frame_bytes / fmt.sample_rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            yield pb.StreamRequest(audio=pcm[lo:lo + chunk])
            sent_at.append((min(lo + chunk, len(pcm)) // fmt.frame_bytes * timebase.SAMPLE_RATE // fmt.sample_rate,
                            time.perf_counter()))
        if send_end:
            yield pb.StreamRequest(end_of_audio=True)
            sent_at.append((1 << 62, time.perf_counter()))

    def needed_at(index: int) -> float:
        need = min(index * timebase.SAMPLES_PER_FRAME + 7240, total_samples)
        for samples, when in sent_at:
            if samples >= need:
                return when
        return sent_at[-1][1]

    call = open_stream(stub.Stream, requests(), timeout=timeout, metadata=routing(model))
    async for response in call:
        now = time.perf_counter()
        for f in response.frames:
            result.frames.append(f)
            result.latencies_ms.append((now - needed_at(f.index)) * 1e3)
        if progress and response.frames:
            progress(len(response.frames))
        if response.frames:
            _add(result.stage_ms, response.timings)
        result.model_load_ms += response.model_load_ms
        if response.end_of_stream:
            break
    result.workers.add(await worker_of(call))
    result.wall_s = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- live sessions
@dataclass
class Say:
    """One utterance of a conversation: its audio, when it is sent (seconds from the session's start), and
    optionally when the client barges in on it."""
    pcm: bytes
    fmt: audio.AudioFormat
    at: float = 0.0
    interrupt_at: float | None = None
    id: str = ""
    barge_in: bool = False  # start with interrupt=true (drops whatever is still playing)


@dataclass
class ConverseResult:
    session: pb.SessionInfo
    frames: list[pb.LiveFrame] = field(default_factory=list)
    received_s: list[float] = field(default_factory=list)  # arrival of each frame, seconds after the session info
    events: list[tuple[int, pb.ConverseEvent]] = field(default_factory=list)  # (frame index, event)
    closed_s: float = 0.0  # when this client half-closed (ending the session), seconds after the session info

    def summary(self) -> dict:
        """Per-utterance latency/interruption, late frames and pacing, as a JSON-able dict."""
        kinds = {name: sum(f.kind == value for f in self.frames)
                 for name, value in (("idle", pb.IDLE), ("speech", pb.SPEECH), ("held", pb.HELD))}
        interval = self.session.frame_interval_ms / 1e3
        offsets = [(t - self.received_s[0]) - (f.index - self.frames[0].index) * interval
                   for f, t in zip(self.frames, self.received_s)] if self.frames else []
        utterances: dict[str, dict] = {}
        for index, event in self.events:
            kind = event.WhichOneof("event")
            body = getattr(event, kind)
            if kind == "started":
                utterances.setdefault(body.utterance_id, {}).update(
                    first_frame=body.first_frame, first_frame_latency_ms=round(body.latency_ms, 1))
            elif kind == "finished":
                utterances.setdefault(body.utterance_id, {}).update(
                    last_frame=body.last_frame, interrupted=body.interrupted, frames_played=body.frames_played,
                    frames_total=body.frames_total, played_ms=body.played_ms, late_frames=body.late_frames,
                    **({"error": body.error} if body.error else {}))
        return {"frames": len(self.frames), **kinds, "late_frames": kinds["held"],
                "frame_interval_ms": round(self.session.frame_interval_ms, 3),
                "pacing_ms": {"max_late": round(max(offsets, default=0) * 1e3, 1),
                              "max_early": round(-min(offsets, default=0) * 1e3, 1)},
                "utterances": utterances}


async def converse(stub: pb_grpc.LipSyncStub, model: str, utterances: list[Say], duration_s: float,
                   start_frame: int = 0, quality: int = 0, output_rate: int = 0, realtime: bool = False,
                   chunk_ms: float = 40.0, timeout: float | None = None, metadata=None,
                   progress: Callable[[int], None] | None = None) -> ConverseResult:
    """Run one live session for `duration_s` media seconds, sending each utterance at its time (all at once, as
    a TTS faster than real time would, or paced in real time), and collect every frame and event."""
    if not utterances:
        fmt = audio.AudioFormat("s16le", timebase.SAMPLE_RATE, 1)
    else:
        fmt = utterances[0].fmt
        if any(u.fmt != fmt for u in utterances):
            raise ValueError("every utterance of a session must have the same audio format")
    ready = asyncio.Event()
    scale = [1.0]

    def plan() -> list[tuple[float, pb.ConverseRequest]]:
        """Every message with its send time (media seconds), in order; an utterance stops at its barge-in."""
        timed = []
        chunk = max(fmt.frame_bytes, int(fmt.sample_rate * chunk_ms / 1000) * fmt.frame_bytes)
        for k, u in enumerate(utterances):
            stop = u.interrupt_at if u.interrupt_at is not None else float("inf")
            timed.append((u.at, 3 * k, pb.ConverseRequest(start_utterance=pb.UtteranceStart(
                utterance_id=u.id, interrupt=u.barge_in))))
            t = u.at
            for lo in range(0, len(u.pcm), chunk):
                t = u.at + lo / fmt.frame_bytes / fmt.sample_rate if realtime else u.at
                if t >= stop:
                    break
                timed.append((t, 3 * k + 1, pb.ConverseRequest(audio=u.pcm[lo:lo + chunk])))
            else:
                timed.append((t, 3 * k + 1, pb.ConverseRequest(end_utterance=True)))
            if u.interrupt_at is not None:
                timed.append((u.interrupt_at, 3 * k + 2, pb.ConverseRequest(interrupt=True)))
        return [(t, m) for t, _, m in sorted(timed, key=lambda x: (x[0], x[1]))]

    async def requests():
        yield pb.ConverseRequest(config=pb.ConverseConfig(
            model_id=model, start_frame=start_frame, jpeg_quality=quality, output_sample_rate=output_rate,
            format=convert.format_message(fmt)))
        await ready.wait()
        origin = time.perf_counter()
        for t, message in plan() + [(duration_s, None)]:
            await asyncio.sleep(max(0.0, origin + t * scale[0] - time.perf_counter()))
            if message is None:
                if result is not None:
                    result.closed_s = time.perf_counter() - origin
                return  # half-close: the session ends
            yield message

    result: ConverseResult | None = None
    origin = 0.0
    async for response in open_stream(stub.Converse, requests(), timeout=timeout, metadata=routing(model, metadata)):
        now = time.perf_counter()
        if response.HasField("session"):
            result, origin = ConverseResult(response.session), now
            scale[0] = response.session.frame_interval_ms / 1e3 * timebase.FPS
            ready.set()
            continue
        assert result is not None, "the first Converse response carries the session info"
        result.frames.append(response.frame)
        result.received_s.append(now - origin)
        if progress:
            progress(1)
        result.events.extend((response.frame.index, e) for e in response.events)
    if result is None:
        raise RuntimeError("the live session ended before it started")
    return result


def load_script(path: str | Path) -> tuple[list[Say], float]:
    """A conversation script (YAML): `duration` (seconds) and `utterances`, each `{audio: WAV path relative to
    the script, at: seconds, interrupt_at: optional seconds, id: optional, barge_in: optional}`."""
    from omegaconf import OmegaConf

    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"conversation script not found: {file}")
    script = OmegaConf.to_container(OmegaConf.load(file))
    if not isinstance(script, dict) or "duration" not in script:
        raise ValueError(f"{file}: a conversation script needs `duration` and `utterances`")
    says = []
    for k, item in enumerate(script.get("utterances") or []):
        unknown = set(item) - {"audio", "at", "interrupt_at", "id", "barge_in"}
        if unknown or "audio" not in item:
            raise ValueError(f"{file}: utterance {k} needs `audio` and may have at, interrupt_at, id, barge_in "
                             f"(unknown: {sorted(unknown)})")
        pcm, fmt = audio.read_audio(file.parent / str(item["audio"]))
        interrupt_at = item.get("interrupt_at")
        says.append(Say(pcm, fmt, float(item.get("at", 0.0)), None if interrupt_at is None else float(interrupt_at),
                        str(item.get("id", f"u{k}")), bool(item.get("barge_in", False))))
    return says, float(script["duration"])


def save_conversation(result: ConverseResult, out: str) -> Path:
    """The continuous video with the audio the frames carried, as MP4."""
    import numpy as np
    import torch
    from torchvision.io import decode_jpeg

    from lipsync.codec.video import Mp4Writer

    def image(data: bytes):
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    first = image(result.frames[0].jpeg)
    writer = Mp4Writer(out, first.shape[2], first.shape[1], sample_rate=result.session.output_sample_rate)
    for f in result.frames:
        writer.write(image(f.jpeg)[None])
    pcm = b"".join(f.audio for f in result.frames)
    wave = torch.from_numpy(np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0)
    return writer.close(wave)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


def summarize(results: list[SessionResult], wall_s: float) -> dict:
    frames = sum(len(r.frames) for r in results)
    latencies = [x for r in results for x in r.latencies_ms]
    stages = {}
    for r in results:
        for k, v in r.stage_ms.items():
            stages[k] = stages.get(k, 0.0) + v
    return {"sessions": len(results), "frames": frames, "wall_s": round(wall_s, 3),
            "fps": round(frames / wall_s, 2) if wall_s else 0.0,
            "latency_ms": {"p50": round(percentile(latencies, 50), 1), "p95": round(percentile(latencies, 95), 1),
                           "p99": round(percentile(latencies, 99), 1),
                           "mean": round(statistics.fmean(latencies), 1) if latencies else 0.0},
            "stage_ms_per_frame": {k: round(v / max(frames, 1), 2) for k, v in stages.items()},
            "workers": sorted(set().union(*(r.workers for r in results)) - {""})}


def save_outputs(result: SessionResult, wave_16k, frames_out: str | None, out: str | None) -> None:
    import torch
    from torchvision.io import decode_jpeg

    if frames_out:
        folder = Path(frames_out).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        for f in result.frames:
            (folder / f"{f.index:06d}.jpg").write_bytes(f.jpeg)
        print(f"frames: {folder}")
    if out and result.frames:
        from lipsync.codec.video import Mp4Writer
        first = decode_jpeg(torch.frombuffer(bytearray(result.frames[0].jpeg), dtype=torch.uint8))
        writer = Mp4Writer(out, first.shape[2], first.shape[1])
        for f in result.frames:
            writer.write(decode_jpeg(torch.frombuffer(bytearray(f.jpeg), dtype=torch.uint8))[None])
        print(f"video: {writer.close(wave_16k)}")


async def run_converse(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    says, duration = load_script(args.converse)
    with tqdm(total=round(duration * timebase.FPS), desc="live session", unit="frame") as bar:
        async with channel(args.server, credentials=credentials_from_args(args)) as ch:
            result = await converse(pb_grpc.LipSyncStub(ch), args.model, says, duration, args.start_frame,
                                    args.quality, args.output_rate, args.realtime, args.chunk_ms, args.timeout,
                                    progress=bar.update)
    summary = {"mode": "converse", **result.summary()}
    if args.out and result.frames:
        print(f"video: {save_conversation(result, args.out)}")
    if args.frames_out:
        folder = Path(args.frames_out).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        for f in result.frames:
            (folder / f"{f.index:06d}.jpg").write_bytes(f.jpeg)
        print(f"frames: {folder}")
    return summary


async def run(args: argparse.Namespace) -> dict:
    if args.converse:
        return await run_converse(args)
    if not args.audio:
        raise ValueError("client: give --audio WAV (or --converse SCRIPT.yaml)")
    from tqdm import tqdm

    data, fmt = audio.read_audio(args.audio, args.max_audio_seconds)
    async with channel(args.server, credentials=credentials_from_args(args)) as ch:
        stub = pb_grpc.LipSyncStub(ch)

        samples = len(data) // fmt.frame_bytes * timebase.SAMPLE_RATE // fmt.sample_rate
        bar = tqdm(total=audio_features.frame_count(samples)
                   * args.clients, desc="frames", unit="frame", disable=not args.stream)

        async def one(k: int) -> SessionResult:
            if args.stream:
                return await stream(stub, args.model, data, fmt, args.chunk_ms, args.realtime, args.start_frame,
                                    args.quality, args.timeout, progress=bar.update)
            return await synthesize(stub, args.model, data, fmt, args.batch, args.start_frame, args.quality,
                                    args.timeout)

        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(k) for k in range(args.clients)])
        wall = time.perf_counter() - t0
        bar.close()
    summary = summarize(list(results), wall)
    summary["mode"] = "stream" + (" (real-time)" if args.realtime else "") if args.stream else "synthesize"
    if results[0].model_load_ms:
        summary["model_load_ms"] = round(results[0].model_load_ms, 1)
    if args.frames_out or args.out:
        save_outputs(results[0], audio.resample(audio.decode_pcm(data, fmt), fmt.sample_rate), args.frames_out,
                     args.out)
    return summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "client")
    add_connection_options(p)
    p.add_argument("--model", default="demo")
    p.add_argument("--audio", help="speech: WAV, or any audio file PyAV decodes (mp3, ogg, m4a, flac …)")
    p.add_argument("--max-audio-seconds", type=float, default=audio.MAX_FILE_SECONDS,
                   help="refuse a longer --audio file (decoding stops there)")
    p.add_argument("--stream", action="store_true", help="use the Stream RPC instead of Synthesize")
    p.add_argument("--converse", metavar="SCRIPT.yaml", help="play a conversation script (duration, utterances "
                   "with audio/at/interrupt_at) through a live session; --out writes the continuous video")
    p.add_argument("--output-rate", type=int, default=0, help="--converse: sample rate of the audio carried with "
                   "the frames (0 = the input's)")
    p.add_argument("--realtime", action="store_true", help="pace the stream (or each utterance) at the audio's "
                   "real-time rate")
    p.add_argument("--chunk-ms", type=float, default=40.0, help="stream chunk size")
    p.add_argument("--batch", type=int, default=0, help="Synthesize: frames per request (0 = whole audio)")
    p.add_argument("--start-frame", type=int, default=0)
    p.add_argument("--quality", type=int, default=0, help="JPEG quality (0 = server default)")
    p.add_argument("--clients", type=int, default=1, help="concurrent sessions")
    p.add_argument("--timeout", type=float, default=None, help="per-RPC deadline in seconds")
    p.add_argument("--frames-out", help="save the first session's JPEG frames here")
    p.add_argument("--out", help="write the first session's frames and audio as MP4")
    p.set_defaults(func=run_client)


def run_client(args: argparse.Namespace) -> int:
    try:
        summary = asyncio.run(run(args))
    except grpc.aio.AioRpcError as exc:
        print(f"lipsync client: {explain(exc, credentials_from_args(args))}")
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"lipsync client: error: {exc}")
        return 2
    print(json.dumps(summary, indent=2))
    return 0
