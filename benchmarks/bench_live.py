"""Live sessions at scale: N concurrent conversations against a `lipsync serve` child.

    python benchmarks/bench_live.py --sessions 1,2,4,8 --seconds 30 --out benchmarks/results/live-cpu.json

Each session speaks about half the time (utterances of 2–8 s of speech, pauses drawn so the duty cycle is
`--duty`), 10 % of utterances are interrupted part-way, and the audio of an utterance is sent as fast as a TTS
would produce it. The scripts are seeded: every run sends the same conversations. Per N: frames, late (HELD)
frames and their rate, first-frame latency p50/p95, pacing (how late frames left against their slots), sessions
refused by admission control. The answer is the largest N with zero late frames: real-time sessions per device.
Writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import signal
from pathlib import Path

import grpc
import numpy as np
from common import assets, environment, figure, save_figure, write

from lipsync import timebase
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
    """A seeded conversation: utterances of 2–8 s, pauses so that speech fills `duty` of the time, 10 % barged in."""
    rng = random.Random(seed)
    says, t = [], rng.uniform(0.2, 1.5)
    while True:
        length = rng.uniform(2.0, 8.0)
        if t + length > seconds - 1.0:
            break
        interrupt = t + length * rng.uniform(0.3, 0.9) if rng.random() < 0.1 else None
        says.append(Say(speech_pcm(length, rng.uniform(0, 10)), FORMAT, t, interrupt, f"s{seed}-u{len(says)}"))
        t += length + rng.expovariate(duty / ((1 - duty) * length)) if duty < 1 else length
    return says


async def run_point(target: str, sessions: int, seconds: float, duty: float) -> dict:
    async with channel(target) as ch:
        stub = pb_grpc.LipSyncStub(ch)

        async def one(k: int):
            try:
                return await converse(stub, "bench", script(1000 * sessions + k, seconds, duty), seconds)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return None
                raise
        results = await asyncio.gather(*[one(k) for k in range(sessions)])
    admitted = [r for r in results if r is not None]
    summaries = [r.summary() for r in admitted]
    frames = sum(s["frames"] for s in summaries)
    late = sum(s["late_frames"] for s in summaries)
    latencies = [u["first_frame_latency_ms"] for s in summaries for u in s["utterances"].values()
                 if "first_frame_latency_ms" in u]
    interrupted = sum(bool(u.get("interrupted")) for s in summaries for u in s["utterances"].values())
    return {"sessions": sessions, "admitted": len(admitted), "refused": sessions - len(admitted),
            "frames": frames, "speech_frames": sum(s["speech"] for s in summaries), "late_frames": late,
            "late_rate": round(late / frames, 5) if frames else None,
            "utterances": len(latencies), "interrupted": interrupted,
            "first_frame_latency_ms": {"p50": round(percentile(latencies, 50), 1),
                                       "p95": round(percentile(latencies, 95), 1)},
            "pacing_max_late_ms": max((s["pacing_ms"]["max_late"] for s in summaries), default=0.0)}


def plot(rows: list[dict], path: Path) -> None:
    fig, (a, b) = figure(2, (11, 4.2))
    n = [r["sessions"] for r in rows]
    a.plot(n, [100 * (r["late_rate"] or 0) for r in rows], marker="o", label="late frames")
    b.plot(n, [r["first_frame_latency_ms"]["p50"] for r in rows], marker="o", label="p50")
    b.plot(n, [r["first_frame_latency_ms"]["p95"] for r in rows], marker="o", label="p95")
    a.set(xlabel="concurrent live sessions", ylabel="% of frames shown HELD", title="late frames")
    b.set(xlabel="concurrent live sessions", ylabel="first-frame latency (ms)", title="utterance latency")
    save_figure(fig, [a, b], path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each session (media seconds)")
    parser.add_argument("--duty", type=float, default=0.5, help="share of the time each session speaks")
    parser.add_argument("--time-scale", type=float, default=1.0, help="server.live.time_scale (slower clock)")
    parser.add_argument("--admission", action="store_true", help="keep admission control on (default: off, to "
                                                                 "measure where late frames begin)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for the server")
    args = parser.parse_args()

    files = assets(args.width, args.height)
    model = ",".join(f"{k}:{v}" for k, v in files.items())
    device = pick_device(args.device)
    overrides = [f"engine={args.engine}", "models=none", f"+models.bench={{{model},preload:true}}",
                 f"device={device}", "server.metrics_port=-1", f"server.live.time_scale={args.time_scale}"]
    if not args.admission:
        overrides.append("server.live.headroom=1.0")
        overrides.append("server.live.duty_cycle=0.001")
    proc, port = spawn([*overrides, *args.overrides])
    rows = []
    try:
        for n in [int(s) for s in args.sessions.split(",")]:
            row = asyncio.run(run_point(f"127.0.0.1:{port}", n, args.seconds, args.duty))
            rows.append(row)
            print(f"{n:3d} sessions: late {row['late_frames']:5d}/{row['frames']:6d}  first frame p50 "
                  f"{row['first_frame_latency_ms']['p50']:7.1f} ms p95 {row['first_frame_latency_ms']['p95']:7.1f} ms"
                  f"  refused {row['refused']}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    real_time = [r["sessions"] for r in rows if r["late_frames"] == 0 and r["refused"] == 0]
    write({"benchmark": "live", "environment": environment(device), "seconds_per_session": args.seconds,
           "duty_cycle": args.duty, "time_scale": args.time_scale, "admission_control": args.admission,
           "output": f"{args.width}x{args.height} JPEG", "max_real_time_sessions": max(real_time, default=0),
           "note": "seeded untrained weights; speed does not depend on the weights", "results": rows}, args.out)
    if args.out and rows:
        plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
