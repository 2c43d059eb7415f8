"""`lipsync export`: checkpoint → ONNX or TensorRT, with a summary (size, input profile, precision, max error)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lipsync.apps.options import command_parser

    p = command_parser(sub, "export")
    p.add_argument("--checkpoint", required=True, help="generator checkpoint (.pth)")
    p.add_argument("--variant", default="328", choices=["328", "160"])
    p.add_argument("--format", required=True, choices=["onnx", "tensorrt"])
    p.add_argument("--out", required=True, help="output file (.onnx or .ep)")
    p.add_argument("--audio-encoder", help="also export this audio encoder checkpoint")
    p.add_argument("--audio-encoder-out", help="where to write the exported audio encoder")
    p.add_argument("--backend-config", default="tensorrt", help="engine config (conf/engine/NAME.yaml) for TensorRT")
    p.add_argument("overrides", nargs="*", help="hydra overrides for the engine, e.g. engine.max_batch=16")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from lipsync.model.networks import AUDIO_FEATURE_SHAPE, INPUT_SIZE, load_audio_encoder, load_generator

    if bool(args.audio_encoder) != bool(args.audio_encoder_out):
        raise SystemExit("export: --audio-encoder and --audio-encoder-out go together")
    size = INPUT_SIZE[args.variant]
    jobs = [("generator", load_generator(args.checkpoint, args.variant), Path(args.out),
             [(6, size, size), AUDIO_FEATURE_SHAPE["ave"]], ["input", "audio"])]
    if args.audio_encoder:
        jobs.append(("audio_encoder", load_audio_encoder(args.audio_encoder), Path(args.audio_encoder_out),
                     [(1, 80, 16)], ["mel_spectrogram"]))
    summary = []
    for name, net, out, shapes, names in tqdm(jobs, desc=f"exporting to {args.format}", unit="network"):
        t0 = time.perf_counter()
        if args.format == "onnx":
            from lipsync.apps.export.onnx_export import (
                OPSET,
                export_audio_encoder,
                export_generator,
                max_error_onnxruntime,
            )
            path = export_generator(net, out) if name == "generator" else export_audio_encoder(net, out)
            probe = {n: torch.rand(3, *s, generator=torch.Generator().manual_seed(0)) for n, s in zip(names, shapes)}
            error = max_error_onnxruntime(path, net, probe)
            profile, precision = f"dynamic batch (opset {OPSET})", "fp32"
        else:
            from lipsync.apps.export.tensorrt_export import export_tensorrt
            from lipsync.config import load_config
            from lipsync.model.engines import EngineConfig
            cfg = EngineConfig.from_dict(load_config([f"engine={args.backend_config}", *args.overrides],
                                                     "render").engine)
            path, error = export_tensorrt(net, shapes, cfg, out)
            profile = f"batch {cfg.min_batch}/{cfg.opt_batch}/{cfg.max_batch}"
            precision = "fp16" if cfg.precision == "auto" else cfg.precision
        summary.append({"network": name, "file": str(path.resolve()),
                        "size_mb": round(path.stat().st_size / 2**20, 2),
                        "inputs": {n: "[B," + ",".join(map(str, s)) + "]" for n, s in zip(names, shapes)},
                        "profile": profile, "precision": precision, "max_abs_error_vs_eager": error,
                        "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(summary, indent=2))
    return 0
