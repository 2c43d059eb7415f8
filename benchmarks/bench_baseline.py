"""`lipsync render` against SyncTalk_2D's own inference loop, on the same input, in one run, **both timed as whole
processes**: from starting the process to the finished video file (imports, loading, every frame, the file).

The baseline is inference_328.py's algorithm written from its documented behaviour, run as its own process
(`--baseline-child`): audio features computed up front (AudioEncoder, eager fp32), then per output frame: read the
frame image and its landmarks from the dataset directory, crop the landmark square, resize it to 328 (INTER_CUBIC),
take the 320 ROI and a copy with the mouth rectangle blacked out, run the generator eagerly at batch 1 in NCHW fp32,
write the 8-bit prediction back into the 328 crop, resize it to the rect and paste it into the frame, and append the
frame to an MJPG video (cv2). Frames follow its ping-pong order (`--start-frame 1` in lipsync). Its time ends when
the video is released; the pasted squares it then saves for the comparison are not counted.

`lipsync render` runs with default settings (engine and micro-batch chosen by measurement, the decision cached from
an earlier run) into an MP4, timed until the process exits; its own summary line gives the render loop alone. The
two run in turn `--pairs` times (3) and the pair with the median speedup is reported beside every pair's (a shared
machine drifts between minutes). A first, untimed render writes PNG frames whose mouth squares are compared with
the baseline's (PSNR). Same seeded weights, synthetic SyncTalk_2D-layout avatar and speech each run.

    python benchmarks/bench_baseline.py --out benchmarks/results/baseline-cpu.json
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
import wave
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import CACHE, environment, write  # noqa: E402
from lipsync.codec import audio
from lipsync.model import audio_features
from lipsync.model.autotune import cpu_name  # noqa: E402
from lipsync.model.demo import make_avatar, make_weights  # noqa: E402
from lipsync.model.networks import load_audio_encoder, load_generator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prepare(width: int, height: int, frames: int, seconds: float) -> dict[str, Path]:
    """Seeded weights, a SyncTalk_2D dataset directory and `seconds` of speech (assets/speech.wav repeated)."""
    root = CACHE / f"baseline-{width}x{height}x{frames}"
    dataset = root / "dataset"
    if not (dataset / "landmarks" / f"{frames - 1}.lms").is_file():
        make_avatar(dataset, frames, width, height, layout="synctalk")
    if not (root / "generator_328.pth").is_file():
        make_weights(root, "328", seed=0)
    speech = root / f"speech-{seconds:g}s.wav"
    if not speech.is_file():
        wave16k = audio.load_audio(ROOT / "assets" / "speech.wav")
        total = int(seconds * 16000)
        tiled = wave16k.repeat(math.ceil(total / wave16k.numel()))[:total]
        with wave.open(str(speech), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(16000)
            out.writeframes((tiled.clamp(-1, 1) * 32767).round().short().numpy().tobytes())
    return {"checkpoint": root / "generator_328.pth", "audio_encoder": root / "audio_visual_encoder.pth",
            "dataset": dataset, "speech": speech, "root": root}


def crop_rect(lms_file: Path) -> tuple[int, int, int, int]:
    points = np.loadtxt(lms_file, dtype=np.float32).astype(np.int32)  # float → int by truncation
    x1, y1, x2 = int(points[1][0]), int(points[52][1]), int(points[31][0])
    return x1, y1, x2, y1 + (x2 - x1)


def baseline(files: dict[str, Path], video_path: Path) -> tuple[float, int, list[np.ndarray], list[tuple]]:
    """The original loop. Returns (seconds, frames, the pasted mouth squares (BGR), their rects)."""
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    encoder = load_audio_encoder(files["audio_encoder"])
    net = load_generator(files["checkpoint"]).eval()
    features = audio_features.frame_features(audio.load_audio(files["speech"]), encoder).numpy()
    images = sorted((files["dataset"] / "full_body_img").glob("*.jpg"), key=lambda p: int(p.stem))
    last = len(images) - 1
    first = cv2.imread(str(images[0]))
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"MJPG"), 25, first.shape[1::-1])
    squares, rects = [], []
    index, stride = 0, 1
    for i in range(features.shape[0]):
        if index > last - 1:
            stride = -1
        if index < 1:
            stride = 1
        index += stride
        img = cv2.imread(str(files["dataset"] / "full_body_img" / f"{index}.jpg"))
        x1, y1, x2, y2 = crop_rect(files["dataset"] / "landmarks" / f"{index}.lms")
        crop = img[y1:y2, x1:x2]
        h, w = crop.shape[:2]
        crop = cv2.resize(crop, (328, 328), interpolation=cv2.INTER_CUBIC)
        template = crop.copy()
        roi = crop[4:324, 4:324].copy()
        masked = cv2.rectangle(roi.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
        visual = np.concatenate([roi.transpose(2, 0, 1), masked.transpose(2, 0, 1)]).astype(np.float32) / 255.0
        pred = net(torch.from_numpy(visual)[None], torch.from_numpy(features[i])[None])[0]
        template[4:324, 4:324] = (pred.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        img[y1:y2, x1:x2] = cv2.resize(template, (w, h), interpolation=cv2.INTER_CUBIC)
        writer.write(img)
        squares.append(img[y1:y2, x1:x2].copy())
        rects.append((x1, y1, x2, y2))
    writer.release()
    print(f"released_at={time.time():.6f}", flush=True)
    return time.perf_counter() - started, features.shape[0], squares, rects


def baseline_process(files: dict[str, Path], video: Path) -> tuple[float, int, list[np.ndarray], list[tuple]]:
    """The baseline in a process of its own; returns (seconds from its start to the released video, frames, the
    pasted squares, their rects)."""
    squares_file = video.with_suffix(".npz")
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--baseline-child", str(files["root"]), str(video)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"baseline failed:\n{done.stdout}\n{done.stderr}")
    released_at = float(re.search(r"released_at=([\d.]+)", done.stdout).group(1))
    saved = np.load(squares_file, allow_pickle=True)
    return released_at - started, int(saved["frames"]), list(saved["squares"]), [tuple(r) for r in saved["rects"]]


def render(files: dict[str, Path], extra: list[str]) -> tuple[float, float, str]:
    """`lipsync render` in its own process with default settings; returns (frames/s of the whole process, frames/s
    of its render loop as it reports them, its output)."""
    command = [sys.executable, "-m", "lipsync", "render", "--checkpoint", str(files["checkpoint"]),
               "--audio-encoder", str(files["audio_encoder"]), "--avatar", str(files["dataset"]),
               "--audio", str(files["speech"]), "--start-frame", "1", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    whole_s = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"render failed:\n{done.stdout}\n{done.stderr}")
    match = re.search(r"rendered (\d+) frames in ([\d.]+) s \(([\d.]+) frames/s\)", done.stdout)
    return int(match.group(1)) / whole_s, float(match.group(3)), done.stdout + done.stderr


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--avatar-frames", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pairs", type=int, default=3, help="baseline/render pairs, run in turn (the median "
                        "speedup is reported)")
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--baseline-child", nargs=2, metavar=("ROOT", "VIDEO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        root, video = map(Path, args.baseline_child)
        files = {"checkpoint": root / "generator_328.pth", "audio_encoder": root / "audio_visual_encoder.pth",
                 "dataset": root / "dataset", "speech": root / f"speech-{args.seconds:g}s.wav", "root": root}
        _, frames, squares, rects = baseline(files, video)
        np.savez(video.with_suffix(".npz"), frames=frames, squares=np.array(squares, dtype=object),
                 rects=np.array(rects))
        return
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: at least 1")
    files = prepare(args.width, args.height, args.avatar_frames, args.seconds)
    work = files["root"]
    png_dir = work / "render-png"
    print("lipsync render into PNG frames (untimed: the frames to compare; it measures the engine on a new "
          "machine) ...", file=sys.stderr)
    render(files, ["--frames-out", str(png_dir), "--format", "png"])
    # Pairs, the two processes in turn: a shared machine's speed drifts by ±10-20 % between minutes, so each pair
    # gives a ratio and the median ratio is the figure
    pairs = []
    for k in range(args.pairs):
        print(f"pair {k + 1}/{args.pairs}: baseline (SyncTalk_2D inference_328.py algorithm), a whole process ...",
              file=sys.stderr)
        base_s, frames, squares, rects = baseline_process(files, work / "baseline.avi")
        base_fps = frames / base_s
        print(f"baseline: {frames} frames in {base_s:.1f} s ({base_fps:.2f} frames/s); lipsync render (default "
              "settings), a whole process ...", file=sys.stderr)
        render_fps, loop_fps, log = render(files, ["--out", str(work / "render.mp4")])
        print(f"lipsync render: {render_fps:.2f} frames/s whole process ({loop_fps:.2f} in its loop): "
              f"{render_fps / base_fps:.2f}x", file=sys.stderr)
        pairs.append({"baseline_frames_per_s": round(base_fps, 3), "render_frames_per_s": round(render_fps, 3),
                      "speedup": round(render_fps / base_fps, 2), "render_loop_frames_per_s": round(loop_fps, 3),
                      "render_summary": [line for line in log.splitlines() if line.startswith("rendered")]})
    middle = sorted(pairs, key=lambda pair: pair["speedup"])[len(pairs) // 2]
    values = []
    for i, (square, (x1, y1, x2, y2)) in enumerate(zip(squares, rects)):
        frame = cv2.imread(str(png_dir / f"{i:06d}.png"))
        values.append(psnr(frame[y1:y2, x1:x2], square))
    engine = re.findall(r"render/generator: (chose .*|.*measured earlier on this machine.*)", log)
    write({"benchmark": "baseline", "environment": {**environment(torch.device("cpu")), "cpu": cpu_name()},
           "input": {"width": args.width, "height": args.height, "avatar_frames": args.avatar_frames,
                     "seconds": args.seconds, "frames": frames},
           "timed": "whole processes: start to finished video file, in pairs (baseline, then render); the figures "
                    "are the pair with the median speedup",
           "baseline_frames_per_s": middle["baseline_frames_per_s"],
           "render_frames_per_s": middle["render_frames_per_s"], "speedup": middle["speedup"],
           "render_loop_frames_per_s": middle["render_loop_frames_per_s"],
           "speedups": [pair["speedup"] for pair in pairs],
           "mouth_psnr_db": {"min": round(min(values), 2), "mean": round(float(np.mean(
               [v for v in values if math.isfinite(v)] or [float("inf")])), 2)},
           "engine": engine[-1].strip() if engine else None, "pairs": pairs}, args.out)


if __name__ == "__main__":
    main()
