"""`lipsync` command line: render, export, serve, client, cluster, avatar, bench (SPEC §12)."""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import time
from pathlib import Path

from lipsync import logs
from lipsync.apps.options import COMMANDS, DefaultsFormatter, add_connection_options, command_parser

log = logging.getLogger("lipsync")


# --------------------------------------------------------------------------- render
def add_model_options(p: argparse.ArgumentParser) -> None:
    """The flags that name a model (`render`, `tune`): a declared one, or its files and options."""
    p.add_argument("--model", help="a model declared in conf/models/NAME.yaml (e.g. demo): its files and options "
                   "(variant, sequence, feather, compose; the demo's avatar is drawn on first use); flags given "
                   "override them")
    p.add_argument("--checkpoint", help="generator checkpoint (.pth); required without --model")
    p.add_argument("--audio-encoder", help="audio encoder checkpoint (audio_visual_encoder.pth); required without "
                   "--model")
    p.add_argument("--avatar", help="avatar directory or SyncTalk_2D dataset directory; required without --model")
    p.add_argument("--variant", default=None, choices=["328", "160"], help="generator variant; with --model, the "
                   "model's (default: 328)")
    p.add_argument("--asr", default="ave", choices=["ave"], help="audio branch of the generator")
    p.add_argument("--sequence", default=None, choices=["pingpong", "loop"],
                   help="avatar frame order; with --model, the model's (default: pingpong)")
    p.add_argument("--feather", type=int, default=None, help="feather the pasted square over N template pixels "
                   "(0 = SyncTalk_2D's hard paste); with --model, the model's (default: 0)")
    p.add_argument("--compose", default=None, choices=["paste", "blend"], help="paste: SyncTalk_2D's exact paste "
                   "(with --feather); blend: a soft mask that keeps the square's outer pixels from the frame and "
                   "blends the generator in, hiding the square's outline; with --model, the model's (default: paste)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--engine-file", help="prebuilt TensorRT generator from `lipsync export --format tensorrt`")


def add_render(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "render")
    add_model_options(p)
    p.add_argument("--audio", required=True, help="speech: WAV (16-bit PCM or float) or any audio file PyAV "
                                                  "decodes (mp3, ogg, m4a, flac …)")
    p.add_argument("--start-frame", type=int, default=0, help="avatar position of output frame 0 (1 = SyncTalk_2D)")
    p.add_argument("--out", help="MP4 to write (H.264 + the speech as AAC)")
    p.add_argument("--frames-out", help="directory for numbered frames 000000.png, …")
    p.add_argument("--format", default="png", choices=["png", "jpeg"], help="frame format for --frames-out")
    p.add_argument("--quality", type=int, default=None, help="JPEG quality for --format jpeg (default: config)")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "eager", "compile", "onnxruntime", "openvino", "tensorrt"],
                   help="auto measures the engines on this machine once per model (cached); name one to skip that")
    p.add_argument("--max-audio-seconds", type=float, default=3600.0,
                   help="refuse longer audio (decoding stops there)")
    p.add_argument("overrides", nargs="*", help="hydra overrides of conf/render.yaml, e.g. engine.max_batch=8")
    p.set_defaults(func=run_render)


