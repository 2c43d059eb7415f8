"""Demo and test assets.

- `ensure_demo_model`: the demo model's files — the trained demo presenter's weights ship in assets/demo_model;
  its avatar (lipsync.presenter) is drawn on first use.
- `make_avatar` / `make_weights`: a small cartoon avatar and seeded, untrained weights, for tests and benchmarks
  that need a model fast and do not look at what its mouth does.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from lipsync.codec.image_kernels import write_jpeg
from lipsync.model.networks import AudioEncoder, Generator


def _draw_frame(i: int, frames: int, width: int, height: int) -> tuple[np.ndarray, list[int]]:
    """A cartoon head that bobs gently; returns the RGB image [H,W,3] and its mouth crop square."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 40 + 60 * yy / height
    img[..., 1] = 60 + 40 * xx / width
    img[..., 2] = 110
    phase = 2 * math.pi * i / max(frames, 1)
    cx, cy = width / 2 + 0.02 * width * math.sin(phase), height / 2 + 0.015 * height * math.cos(phase)
    rx, ry = 0.17 * height, 0.24 * height
    head = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    img[head] = (224, 180, 150)
    for ex in (cx - 0.4 * rx, cx + 0.4 * rx):
        eye = ((xx - ex) / (0.12 * rx)) ** 2 + ((yy - (cy - 0.25 * ry)) / (0.07 * ry)) ** 2 <= 1
        img[eye] = (40, 30, 30)
    mouth = ((xx - cx) / (0.35 * rx)) ** 2 + ((yy - (cy + 0.45 * ry)) / (0.08 * ry)) ** 2 <= 1
    img[mouth] = (150, 60, 70)
    side = int(1.1 * rx)
    x1, y1 = int(cx - side / 2), int(cy + 0.05 * ry)
    return img.clip(0, 255).astype(np.uint8), [x1, y1, x1 + side, y1 + side]


def make_avatar(out_dir: str | Path, frames: int = 24, width: int = 640, height: int = 360,
                layout: str = "avatar") -> Path:
    """Write a synthetic avatar: `avatar` layout (frame_%04d.jpg + crop_rects.json) or `synctalk`
    (full_body_img/N.jpg + landmarks/N.lms)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rects = []
    for i in range(frames):
        img, rect = _draw_frame(i, frames, width, height)
        tensor = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        if layout == "synctalk":
            (out / "full_body_img").mkdir(exist_ok=True)
            (out / "landmarks").mkdir(exist_ok=True)
            write_jpeg(tensor, out / "full_body_img" / f"{i}.jpg", quality=95)
            (out / "landmarks" / f"{i}.lms").write_text(_landmarks(rect))
        else:
            write_jpeg(tensor, out / f"frame_{i:04d}.jpg", quality=95)
        rects.append(rect)
    if layout != "synctalk":
        (out / "crop_rects.json").write_text(json.dumps(rects))
    return out


def _landmarks(rect: list[int]) -> str:
    """110 'x y' lines whose points 1, 31 and 52 give `rect` by SPEC §7.1 (others spread on the face)."""
    x1, y1, x2, _ = rect
    pts = [(x1 + (x2 - x1) * k / 109 + 0.25, y1 - 20 + (k % 17) + 0.5) for k in range(110)]
    pts[1] = (x1 + 0.7, pts[1][1])
    pts[31] = (x2 + 0.2, pts[31][1])
    pts[52] = (pts[52][0], y1 + 0.9)
    return "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts) + "\n"


def make_weights(out_dir: str | Path, variant: str = "328", seed: int = 0) -> tuple[Path, Path]:
    """Seeded, untrained generator and audio-encoder checkpoints (encoder keys without the prefix, as
    SyncTalk_2D's audio_visual_encoder.pth stores them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator, encoder = Generator(variant), AudioEncoder()
    gen_path, enc_path = out / f"generator_{variant}.pth", out / "audio_visual_encoder.pth"
    torch.save(generator.state_dict(), gen_path)
    torch.save({k.removeprefix("audio_encoder."): v for k, v in encoder.state_dict().items()}, enc_path)
    return gen_path, enc_path


def ensure_demo_model(checkpoint: Path, audio_encoder: Path, avatar: Path) -> None:
    """The demo model's files: its shipped weights must be there; its avatar is drawn when missing (written
    beside and renamed into place, so concurrent workers never see half an avatar)."""
    for role, path in (("checkpoint", checkpoint), ("audio encoder", audio_encoder)):
        if not path.is_file():
            raise FileNotFoundError(f"the demo model's {role} is missing: {path} (it ships in the source tree's "
                                    "assets/demo_model; `make demo-model` trains it again)")
    if (avatar / "crop_rects.json").is_file():
        return
    from lipsync.model import presenter

    partial = avatar.with_name(f"{avatar.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    presenter.write_avatar(partial)
    try:
        partial.rename(avatar)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
