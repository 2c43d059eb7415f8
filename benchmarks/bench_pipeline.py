"""Pipeline throughput through the serving path (the scheduler, as `lipsync serve` runs it): frames/s and per-stage
ms per frame for batch sizes 1, 8, 24, 32 at 1280×720 output.

    python benchmarks/bench_pipeline.py --device auto --out benchmarks/results/pipeline-cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import torch
from common import TensorOps, assets, environment, sync, write

from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import ModelSpec, load_pipeline, pick_device
from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler

STAGES = ("queue", "inference", "composite", "encode")


def seeded_audio(device: torch.device, seconds: float = 4.0) -> torch.Tensor:
    """The same 16 kHz noise every run: the audio front end's input (its content does not change the timing)."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.standard_normal(int(16000 * seconds)).astype("float32") * 0.1).to(device)


async def run(pipeline, wave, batches: list[int], args, device) -> tuple[list[dict], float]:
    """Frames/s through the serving path (scheduler: batching, inference and encode threads) per batch size."""
    rows = []
    audio_ms = 0.0
    for batch in batches:
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=batch, max_delay_ms=0,
                                   max_queue_frames=1 << 16)
        scheduler.start()
        for _ in range(2):  # warm-up, then the timed figure for the audio front end
            t0 = time.perf_counter()
            _, features = await scheduler.features(scheduler.feature_stream(), wave, end=True)
            sync(device)
            audio_ms = (time.perf_counter() - t0) * 1e3
        total = args.frames or batch * (32 if device.type == "cuda" else 4)
        feats = features.repeat(total // features.shape[0] + 1, 1, 1, 1)[:total]
        ids = pipeline.avatar.frames_for(0, 0, total)
        await scheduler.render(feats[:batch], ids[:batch], args.quality)  # warm-up at this shape
        t0 = time.perf_counter()
        _, stages = await scheduler.render(feats, ids, args.quality)
        wall = time.perf_counter() - t0
        await scheduler.stop()
        rows.append({"batch": batch, "frames": total, "fps": round(total / wall, 2),
                     "ms_per_frame": {k: round(v / total, 3) for k, v in stages.items() if k in STAGES} |
                     {"total": round(wall * 1e3 / total, 3)},
                     "composite_ops_per_frame": composite_ops_per_frame(pipeline, batch)})
        print(f"batch {batch:3d}: {total / wall:8.2f} frames/s", flush=True)
    return rows, audio_ms


def composite_ops_per_frame(pipeline, batch: int) -> float:
    """Tensor operations per frame of compositing one batch, untimed: on a GPU each is a kernel launch its Python
    thread pays for, so what stays as the batch grows is per-frame host work. (torchvision's JPEG encoder is not
    seen by the count: one call per batch on CUDA, one per frame on the CPU.)"""
    ids = pipeline.avatar.frames_for(0, 0, batch)
    side = pipeline.avatar.size
    predictions = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(pipeline.device)
    with TensorOps() as ops:
        pipeline.compose(predictions, ids)
    return round(ops.count / batch, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", choices=["auto", "eager", "compile", "onnxruntime",
                                                                  "openvino", "tensorrt"])
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

    rows, audio_ms = asyncio.run(run(pipeline, seeded_audio(device), batches, args, device))
    write({"benchmark": "pipeline", "environment": environment(device),
           "engine": {"backend": pipeline.generator.backend, "precision": pipeline.generator.precision},
           "output": f"{args.width}x{args.height} JPEG q{args.quality}",
           "audio_features_ms_per_4s_utterance": round(audio_ms, 2),
           "note": "seeded untrained weights; speed does not depend on the weights", "results": rows}, args.out)


if __name__ == "__main__":
    main()
