"""Server load: N concurrent Stream sessions, real-time paced and flat out, against a `lipsync serve` child.

    python benchmarks/bench_server.py --streams 1,4,8,16,32 --seconds 4 --out benchmarks/results/server-gpu.json

`--workers K` runs K `lipsync serve` processes on the one device (a process layout: K full workers per GPU, each
batching its own sessions, as `lipsync cluster --workers K device=cuda:0` runs them behind Envoy) and deals the
streams to them in turn; figures are the layout's (frames/s of all workers, CPU summed over them).

Per point: aggregate frames/s, frame latency p50/p95/p99 (from the moment the audio a frame needs was sent),
for paced runs whether every stream kept up with real time (25 fps each), and the server's CPU per delivered
frame by thread (event-loop: gRPC, sessions, scheduling, messages; infer-<device>: mel, encoder, generator;
encode-<device>: compositing, JPEG; blocking: audio decode; grpc_*: gRPC's own threads). Also a 24-frame
Synthesize p50. After the server stops, the same model (same configuration, engine and batch) runs in this
process through the scheduler alone, with no gRPC and no sessions (`--no-reference` skips it): each flat-out
point's frames/s is also given as a share of that pipeline's. Writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import ThreadCPU, assets, environment, figure, model_override, save_figure, write, write_partial

from lipsync import timebase
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import OUTPUTS, channel, percentile, stream, summarize, synthesize
from lipsync.apps.serve import spawn
from lipsync.codec import audio
from lipsync.config import load_config
from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import ModelSpec, PipelineConfig, load_pipeline, micro_batch_setting, pick_device

SPEECH = Path(__file__).resolve().parent.parent / "assets" / "speech.wav"


def speech_pcm(seconds: float) -> bytes:
    wave = audio.load_wav(SPEECH)
    reps = int(np.ceil(seconds * timebase.SAMPLE_RATE / wave.numel()))
    wave = wave.repeat(reps)[: int(seconds * timebase.SAMPLE_RATE)]
    return (wave.numpy() * 32767).astype(np.int16).tobytes()


async def run_point(targets: list[str], server_pids: list[int], sessions: int, pcm: bytes, paced: bool,
                    chunk_ms: float, output: int = 0) -> dict:
    fmt = audio.AudioFormat("s16le", timebase.SAMPLE_RATE, 1)
    async with contextlib.AsyncExitStack() as stack:
        stubs = [pb_grpc.LipSyncStub(await stack.enter_async_context(channel(target))) for target in targets]
        with ThreadCPU(*server_pids) as cpu:
            t0 = time.perf_counter()
            results = await asyncio.gather(*[stream(stubs[k % len(stubs)], "bench", pcm, fmt, chunk_ms, paced,
                                                    output=output) for k in range(sessions)])
            wall = time.perf_counter() - t0
    summary = summarize(list(results), wall)
    summary["server_cpu_ms_per_frame"] = cpu.per_frame_ms(summary["frames"])
    audio_s = len(pcm) / 2 / timebase.SAMPLE_RATE
    # a paced stream keeps up when its last frame arrives within a second of the end of its audio + look-ahead
    summary["real_time_streams"] = sum(r.wall_s <= audio_s + 1.0 for r in results) if paced else None
    summary["streams"], summary["paced"] = sessions, paced
    return summary


async def synthesize_p50(target: str, pcm24: bytes, repeats: int) -> float:
    fmt = audio.AudioFormat("s16le", timebase.SAMPLE_RATE, 1)
    async with channel(target) as ch:
        stub = pb_grpc.LipSyncStub(ch)
        await synthesize(stub, "bench", pcm24, fmt)
        times = [(await synthesize(stub, "bench", pcm24, fmt)).latencies_ms[0] for _ in range(repeats)]
    return percentile(times, 50)


def pipeline_reference(overrides: list[str], device, frames_per_batch: int) -> dict:
    """Frames/s of the served model in this process, through the scheduler (batching, inference and encode
    threads) at the batch the server used: the ceiling the server's gRPC, sessions and messages are measured
    against. Built from the server's own configuration (`overrides`), so engine and micro-batch are the same."""
    from bench_pipeline import run as run_pipeline
    from bench_pipeline import seeded_audio

    cfg = load_config(overrides)
    engine_cfg, pipeline_cfg = EngineConfig.from_dict(cfg.engine), PipelineConfig.from_dict(cfg.pipeline)
    spec = ModelSpec.from_dict("bench", cfg.models.bench)
    pipeline = load_pipeline(spec, engine_cfg, device, micro_batch_setting(pipeline_cfg, engine_cfg, device.type))
    batch = min(int(cfg.registry.max_batch), pipeline.micro_batch)  # as the registry sizes the model's batches
    rows, _ = asyncio.run(run_pipeline(pipeline, seeded_audio(device), [batch],
                                       SimpleNamespace(frames=batch * frames_per_batch, quality=75), device))
    return {"batch": batch, "frames": rows[0]["frames"], "fps": rows[0]["fps"],
            "engine": f"{pipeline.generator.backend}/{pipeline.generator.precision}",
            "ms_per_frame": rows[0]["ms_per_frame"]}


