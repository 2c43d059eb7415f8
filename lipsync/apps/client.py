"""`lipsync client`: drive a lipsync server with a WAV by Synthesize or Stream, alone or as N concurrent
sessions, or play a conversation script through a live session (Converse); save JPEG frames and/or an MP4,
print per-stage timings, fps and latency percentiles (or the conversation's latencies and late frames).

The calls themselves are the client package's (`lipsync_client`, clients/python: no torch); this module adds the
command line, any-format audio files and MP4 output, and re-exports the package's names for older imports."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import grpc
from lipsync_client import (
    Compositor,
    ConverseResult,
    Credentials,
    LipSyncStub,
    Say,
    SessionResult,
    channel,
    converse,
    explain,
    is_local_target,
    open_stream,
    percentile,
    routing,
    stream,
    summarize,
    synthesize,
    worker_lost,
    worker_of,
)
from lipsync_client.avatar import OUTPUTS, compositor_for, frame_rgb

from lipsync import timebase
from lipsync._proto import lipsync_pb2 as pb
from lipsync.apps.options import add_connection_options, command_parser

__all__ = ["ConverseResult", "Credentials", "Say", "SessionResult", "channel", "converse", "explain",
           "is_local_target", "open_stream", "percentile", "routing", "stream", "summarize", "synthesize",
           "worker_lost", "worker_of", "credentials_from_args", "load_script", "add_parser", "run", "run_client"]


def credentials_from_args(args: argparse.Namespace) -> Credentials:
    """--tls/--tls-ca/--tls-cert/--tls-key/--tls-server-name and --token (else $LIPSYNC_TOKEN)."""
    return Credentials(token=args.token or os.environ.get("LIPSYNC_TOKEN") or None, tls=args.tls, ca=args.tls_ca,
                       cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name,
                       insecure_token=args.allow_insecure_token)


def load_script(path: str | Path) -> tuple[list[Say], float]:
    """A conversation script (YAML): `duration` (seconds) and `utterances`, each `{audio: WAV path relative to
    the script, at: seconds, interrupt_at: optional seconds, id: optional, barge_in: optional}`."""
    from omegaconf import OmegaConf

    from lipsync.codec import audio

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


def write_mp4(frames: list, out: str, wave_16k_or_pcm, sample_rate: int | None = None,
              compositor: Compositor | None = None) -> Path:
    """Frames (Frame or LiveFrame messages; SQUARE output pasted by `compositor`) and their audio (a waveform
    tensor, or s16 PCM bytes at `sample_rate`) → MP4."""
    import numpy as np
    import torch

    from lipsync.codec.video import Mp4Writer

    def image(frame) -> torch.Tensor:
        return torch.from_numpy(frame_rgb(frame, compositor)).permute(2, 0, 1)[None]
    first = image(frames[0])
    writer = Mp4Writer(out, first.shape[3], first.shape[2], **({"sample_rate": sample_rate} if sample_rate else {}))
    for frame in frames:
        writer.write(image(frame))
    wave = wave_16k_or_pcm
    if isinstance(wave, bytes):
        wave = torch.from_numpy(np.frombuffer(wave, dtype=np.int16).astype(np.float32) / 32768.0)
    return writer.close(wave)


def save_frames(jpegs: list[tuple[int, bytes]], frames_out: str) -> None:
    folder = Path(frames_out).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for index, data in jpegs:
        (folder / f"{index:06d}.jpg").write_bytes(data)
    print(f"frames: {folder}")


async def _compositor(stub: LipSyncStub, args: argparse.Namespace) -> Compositor | None:
    """SQUARE output: the avatar's frames, fetched once, for pasting the squares back (--out)."""
    return await compositor_for(stub, args.model, args.output, args.quality, args.timeout) if args.out else None


