"""Pipeline throughput: frames/s and per-stage ms per frame for batch sizes 1, 8, 24, 32 at 1280×720 output.

    python benchmarks/bench_pipeline.py --device auto --out benchmarks/results/pipeline-cpu.json
"""
from __future__ import annotations

import argparse
import time

import torch

from common import assets, environment, sync, write
from lipsync.engines import EngineConfig
from lipsync.pipeline import ModelSpec, StageClock, load_pipeline, pick_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", choices=["auto", "eager", "compile", "tensorrt"])
    parser.add_argument("--batches", default="1,8,24,32")
    parser.add_argument("--frames", type=int, default=0, help="frames per batch size (default: 4×batch on CPU, "
                                                              "32×batch on CUDA)")
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--out")
    args = parser.parse_args()

    device = pick_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    files = assets(args.width, args.height)
    spec = ModelSpec.from_dict("bench", files)
    engine = EngineConfig.from_dict({"backend": args.backend, "max_batch": max(batches),
                                     "opt_batch": min(24, max(batches)), "batch_buckets": batches})
    pipeline = load_pipeline(spec, engine, device, micro_batch=max(batches), progress=True)

    wave = torch.from_numpy(__import__("numpy").random.default_rng(0).standard_normal(16000 * 4)
                            .astype("float32") * 0.1).to(device)
    pipeline.features(wave)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    features = pipeline.features(wave)
    sync(device)
    audio_ms = (time.perf_counter() - t0) * 1e3

    rows = []
    for batch in batches:
        total = args.frames or batch * (32 if device.type == "cuda" else 4)
        steps = max(1, total // batch)
        feats = features[:batch].repeat((batch + features.shape[0] - 1) // features.shape[0] + 1, 1, 1, 1)[:batch]
        pipeline.micro_batch = batch
        pipeline.render(feats, quality=args.quality)  # warm-up at this shape
        sync(device)
        clock = StageClock(device)
        t0 = time.perf_counter()
        for step in range(steps):
            pipeline.render(feats, start_frame=step * batch, quality=args.quality, clock=clock)
        sync(device)
        wall = time.perf_counter() - t0
        frames = steps * batch
        stages = clock.result()
        rows.append({"batch": batch, "frames": frames, "fps": round(frames / wall, 2),
                     "ms_per_frame": {k: round(v / frames, 3) for k, v in stages.items()} |
                     {"total": round(wall * 1e3 / frames, 3)}})
        print(f"batch {batch:3d}: {frames / wall:8.2f} frames/s", flush=True)
    write({"benchmark": "pipeline", "environment": environment(device),
           "engine": {"backend": pipeline.generator.backend, "precision": pipeline.generator.precision},
           "output": f"{args.width}x{args.height} JPEG q{args.quality}",
           "audio_features_ms_per_4s_utterance": round(audio_ms, 2),
           "note": "seeded untrained weights; speed does not depend on the weights", "results": rows}, args.out)


if __name__ == "__main__":
    main()
