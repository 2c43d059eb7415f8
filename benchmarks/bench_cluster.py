"""Scale-out: what Envoy adds, and aggregate frames/s for 1 and 2 workers (`lipsync cluster`).

    python benchmarks/bench_cluster.py --repeats 20 --clients 8 --out benchmarks/results/cluster-cpu.json

Latency the proxy adds: p50/p95 of a 24-frame Synthesize and of a Stream's first frame (audio sent at once),
through Envoy and directly to the worker Envoy routes the model to. Throughput: `--clients` concurrent
Synthesize loops over `--models` models (spread by their x-model-id) for `--seconds`, with 1 and 2 workers.
Writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import assets, environment, figure, save_figure, write

from lipsync import timebase
from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import channel, open_stream, percentile, routing, worker_of
from lipsync.apps.cluster import Cluster
from lipsync.codec import audio
from lipsync.model import audio_features
from lipsync.model.pipeline import pick_device

SPEECH = Path(__file__).resolve().parent.parent / "assets" / "speech.wav"
FORMAT = pb.AudioFormat(encoding=pb.PCM_S16LE, sample_rate=timebase.SAMPLE_RATE, channels=1)


def pcm_for_frames(frames: int) -> bytes:
    """Speech that makes exactly `frames` output frames."""
    wave = audio.load_wav(SPEECH)
    samples = next(n for n in range(640, wave.numel(), 16) if audio_features.frame_count(n) == frames)
    return (wave[:samples].numpy() * 32767).astype(np.int16).tobytes()


async def synthesize_ms(target: str, model: str, pcm: bytes) -> tuple[float, str]:
    async with channel(target) as ch:
        t0 = time.perf_counter()
        call = pb_grpc.LipSyncStub(ch).Synthesize(pb.SynthesizeRequest(model_id=model, audio=pcm, format=FORMAT),
                                                 metadata=routing(model))
        await call
        return (time.perf_counter() - t0) * 1e3, await worker_of(call)


async def first_frame_ms(target: str, model: str, pcm: bytes) -> float:
    async def requests():
        yield pb.StreamRequest(config=pb.StreamConfig(model_id=model, format=FORMAT))
        yield pb.StreamRequest(audio=pcm)
        yield pb.StreamRequest(end_of_audio=True)
    async with channel(target) as ch:
        t0 = time.perf_counter()
        async for response in open_stream(pb_grpc.LipSyncStub(ch).Stream, requests(), metadata=routing(model)):
            if response.frames:
                return (time.perf_counter() - t0) * 1e3
    raise RuntimeError("the stream sent no frames")


def summary(values: list[float]) -> dict:
    return {"p50": round(percentile(values, 50), 2), "p95": round(percentile(values, 95), 2),
            "mean": round(statistics.fmean(values), 2), "n": len(values)}


async def proxy_overhead(cluster: Cluster, repeats: int) -> dict:
    """Alternating through Envoy and direct, so both see the same machine state."""
    pcm24, model = pcm_for_frames(24), "m0"
    _, worker = await synthesize_ms(f"127.0.0.1:{cluster.port}", model, pcm24)  # loads it where Envoy routes it
    direct = f"127.0.0.1:{next(w.port for w in cluster.workers if w.name == worker)}"
    via = f"127.0.0.1:{cluster.port}"
    rows = {"synthesize_24": {"envoy": [], "direct": []}, "stream_first_frame": {"envoy": [], "direct": []}}
    for _ in range(repeats):
        for name, target in (("envoy", via), ("direct", direct)):
            rows["synthesize_24"][name].append((await synthesize_ms(target, model, pcm24))[0])
            rows["stream_first_frame"][name].append(await first_frame_ms(target, model, pcm24))
    out = {}
    for what, by in rows.items():
        out[what] = {name: summary(values) for name, values in by.items()}
        out[what]["added_p50_ms"] = round(out[what]["envoy"]["p50"] - out[what]["direct"]["p50"], 2)
    return out


async def throughput(target: str, clients: int, models: int, seconds: float) -> dict:
    pcm, frames, workers = pcm_for_frames(24), [0], set()
    for k in range(models):  # load every model before timing
        workers.add((await synthesize_ms(target, f"m{k}", pcm))[1])
    deadline = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        while time.perf_counter() < deadline:
            _, worker = await synthesize_ms(target, f"m{k % models}", pcm)
            frames[0] += 24
            workers.add(worker)
    t0 = time.perf_counter()
    await asyncio.gather(*[loop(k) for k in range(clients)])
    wall = time.perf_counter() - t0
    return {"clients": clients, "models": models, "frames": frames[0], "wall_s": round(wall, 2),
            "fps": round(frames[0] / wall, 2), "workers_used": sorted(workers)}


def plot(result: dict, path: Path) -> None:
    fig, (a, b) = figure(2, (11, 4.2))
    overhead = result["proxy_overhead"]
    names = list(overhead)
    for offset, route in ((-0.2, "direct"), (0.2, "envoy")):
        a.bar([i + offset for i in range(len(names))], [overhead[n][route]["p50"] for n in names], width=0.4,
              label=f"{route} p50")
    a.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    a.set(ylabel="ms", title="latency through Envoy vs direct")
    rows = result["throughput"]
    b.bar([str(r["workers"]) for r in rows], [r["fps"] for r in rows], label="aggregate frames/s")
    b.set(xlabel="workers", ylabel="aggregate frames/s", title=f"{rows[0]['clients']} clients, Synthesize 24 frames")
    save_figure(fig, [a, b], path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="latency samples per route")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--models", type=int, default=4, help="model names the throughput clients use")
    parser.add_argument("--seconds", type=float, default=30.0, help="throughput run per worker count")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for the workers")
    args = parser.parse_args()

    files = assets(args.width, args.height)
    model = ",".join(f"{k}:{v}" for k, v in files.items())
    device = pick_device(args.device)
    overrides = [f"engine={args.engine}", "models=none", f"device={device}",
                 *[f"+models.m{k}={{{model}}}" for k in range(max(args.models, 1))], *args.overrides]
    result: dict = {"benchmark": "cluster", "environment": environment(device), "clients": args.clients,
                    "throughput": []}
    for workers in [int(w) for w in args.workers.split(",")]:
        cluster = Cluster(workers, 0, overrides, Path(tempfile.mkdtemp(prefix="bench-cluster-")))
        cluster.start()
        try:
            target = f"127.0.0.1:{cluster.port}"
            if "proxy_overhead" not in result:
                result["proxy_overhead"] = asyncio.run(proxy_overhead(cluster, args.repeats))
                print("proxy overhead:", result["proxy_overhead"], flush=True)
            row = asyncio.run(throughput(target, args.clients, args.models, args.seconds))
            row["workers"] = workers
            result["throughput"].append(row)
            print(f"{workers} worker(s): {row['fps']:.1f} frames/s over {row['workers_used']}", flush=True)
        finally:
            cluster.stop()
    write(result, args.out)
    if args.out:
        plot(result, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