def plot(rows: list[dict], path: Path) -> None:
    fig, (a, b) = figure(2, (11, 4.2))
    for paced in (False, True):
        pts = [r for r in rows if r["paced"] == paced]
        label = "real-time paced" if paced else "flat out"
        a.plot([r["streams"] for r in pts], [r["fps"] for r in pts], marker="o", label=label)
        b.plot([r["streams"] for r in pts], [r["latency_ms"]["p95"] for r in pts], marker="o", label=label)
    a.set(xlabel="concurrent streams", ylabel="aggregate frames/s", title="throughput")
    b.set(xlabel="concurrent streams", ylabel="frame latency p95 (ms)", title="latency", yscale="log")
    save_figure(fig, [a, b], path)


def summary(args: argparse.Namespace, device, synthesize_p50_ms: float, reference: dict | None,
            rows: list[dict]) -> dict:
    paced = [r for r in rows if r["paced"] and r["real_time_streams"] == r["streams"]]
    return {"benchmark": "server", "environment": environment(device), "audio_s_per_stream": args.seconds,
            "chunk_ms": args.chunk_ms, "output": f"{args.width}x{args.height} JPEG" if args.output == "full" else
            f"SQUARE: the crop rectangle's JPEG of a {args.width}x{args.height} frame", "variant": args.variant,
            "workers": args.workers, "synthesize_24_frames_p50_ms": round(synthesize_p50_ms, 1),
            "pipeline_reference": reference,
            "max_real_time_streams_sustained": max((r["streams"] for r in paced), default=0), "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,4,8,16,32")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per stream")
    parser.add_argument("--chunk-ms", type=float, default=40.0)
    parser.add_argument("--modes", default="flat,paced")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--variant", choices=("328", "160"), default="328", help="SyncTalk_2D generator variant")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--workers", type=int, default=1, help="lipsync serve processes on the device, streams "
                        "dealt to them in turn (a process layout)")
    parser.add_argument("--no-reference", action="store_true", help="skip the in-process pipeline reference")
    parser.add_argument("--output", choices=tuple(OUTPUTS), default="full", help="frames the server sends: whole "
                        "pictures, or each frame's generated square (FrameOutput SQUARE)")
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for the server")
    args = parser.parse_args()

    files = assets(args.width, args.height, variant=args.variant)
    device = pick_device(args.device)
    overrides = [f"engine={args.engine}", "models=none", model_override(files, args.variant), f"device={device}",
                 "server.metrics_port=-1", "server.max_audio_seconds=3600", *args.overrides]
    if not 1 <= args.workers <= 16:
        parser.error(f"--workers {args.workers}: must be 1..16")
    with ThreadPoolExecutor(args.workers) as starting:  # the workers load (and compile) side by side
        started = [starting.submit(spawn, overrides) for _ in range(args.workers)]
    servers = [f.result() for f in started if not f.exception()]
    if len(servers) < args.workers:  # none is left running when one failed to start
        for proc, _ in servers:
            proc.kill()
        raise next(f.exception() for f in started if f.exception())
    targets, pids = [f"127.0.0.1:{port}" for _, port in servers], [proc.pid for proc, _ in servers]
    pcm = speech_pcm(args.seconds)
    rows = []
    try:
        p50 = asyncio.run(synthesize_p50(targets[0], speech_pcm(24 * 0.04)[: 640 * 24 * 2 - 2 * 640 * 2],
                                         5 if device.type == "cpu" else 30))
        for mode in args.modes.split(","):
            for n in [int(s) for s in args.streams.split(",")]:
                row = asyncio.run(run_point(targets, pids, n, pcm, mode == "paced", args.chunk_ms,
                                            OUTPUTS[args.output]))
                row["workers"] = args.workers
                rows.append(row)
                write_partial(summary(args, device, p50, None, rows), args.out)
                cpu = row["server_cpu_ms_per_frame"]
                print(f"{mode:6s} {n:3d} streams: {row['fps']:8.1f} frames/s  p95 {row['latency_ms']['p95']:9.1f} ms"
                      + (f"  real-time {row['real_time_streams']}/{n}" if row["paced"] else "")
                      + f"  server CPU ms/frame: event loop {cpu.get('event-loop', 0):.3f}, all {cpu['total']:.3f}",
                      flush=True)
    finally:
        for proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers:
            proc.wait(120)
    reference = None
    if not args.no_reference:  # after the server has stopped: the two never share the device or the cores
        reference = pipeline_reference(overrides, device, 32 if device.type == "cuda" else 16)
        for row in rows:
            if not row["paced"]:
                row["share_of_pipeline"] = round(row["fps"] / reference["fps"], 3)
        print(f"in-process pipeline ({reference['engine']}, batch {reference['batch']}): "
              f"{reference['fps']:.1f} frames/s; flat-out server: "
              + ", ".join(f"{r['streams']} streams {r['share_of_pipeline']:.0%}" for r in rows if not r["paced"]),
              flush=True)
    write(summary(args, device, p50, reference, rows), args.out)
    if args.out and rows:
        plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