async def announce_load(stub: LipSyncStub, model: str, timeout: float | None) -> None:
    """Say so (on stderr) when the model is not loaded yet: the first call waits for its load, which on a machine
    that has not run it before includes measuring its engines (tens of seconds on a CPU), and nothing else would
    explain the wait. Silent where the server does not say (an older server, a token without the right)."""
    try:
        listed = await stub.ListModels(pb.ListModelsRequest(), timeout=timeout or 10)
    except grpc.aio.AioRpcError:
        return
    if any(m.model_id == model and not m.loaded for m in listed.models):
        print(f"the server is loading model {model} for this call (a first load on a machine measures its engines: "
              "up to a minute on a CPU) …", file=sys.stderr, flush=True)


async def run_converse(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    says, duration = load_script(args.converse)
    async with channel(args.server, credentials=credentials_from_args(args)) as ch:
        await announce_load(LipSyncStub(ch), args.model, args.timeout)
    with tqdm(total=round(duration * timebase.FPS), desc="live session", unit="frame") as bar:
        async with channel(args.server, credentials=credentials_from_args(args)) as ch:
            stub = LipSyncStub(ch)
            compositor = await _compositor(stub, args)
            result = await converse(stub, args.model, says, duration, args.start_frame,
                                    args.quality, args.output_rate, args.realtime, args.chunk_ms, args.timeout,
                                    progress=bar.update, output=OUTPUTS[args.output])
    summary = {"mode": "converse", **result.summary()}
    if args.out and result.frames:
        pcm = b"".join(f.audio for f in result.frames)
        print(f"video: {write_mp4(result.frames, args.out, pcm, result.session.output_sample_rate, compositor)}")
    if args.frames_out:
        save_frames([(f.index, f.jpeg) for f in result.frames], args.frames_out)
    return summary


async def run(args: argparse.Namespace) -> dict:
    if args.converse:
        return await run_converse(args)
    if not args.audio:
        raise ValueError("client: give --audio WAV (or --converse SCRIPT.yaml)")
    from tqdm import tqdm

    from lipsync.codec import audio
    from lipsync.model.audio_features import frame_count

    data, fmt = audio.read_audio(args.audio, args.max_audio_seconds)
    async with channel(args.server, credentials=credentials_from_args(args)) as ch:
        stub = LipSyncStub(ch)
        await announce_load(stub, args.model, args.timeout)
        compositor = await _compositor(stub, args)

        samples = len(data) // fmt.frame_bytes * timebase.SAMPLE_RATE // fmt.sample_rate
        bar = tqdm(total=frame_count(samples) * args.clients, desc="frames", unit="frame", disable=not args.stream)

        async def one(k: int) -> SessionResult:
            if args.stream:
                return await stream(stub, args.model, data, fmt, args.chunk_ms, args.realtime, args.start_frame,
                                    args.quality, args.timeout, progress=bar.update, output=OUTPUTS[args.output])
            return await synthesize(stub, args.model, data, fmt, args.batch, args.start_frame, args.quality,
                                    args.timeout, output=OUTPUTS[args.output])

        t0 = time.perf_counter()
        results = await asyncio.gather(*[one(k) for k in range(args.clients)])
        wall = time.perf_counter() - t0
        bar.close()
    summary = summarize(list(results), wall)
    summary["mode"] = "stream" + (" (real-time)" if args.realtime else "") if args.stream else "synthesize"
    if results[0].model_load_ms:
        summary["model_load_ms"] = round(results[0].model_load_ms, 1)
    first = results[0]
    if args.frames_out:
        save_frames([(f.index, f.jpeg) for f in first.frames], args.frames_out)
    if args.out and first.frames:
        wave = audio.resample(audio.decode_pcm(data, fmt), fmt.sample_rate)
        print(f"video: {write_mp4(first.frames, args.out, wave, compositor=compositor)}")
    return summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "client")
    add_connection_options(p)
    p.add_argument("--model", default="demo")
    p.add_argument("--audio", help="speech: WAV, or any audio file PyAV decodes (mp3, ogg, m4a, flac …)")
    p.add_argument("--max-audio-seconds", type=float, default=3600.0,
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
    p.add_argument("--output", choices=tuple(OUTPUTS), default="full", help="frames the server sends: full "
                   "pictures, or only the generated square of each (pasted back onto the avatar's frames, fetched "
                   "once, for --out; --frames-out keeps the squares as they came)")
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