def render_model(args: argparse.Namespace) -> dict:
    """The model to render: a declared one (`--model`, conf/models/NAME.yaml) with the flags given on top, or the
    flags alone. A declared demo model gets its avatar drawn here when it is missing, as `serve` would."""
    from omegaconf import OmegaConf

    from lipsync.config import load_config

    declared: dict = {}
    if args.model:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", args.model):  # a file name in conf/models/, never override syntax
            raise SystemExit(f"render: --model {args.model!r}: must name a file conf/models/NAME.yaml (letters, "
                             "digits, _ and -)")
        models = OmegaConf.to_container(load_config([f"+models={args.model}"], "render").models)
        if args.model not in models:
            raise SystemExit(f"render: conf/models/{args.model}.yaml declares {sorted(models)}, not {args.model!r}")
        declared = models[args.model]
    flags = {"checkpoint": args.checkpoint, "audio_encoder": args.audio_encoder, "avatar": args.avatar,
             "variant": args.variant, "asr": args.asr, "sequence": args.sequence, "feather": args.feather,
             "compose": args.compose, "engine_file": args.engine_file}
    model = {**{"variant": "328", "sequence": "pingpong", "feather": 0, "compose": "paste"}, **declared,
             **{k: v for k, v in flags.items() if v is not None}}
    missing = [f"--{k.replace('_', '-')}" for k in ("checkpoint", "audio_encoder", "avatar") if not model.get(k)]
    if missing:
        raise SystemExit(f"render: give --model NAME (see conf/models/) or {', '.join(missing)}")
    if model.get("synthetic"):
        from lipsync.model.demo import ensure_demo_model
        ensure_demo_model(Path(model["checkpoint"]), Path(model["audio_encoder"]), Path(model["avatar"]))
    return model  # ModelSpec.from_dict takes the serving keys (pinned, preload, device, synthetic) and ignores them


def run_render(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from lipsync.codec.audio import load_audio
    from lipsync.codec.jpeg import encode_frames
    from lipsync.codec.video import Mp4Writer
    from lipsync.config import load_config
    from lipsync.model.engines import EngineConfig
    from lipsync.model.pipeline import ModelSpec, PipelineConfig, load_pipeline, micro_batch_setting, pick_device
    from lipsync.runtime.render import render_wave
    from lipsync.runtime.scheduler import DeviceWorkers, ModelScheduler

    if not args.out and not args.frames_out:
        raise SystemExit("render: give --out FILE.mp4 and/or --frames-out DIR")
    cfg = load_config([f"engine={args.backend}", *args.overrides], "render")
    device = pick_device(args.device)
    wave = load_audio(args.audio, max_seconds=args.max_audio_seconds)  # checked before the (slow) model load
    spec = ModelSpec.from_dict(args.model or "render", render_model(args))
    engine_cfg, pipeline_cfg = EngineConfig.from_dict(cfg.engine), PipelineConfig.from_dict(cfg.pipeline)
    quality = args.quality if args.quality is not None else pipeline_cfg.jpeg_quality
    pipeline = load_pipeline(spec, engine_cfg, device, micro_batch_setting(pipeline_cfg, engine_cfg, device.type),
                             progress=True)
    frames_dir = Path(args.frames_out).expanduser().resolve() if args.frames_out else None
    if frames_dir:
        frames_dir.mkdir(parents=True, exist_ok=True)
    height, width = pipeline.avatar.frames.shape[2:]
    writer = Mp4Writer(args.out, width, height, with_audio=True, crf=int(cfg.video.crf),
                        preset=str(cfg.video.preset)) if args.out else None
    jpeg_only = frames_dir is not None and args.format == "jpeg" and writer is None
    bar = tqdm(desc="rendering", unit="frame")

    def write(first: int, ids: list[int], outputs: list) -> None:
        import torch

        from lipsync.codec.image_kernels import write_png
        if jpeg_only:
            for k, data in enumerate(outputs):
                (frames_dir / f"{first + k:06d}.jpg").write_bytes(data)
        else:
            frames = torch.stack(outputs)
            if frames_dir and args.format == "jpeg":
                for k, data in enumerate(encode_frames(frames, quality)):
                    (frames_dir / f"{first + k:06d}.jpg").write_bytes(data)
            elif frames_dir:
                for k, frame in enumerate(frames):
                    write_png(frame, str(frames_dir / f"{first + k:06d}.png"))
            if writer:
                writer.write(frames)
        bar.update(len(outputs))

    async def main() -> dict[str, float]:
        scheduler = ModelScheduler(pipeline, DeviceWorkers(), max_batch=pipeline.micro_batch, max_delay_ms=0)
        scheduler.start()
        try:
            return await render_wave(scheduler, wave, args.start_frame, quality if jpeg_only else None, write)
        finally:
            await scheduler.stop()
    t0 = time.perf_counter()
    timings = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    bar.close()
    if writer:
        writer.close(wave)
    total = bar.n
    print(f"rendered {total} frames in {elapsed:.2f} s ({total / elapsed:.1f} frames/s) on {device}; "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items()))
    if writer:
        print(f"video: {writer.path}")
    if frames_dir:
        print(f"frames: {frames_dir}")
    return 0


