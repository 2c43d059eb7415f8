"""Live sessions at scale: N concurrent conversations against a `lipsync serve` child.

    python benchmarks/bench_live.py --sessions 1,2,4,8 --seconds 30 --out benchmarks/results/live-cpu.json

Each session speaks about half the time (utterances of 2–8 s of speech, pauses drawn so the duty cycle is
`--duty`), 10 % of utterances are interrupted part-way, and the audio of an utterance is sent as fast as a TTS
would produce it. The scripts are seeded: every run sends the same conversations. Per N: frames, late (HELD)
frames and their rate, first-frame latency p50/p95, pacing (how late frames arrived against their slots: max,
p50/p99, and gaps in the frame indices), sessions refused by admission control, and the server's CPU per frame
by thread (see bench_server). The answer is the largest N with zero late frames: real-time sessions per device.
`--duty 0` opens idle sessions (no speech): the cost of pacing alone.
Writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from common import ThreadCPU, assets, environment, figure, model_override, save_figure, write, write_partial

from lipsync import timebase
from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import Say, channel, converse, percentile
from lipsync.apps.serve import spawn
from lipsync.codec import audio
from lipsync.model.pipeline import pick_device

SPEECH = Path(__file__).resolve().parent.parent / "assets" / "speech.wav"
FORMAT = audio.AudioFormat("s16le", timebase.SAMPLE_RATE, 1)


def speech_pcm(seconds: float, offset: float) -> bytes:
    wave = audio.load_wav(SPEECH)
    start = int(offset * timebase.SAMPLE_RATE) % wave.numel()
    reps = int(np.ceil((start + seconds * timebase.SAMPLE_RATE) / wave.numel())) + 1
    wave = wave.repeat(reps)[start:start + int(seconds * timebase.SAMPLE_RATE)]
    return (wave.numpy() * 32767).astype(np.int16).tobytes()


def script(seed: int, seconds: float, duty: float) -> list[Say]:
    """A seeded conversation: utterances of 2–8 s, pauses so that speech fills `duty` of the time, 10 % barged in
    (duty 0: an idle session, which only watches the avatar)."""
    rng = random.Random(seed)
    says, t = [], rng.uniform(0.2, 1.5)
    while duty > 0:
        length = rng.uniform(2.0, 8.0)
        if t + length > seconds - 1.0:
            break
        interrupt = t + length * rng.uniform(0.3, 0.9) if rng.random() < 0.1 else None
        says.append(Say(speech_pcm(length, rng.uniform(0, 10)), FORMAT, t, interrupt, f"s{seed}-u{len(says)}"))
        t += length + rng.expovariate(duty / ((1 - duty) * length)) if duty < 1 else length
    return says


def pacing(result) -> tuple[list[float], int]:
    """How late each frame arrived against its slot (ms; slot n is due n intervals after slot 0 arrived), and how
    many slots never arrived (gaps in the frame indices)."""
    if not result.frames:
        return [], 0
    interval = result.session.frame_interval_ms / 1e3
    first, t0 = result.frames[0].index, result.received_s[0]
    late = [1e3 * max(0.0, (t - t0) - (f.index - first) * interval) for f, t in zip(result.frames, result.received_s)]
    gaps = sum(b.index - a.index - 1 for a, b in zip(result.frames, result.frames[1:]))
    return late, gaps


async def run_point(target: str, server_pid: int, sessions: int, seconds: float, duty: float,
                    channels: int, model: str = "bench", output: int = pb.FULL_FRAME) -> dict:
    async with contextlib.AsyncExitStack() as stack:
        stubs = [pb_grpc.LipSyncStub(await stack.enter_async_context(channel(target))) for _ in range(channels)]

        async def one(k: int):
            try:
                return await converse(stubs[k % channels], model, script(1000 * sessions + k, seconds, duty),
                                      seconds, keep_images=False, output=output)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return None
                raise
        with ThreadCPU(server_pid) as cpu:
            results = await asyncio.gather(*[one(k) for k in range(sessions)])
    admitted = [r for r in results if r is not None]
    summaries = [r.summary() for r in admitted]
    frames = sum(s["frames"] for s in summaries)
    late = sum(s["late_frames"] for s in summaries)
    latencies = [u["first_frame_latency_ms"] for s in summaries for u in s["utterances"].values()
                 if "first_frame_latency_ms" in u]
    interrupted = sum(bool(u.get("interrupted")) for s in summaries for u in s["utterances"].values())
    paced = [pacing(r) for r in admitted]
    lateness = [x for late, _ in paced for x in late]
    return {"sessions": sessions, "admitted": len(admitted), "refused": sessions - len(admitted),
            "frames": frames, "speech_frames": sum(s["speech"] for s in summaries), "late_frames": late,
            "late_rate": round(late / frames, 5) if frames else None,
            "utterances": len(latencies), "interrupted": interrupted,
            # a device below real time (slow_device=degrade): utterances that started with a frame stride > 1, and
            # speech slots that showed a rendered frame again (on time by design, counted apart from late ones)
            "degraded_utterances": sum(u.get("frame_stride", 1) > 1 for s in summaries
                                       for u in s["utterances"].values()),
            "repeated_frames": sum(u.get("frames_repeated", 0) for s in summaries for u in s["utterances"].values()),
            "first_frame_latency_ms": {"p50": round(percentile(latencies, 50), 1),
                                       "p95": round(percentile(latencies, 95), 1)},
            "pacing_max_late_ms": max((s["pacing_ms"]["max_late"] for s in summaries), default=0.0),
            "pacing_late_ms": {"p50": round(percentile(lateness, 50), 1), "p99": round(percentile(lateness, 99), 1),
                               "max": round(max(lateness, default=0.0), 1)},
            "gaps": sum(g for _, g in paced),
            "server_cpu_ms_per_frame": cpu.per_frame_ms(frames)}


def server_pacing(log_path: Path, offset: int) -> dict:
    """The server's own account of its pacing (each session's close line from `offset` on): how late frames were
    handed to gRPC against their slots, for the worst session (p99) and over all (max)."""
    with log_path.open() as f:
        f.seek(offset)
        closes = [json.loads(m.group(0)) for m in re.finditer(r'\{"event": "live_session_close".*\}', f.read())]
    return {"sessions": len(closes),
            "worst_session_p99": max((c["pacing_late_ms_p99"] for c in closes), default=0.0),
            "worst_session_p50": max((c["pacing_late_ms_p50"] for c in closes), default=0.0),
            "max": max((c["pacing_late_ms_max"] for c in closes), default=0.0)}


def plot(rows: list[dict], path: Path) -> None:
    fig, (a, b) = figure(2, (11, 4.2))
    n = [r["sessions"] for r in rows]
    a.plot(n, [100 * (r["late_rate"] or 0) for r in rows], marker="o", label="late frames")
    b.plot(n, [r["first_frame_latency_ms"]["p50"] for r in rows], marker="o", label="p50")
    b.plot(n, [r["first_frame_latency_ms"]["p95"] for r in rows], marker="o", label="p95")
    a.set(xlabel="concurrent live sessions", ylabel="% of frames shown HELD", title="late frames")
    b.set(xlabel="concurrent live sessions", ylabel="first-frame latency (ms)", title="utterance latency")
    save_figure(fig, [a, b], path)


def summary(args: argparse.Namespace, device, rows: list[dict]) -> dict:
    real_time = [r["sessions"] for r in rows if r["late_frames"] == 0 and r["refused"] == 0]
    return {"benchmark": "live", "environment": environment(device), "seconds_per_session": args.seconds,
            "duty_cycle": args.duty, "time_scale": args.time_scale, "admission_control": args.admission,
            "output": f"{args.width}x{args.height} JPEG" if args.output == "full" else "SQUARE (pasted squares)",
            "model": args.model or "seeded weights", "variant": args.variant if not args.model else None,
            "max_real_time_sessions": max(real_time, default=0),
            "note": f"conf/models/{args.model}.yaml" if args.model else "seeded untrained weights: the engine `auto` "
                    "chooses can differ from a trained model's (int8 passes the gate on them)", "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each session (media seconds)")
    parser.add_argument("--duty", type=float, default=0.5, help="share of the time each session speaks (0: idle "
                                                                "sessions, paced frames only)")
    parser.add_argument("--channels", type=int, default=1, help="client connections the sessions share")
    parser.add_argument("--time-scale", type=float, default=1.0, help="server.live.time_scale (slower clock)")
    parser.add_argument("--admission", action="store_true", help="keep admission control on (default: off, to "
                                                                 "measure where late frames begin)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--variant", choices=("328", "160"), default="328", help="SyncTalk_2D generator variant")
    parser.add_argument("--model", help="a model declared in conf/models/NAME.yaml (e.g. demo, the trained "
                        "presenter: its engine is chosen for its own weights) instead of seeded weights")
    parser.add_argument("--output", choices=("full", "square"), default="full",
                        help="frames the sessions ask for: whole frames, or the pasted square only (SQUARE)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for the server")
    args = parser.parse_args()

    device = pick_device(args.device)
    if args.model:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", args.model):
            parser.error(f"--model {args.model!r}: must name a file conf/models/NAME.yaml")
        model, declared = args.model, [f"models={args.model}", f"+models.{args.model}.preload=true"]
    else:
        model, declared = "bench", ["models=none", model_override(assets(args.width, args.height,
                                                                         variant=args.variant), args.variant)]
    output = pb.SQUARE if args.output == "square" else pb.FULL_FRAME
    overrides = [f"engine={args.engine}", *declared, f"device={device}", "server.metrics_port=-1",
                 f"server.live.time_scale={args.time_scale}"]
    if not args.admission:
        overrides.append("server.live.headroom=1.0")
        overrides.append("server.live.duty_cycle=0.001")
    server_log = Path(tempfile.mkstemp(prefix="bench_live-server-", suffix=".log")[1])
    with server_log.open("w") as log_file:
        proc, port = spawn([*overrides, *args.overrides], log_file=log_file)
    rows = []
    try:
        for n in [int(s) for s in args.sessions.split(",")]:
            logged = server_log.stat().st_size
            row = asyncio.run(run_point(f"127.0.0.1:{port}", proc.pid, n, args.seconds, args.duty, args.channels,
                                        model, output))
            time.sleep(0.5)  # the sessions' close lines
            row["server_pacing_ms"] = server_pacing(server_log, logged)
            rows.append(row)
            write_partial(summary(args, device, rows), args.out)
            print(f"{n:3d} sessions: late {row['late_frames']:5d}/{row['frames']:6d}  first frame p50 "
                  f"{row['first_frame_latency_ms']['p50']:7.1f} ms p95 {row['first_frame_latency_ms']['p95']:7.1f} ms"
                  f"  refused {row['refused']}  pacing p99 {row['pacing_late_ms']['p99']:.1f} ms at the client, "
                  f"{row['server_pacing_ms']['worst_session_p99']:.0f} ms at the server, gaps {row['gaps']}"
                  f"  server CPU ms/frame: event loop {row['server_cpu_ms_per_frame'].get('event-loop', 0):.3f}",
                  flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        server_log.unlink()
    write(summary(args, device, rows), args.out)
    if args.out and rows:
        plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
