"""Shared benchmark plumbing: fixed synthetic inputs, environment facts, JSON output."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipsync.model.demo import make_avatar, make_weights  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / "out" / "bench_assets"


def assets(width: int = 1280, height: int = 720, frames: int = 24) -> dict[str, Path]:
    """Seeded weights and a synthetic avatar at the benchmark resolution (made once, then reused)."""
    root = CACHE / f"{width}x{height}x{frames}"
    if not (root / "avatar" / "crop_rects.json").is_file():
        make_avatar(root / "avatar", frames, width, height)
    if not (root / "generator_328.pth").is_file():
        make_weights(root, "328", seed=0)
    return {"checkpoint": root / "generator_328.pth", "audio_encoder": root / "audio_visual_encoder.pth",
            "avatar": root / "avatar"}


def environment(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path.resolve()}", file=sys.stderr)


def figure(columns: int = 1, size: tuple[float, float] = (7, 4.5)):
    """A matplotlib figure (headless backend) with `columns` axes side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=size, squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, axes, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)