# --------------------------------------------------------------------------- tune
def add_tune(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "tune")
    add_model_options(p)
    p.add_argument("overrides", nargs="*", help="hydra overrides of conf/render.yaml, e.g. engine.tune_seconds=3")
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    """Measure the engine candidates for a model on this machine again (a quiet machine gives the decision every
    later load reads), whatever was cached; print the decision."""
    import json

    from lipsync.config import load_config
    from lipsync.model.engines import EngineConfig
    from lipsync.model.pipeline import ModelSpec, PipelineConfig, load_pipeline, micro_batch_setting, pick_device

    cfg = load_config(["engine=auto", *args.overrides, "engine.retune=true"], "render")
    device = pick_device(args.device)
    spec = ModelSpec.from_dict(args.model or "model", render_model(args))
    engine_cfg, pipeline_cfg = EngineConfig.from_dict(cfg.engine), PipelineConfig.from_dict(cfg.pipeline)
    pipeline = load_pipeline(spec, engine_cfg, device, micro_batch_setting(pipeline_cfg, engine_cfg, device.type),
                             progress=True)
    decision = pipeline.decision
    print(json.dumps({"model": spec.name, "device": str(device),
                      "engine": f"{pipeline.generator.backend}/{pipeline.generator.precision}",
                      "batch": pipeline.micro_batch,
                      "generator_frames_per_s": decision.frames_per_s if decision else None,
                      "machine_load": decision.machine_load if decision else None,
                      "provisional": decision.provisional if decision else None}))
    return 0


# --------------------------------------------------------------------------- avatar
def add_avatar(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "avatar")
    asub = p.add_subparsers(dest="avatar_cmd", required=True)
    info = asub.add_parser("info", help="validate an avatar or SyncTalk_2D dataset and describe it")
    info.add_argument("path")
    imp = asub.add_parser("import", help="convert a SyncTalk_2D dataset into an avatar directory")
    imp.add_argument("dataset")
    imp.add_argument("out")
    synth = asub.add_parser("synth", help="write a synthetic avatar (for tests and the demo)",
                            formatter_class=DefaultsFormatter)
    synth.add_argument("out")
    synth.add_argument("--frames", type=int, default=24)
    synth.add_argument("--width", type=int, default=640)
    synth.add_argument("--height", type=int, default=360)
    synth.add_argument("--layout", default="avatar", choices=["avatar", "synctalk"])
    p.set_defaults(func=run_avatar)


def run_avatar(args: argparse.Namespace) -> int:
    import json
    import shutil

    from tqdm import tqdm

    from lipsync.model.avatar import find_source, load_avatar
    from lipsync.model.demo import make_avatar

    if args.avatar_cmd == "synth":
        print(make_avatar(args.out, args.frames, args.width, args.height, args.layout))
        return 0
    if args.avatar_cmd == "info":
        avatar = load_avatar(args.path, progress=True)
        sizes = {(r[2] - r[0], r[3] - r[1]) for r in avatar.rects}
        print(json.dumps({"path": str(Path(args.path).resolve()), "frames": avatar.frame_count,
                          "width": avatar.frames.shape[3], "height": avatar.frames.shape[2],
                          "crop_sizes": sorted(sizes)[:10], "alpha": avatar.alpha is not None}, indent=2))
        return 0
    source = find_source(args.dataset)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    assert source.images is not None
    for i, img in enumerate(tqdm(source.images, desc="importing", unit="frame")):
        shutil.copyfile(img, out / f"frame_{i:06d}{img.suffix.lower()}")
    (out / "crop_rects.json").write_text(json.dumps(source.rects))
    print(f"avatar written to {out} ({len(source.images)} frames)")
    return 0


