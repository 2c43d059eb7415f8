"""Engine latency and throughput: generator + audio encoder per backend × batch size × precision.

    python benchmarks/bench_engines.py --device cpu \
        --backends eager-nchw:fp32,eager:fp32,eager:bf16,onnxruntime:fp32,openvino:fp32,openvino:bf16,compile:fp32 \
        --batches 1,2,4 --repeats 5 --out benchmarks/results/engines-cpu.json
    python benchmarks/bench_engines.py --device cpu --backends openvino:fp32,openvino:int8 --batches 1,2,4 \
        --repeats 5 --out benchmarks/results/engines-cpu-int8.json   # int8: NNCF, calibrated on the seeded probe
    python benchmarks/bench_engines.py --device cuda --backends eager,compile,compile+cudagraphs,tensorrt \
        --precisions fp16
    … --profile out/trace   # torch.profiler trace (open in Perfetto / chrome://tracing)

Writes JSON and, next to it, a PNG plot of frames/s against batch size.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import environment, figure, save_figure, sync, write

from lipsync.model.engines import EngineConfig, EngineError, build_engine
from lipsync.model.networks import AudioEncoder, Generator
from lipsync.model.pipeline import pick_device


def time_engine(fn, inputs, device, repeats: int) -> float:
    fn(*inputs)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(*inputs)
    sync(device)
    return (time.perf_counter() - t0) / repeats * 1e3


def plot(rows: list[dict], path: Path) -> None:
    fig, (ax,) = figure()
    for label in sorted({r["engine"] for r in rows}):
        pts = [(r["batch"], r["fps"]) for r in rows if r["engine"] == label]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xlabel="batch size (frames)", ylabel="frames/s (generator + audio encoder)",
           title=f"lipsync engines on {rows[0]['device']}")
    save_figure(fig, [ax], path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backends", default="eager", help="comma list of eager, compile, compile+cudagraphs, "
                                                            "tensorrt, onnxruntime, openvino, eager-nchw; "
                                                            "BACKEND:PRECISION "
                                                            "fixes the precision of one entry")
    parser.add_argument("--precisions", default="auto")
    parser.add_argument("--batches", default="1,8,24,32")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per point (default 3 CPU, 50 CUDA)")
    parser.add_argument("--profile", help="write a torch.profiler trace of the largest batch here")
    parser.add_argument("--out")
    args = parser.parse_args()

    device = pick_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    repeats = args.repeats or (50 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    rows = []
    plan = [(b.split(":")[0], [b.split(":")[1]] if ":" in b else args.precisions.split(","))
            for b in args.backends.split(",")]
    for backend, precisions in plan:
        for precision in precisions:
            settings = {"backend": backend.split("+")[0].replace("-nchw", ""), "precision": precision,
                        "batch_buckets": batches, "max_batch": max(batches), "opt_batch": min(24, max(batches)),
                        "cuda_graphs": backend.endswith("+cudagraphs"), "cache_dir": "out/engine_cache"}
            if backend.endswith("-nchw"):
                settings["channels_last"] = False
            try:
                config = EngineConfig.from_dict(settings)
                torch.manual_seed(0)  # the same weights for every backend: exports are cached by {"seed": 0}
                gen = build_engine(Generator("328").eval(), [(6, 320, 320), (32, 16, 16)], config, device,
                                   "generator", {"seed": 0}, progress=True)
                torch.manual_seed(0)
                enc_config = EngineConfig.from_dict({**settings, "precision": "fp32"}) if precision == "int8" \
                    else config  # as in the pipeline: the audio encoder is never quantized
                enc = build_engine(AudioEncoder().eval(), [(1, 80, 16)], enc_config, device, "audio_encoder",
                                   {"seed": 0}, progress=True)
            except (EngineError, ImportError, RuntimeError) as exc:
                print(f"{backend}/{precision}: skipped ({exc})", flush=True)
                rows.append({"engine": f"{backend} {precision}", "skipped": str(exc)})
                continue
            label = f"{backend} {gen.precision}"
            for batch in batches:
                visual = torch.rand(batch, 6, 320, 320, device=device)
                feats = torch.rand(batch, 32, 16, 16, device=device)
                mel = torch.rand(batch, 1, 80, 16, device=device)
                gen_ms = time_engine(gen, (visual, feats), device, repeats)
                enc_ms = time_engine(enc, (mel,), device, repeats)
                rows.append({"engine": label, "device": str(device), "batch": batch,
                             "generator_ms": round(gen_ms, 3), "encoder_ms": round(enc_ms, 3),
                             "latency_ms": round(gen_ms + enc_ms, 3),
                             "fps": round(batch / (gen_ms + enc_ms) * 1e3, 2),
                             "max_error_vs_fp32": gen.max_error, "psnr_db_vs_fp32": round(gen.psnr_db, 2),
                             "mouth_psnr_db_vs_fp32": round(gen.mouth_psnr_db, 2)})
                print(f"{label:24s} batch {batch:3d}: {gen_ms + enc_ms:9.2f} ms  {rows[-1]['fps']:9.2f} frames/s",
                      flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    gen(visual, feats)
                    sync(device)
                trace = Path(args.profile) / f"{backend}-{gen.precision}-b{batches[-1]}.json"
                trace.parent.mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(trace))
                print(f"trace: {trace}")
    write({"benchmark": "engines", "environment": environment(device), "repeats": repeats, "results": rows},
          args.out)
    measured = [r for r in rows if "fps" in r]
    if args.out and measured:
        plot(measured, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