# --------------------------------------------------------------------------- bench
BENCHMARKS = ("pipeline", "engines", "server", "live")


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "bench")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of benchmarks/bench_NAME.py (see its --help)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import runpy

    from lipsync.config import SOURCE_ROOT

    script = SOURCE_ROOT / "benchmarks" / f"bench_{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"benchmark script not found: {script} (benchmarks/ ships with the source tree)")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


# --------------------------------------------------------------------------- web
def add_web(sub: argparse._SubParsersAction) -> None:
    p = command_parser(sub, "web")
    add_connection_options(p)
    p.add_argument("--host", help="address the page listens on (default: web.host of conf/web.yaml, 127.0.0.1)")
    p.add_argument("--port", type=int, help="the page's port (default: web.port of conf/web.yaml, 8080; 0 = any)")
    p.add_argument("overrides", nargs="*", help="hydra overrides of conf/web.yaml, e.g. web.gate_threshold_dbfs=-50")
    p.set_defaults(func=run_web)


def run_web(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from lipsync.apps.client import credentials_from_args
    from lipsync.config import load_config
    try:
        from lipsync.apps.web.bridge import serve
        from lipsync.apps.web.config import WebConfig
    except ImportError as exc:
        print(f"lipsync web: error: {exc.name or exc} is not installed; pip install -e '.[web]' (from a checkout)",
              file=sys.stderr)
        return 2
    overrides = list(args.overrides)
    overrides += [f"web.host={args.host}"] if args.host else []
    overrides += [f"web.port={args.port}"] if args.port is not None else []
    config = WebConfig.from_dict(load_config(overrides, name="web").web)

    async def main() -> None:
        task = asyncio.ensure_future(serve(args.server, config, credentials_from_args(args)))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
    asyncio.run(main())
    return 0


# --------------------------------------------------------------------------- entry point
def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option or its value)."""
    words = iter(argv)
    for word in words:
        if word in ("--log-level", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    import os
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC core's own log lines would interleave with ours; every
    #                                                 failure it reports reaches us as an exception or status
    parser = argparse.ArgumentParser(prog="lipsync", description="Speech audio → lip-synced talking-head frames.",
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("--log-level", default="INFO", help="lipsync's own log lines from this level (other "
                        "libraries' from WARNING); `serve` takes logging.level from its config")
    parser.add_argument("--log-format", default="text", choices=logs.FORMATS,
                        help="text: one human line per event; json: one JSON object per line (for log collectors)")
    from lipsync import __version__
    parser.add_argument("--version", action="version", version=f"lipsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = _chosen_command(sys.argv[1:] if argv is None else argv)
    for name, (module, function, summary) in COMMANDS.items():
        if name == chosen:  # only the command that runs is imported (its parser and its work)
            getattr(importlib.import_module(module), function)(sub)
        else:
            sub.add_parser(name, help=summary)
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        from lipsync.codec.audio import AudioFormatError, AudioTooLong
        from lipsync.config import ConfigError
        from lipsync.model.avatar import AvatarError
        from lipsync.model.engines import EngineError
        from lipsync.model.networks import CheckpointError
        from lipsync.model.pipeline import ModelFileError
        if isinstance(exc, (AudioFormatError, AudioTooLong, AvatarError, CheckpointError, EngineError,
                            FileNotFoundError, ModelFileError, ConfigError)):
            print(f"lipsync {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


def run() -> None:
    """The process entry point (`lipsync`, `python -m lipsync`): `main`, then exit without Python's last full
    garbage collection. That collection walks every object torch's import made (~0.5 s of a `lipsync render` on 2
    cores, after its video is already closed); the objects are still freed when the interpreter tears down."""
    import gc
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
