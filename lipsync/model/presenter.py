"""The demo presenter: a drawn face whose mouth follows speech, rendered procedurally at 1280×720.

Three things live here, because the demo model, its training data and its evaluation must agree on them:
- `mouth_track(wave)`: the oracle — per 40 ms video frame, the mouth's openness and width in [0, 1], a function of
  the speech at that moment (voicing level, the first-formant region's spectral centroid for the jaw, the
  second-formant region's for spread or rounded lips; fricatives and silence keep it nearly closed);
- `render(t, openness, width)`: frame t of the presenter (head motion and blinks are functions of t with period
  `POSE_PERIOD`, so frames t and t + k·POSE_PERIOD differ only in the mouth) and its SPEC §7.1 crop square;
- `mouth_openness(rgb)`: the openness read back from an image's crop square by the mouth's colours (dark interior,
  teeth), for measuring a model's output against the oracle's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 1280, 720
POSE_PERIOD = 150  # frames (6 s): head motion and blinks repeat exactly
from lipsync.timebase import SAMPLE_RATE  # SPEC §1: 640 samples a video frame
from lipsync.timebase import SAMPLES_PER_FRAME as HOP

SKIN = np.array([226, 182, 152], np.float32)
LIPS = np.array([176, 78, 88], np.float32)
INSIDE = np.array([58, 16, 28], np.float32)
TEETH = np.array([238, 236, 226], np.float32)
HAIR = np.array([62, 42, 34], np.float32)
SHIRT = np.array([46, 84, 128], np.float32)


# --------------------------------------------------------------------------- the oracle: speech → mouth
def _band_centroid(power: np.ndarray, freqs: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    band = (freqs >= lo) & (freqs < hi)
    energy = power[:, band].sum(1)
    return (power[:, band] * freqs[band]).sum(1) / np.maximum(energy, 1e-12), energy


def mouth_track(wave: np.ndarray, frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mono 16 kHz float speech → (openness, width) per video frame (frame i covers [640·i, 640·(i+1)))."""
    wave = np.asarray(wave, np.float64)
    count = frames if frames is not None else max(1, math.ceil(len(wave) / HOP))
    size = 2 * HOP  # 80 ms Hann window centred on each frame's middle
    padded = np.concatenate([np.zeros(size), wave, np.zeros(2 * size)])
    starts = np.arange(count) * HOP + HOP // 2 - size // 2 + size
    windows = np.stack([padded[s:s + size] for s in starts]) * np.hanning(size)
    power = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    freqs = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    level_db = 10 * np.log10(np.maximum(power.sum(1) / size, 1e-12))
    f1, low = _band_centroid(power, freqs, 250, 1000)
    f2, _ = _band_centroid(power, freqs, 1000, 3000)
    _, high = _band_centroid(power, freqs, 3500, 8000)
    voiced = np.clip((level_db + 52) / 22, 0, 1) * np.clip(1.5 * low / np.maximum(low + high, 1e-12) - 0.3, 0, 1)
    jaw = np.clip((f1 - 320) / 420, 0, 1)
    openness = voiced * (0.3 + 0.7 * jaw)
    width = 0.5 + voiced * (np.clip((f2 - 1300) / 900, 0, 1) - 0.5)  # spread (high F2) or rounded (low F2)
    kernel = np.array([0.25, 0.5, 0.25])  # the jaw does not jump within 40 ms
    smooth = [np.convolve(np.pad(x, 1, mode="edge"), kernel, mode="valid") for x in (openness, width)]
    return smooth[0].astype(np.float32), smooth[1].astype(np.float32)


# --------------------------------------------------------------------------- drawing
def pose(t: int) -> tuple[float, float, float]:
    """Head centre (x, y) and eyelid closure (0 open … 1 shut) of frame t; period POSE_PERIOD."""
    phase = 2 * math.pi * (t % POSE_PERIOD) / POSE_PERIOD
    cx = WIDTH / 2 + 16 * math.sin(2 * phase) + 5 * math.sin(5 * phase)
    cy = HEIGHT * 0.44 + 7 * math.sin(3 * phase + 1.0)
    blink = max(0.0, 1 - abs((t % POSE_PERIOD) - 70) / 3)
    return cx, cy, blink


def crop_rect(t: int) -> list[int]:
    """The SPEC §7.1 square around mouth and jaw for frame t."""
    cx, cy, _ = pose(t)
    side = int(1.55 * 150)
    x1, y1 = int(round(cx - side / 2)), int(round(cy + 0.06 * 195))
    return [x1, y1, x1 + side, y1 + side]


_BACKGROUND: np.ndarray | None = None


def _background() -> np.ndarray:
    global _BACKGROUND
    if _BACKGROUND is None:
        yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
        r = np.hypot((xx - WIDTH / 2) / WIDTH, (yy - HEIGHT / 2) / HEIGHT)
        top, bottom = np.array([70, 86, 110], np.float32), np.array([36, 44, 60], np.float32)
        img = top + (bottom - top) * (yy / HEIGHT)[..., None]
        _BACKGROUND = (img * (1 - 0.5 * r[..., None] ** 2)).astype(np.float32)
    return _BACKGROUND


def _ellipse(xx, yy, cx, cy, rx, ry) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2


_BASES: dict[int, np.ndarray] = {}  # frame t % POSE_PERIOD without its mouth


def _base(t: int) -> np.ndarray:
    """Everything but the mouth (uint8 RGB), cached per pose (a full period is ~0.4 GB; `forget_poses` frees it)."""
    key = t % POSE_PERIOD
    if key in _BASES:
        return _BASES[key]
    cx, cy, blink = pose(t)
    img = _background().copy()
    x0, x1, y0 = int(cx - 340), int(cx + 340), int(cy - 260)
    box = img[y0:, x0:x1]
    yy, xx = np.mgrid[y0:HEIGHT, x0:x1].astype(np.float32)
    rx, ry = 150.0, 195.0

    def paint(mask: np.ndarray, colour: np.ndarray, shade: np.ndarray | None = None) -> None:
        box[mask] = colour if shade is None else colour * shade[mask][..., None]

    paint(_ellipse(xx, yy, WIDTH / 2 + 0.3 * (cx - WIDTH / 2), HEIGHT + 60, 330, 230) <= 1, SHIRT)
    paint((np.abs(xx - cx) < 58) & (yy > cy + 120), SKIN * 0.82)
    paint(_ellipse(xx, yy, cx, cy - 30, rx + 14, ry + 8) <= 1, HAIR)
    for side in (-1, 1):
        paint(_ellipse(xx, yy, cx + side * rx * 0.97, cy + 5, 20, 36) <= 1, SKIN * 0.9)
    head = _ellipse(xx, yy, cx, cy, rx, ry)
    paint(head <= 1, SKIN, 1 - 0.16 * head)
    paint((_ellipse(xx, yy, cx, cy - 60, rx + 4, ry - 40) <= 1) & (yy < cy - 0.55 * ry + 0.25 * np.abs(xx - cx)),
          HAIR)
    for side in (-1, 1):  # eyes: white, iris, eyelid; brows
        ex, ey = cx + side * 0.38 * rx, cy - 0.18 * ry
        eye = _ellipse(xx, yy, ex, ey, 24, 13) <= 1
        paint(eye, np.array([245, 245, 240], np.float32))
        paint(eye & (_ellipse(xx, yy, ex, ey, 10, 10) <= 1), np.array([52, 78, 96], np.float32))
        paint(eye & (_ellipse(xx, yy, ex, ey, 4.5, 4.5) <= 1), np.array([15, 15, 18], np.float32))
        paint(eye & (yy < ey - 13 + 26 * blink), SKIN * 0.93)
        paint((_ellipse(xx, yy, ex, ey - 30, 30, 7) <= 1) & (yy < ey - 28), HAIR)
    paint(_ellipse(xx, yy, cx, cy + 0.16 * ry, 15, 30) <= 1, SKIN * 0.86)  # nose
    paint(_ellipse(xx, yy, cx, cy + 0.27 * ry, 20, 8) <= 1, SKIN * 0.8)
    _BASES[key] = img.clip(0, 255).astype(np.uint8)
    return _BASES[key]


def forget_poses() -> None:
    """Free the cached poses."""
    _BASES.clear()


def render(t: int, openness: float = 0.0, width: float = 0.5) -> np.ndarray:
    """Frame t of the presenter with the given mouth: RGB uint8 [720, 1280, 3]. The mouth: outer lips, dark
    inside, upper teeth once it opens; it narrows a little as the jaw drops."""
    cx, cy, _ = pose(t)
    img = _base(t).copy()
    mx, my = cx, cy + 0.50 * 195.0
    x0, y0 = int(mx - 80), int(my - 30)
    box = img[y0:y0 + 100, x0:x0 + 160]
    yy, xx = np.mgrid[y0:y0 + 100, x0:x0 + 160].astype(np.float32)
    half_w = 150.0 * (0.33 + 0.12 * (width - 0.5)) * (1 - 0.15 * openness)
    inside_h = 1.6 + 30 * openness
    centre = my + 0.3 * inside_h
    box[_ellipse(xx, yy, mx, centre, half_w + 5, inside_h + 10) <= 1] = LIPS.astype(np.uint8)
    inside = _ellipse(xx, yy, mx, centre, half_w * 0.86, inside_h) <= 1
    box[inside] = INSIDE.astype(np.uint8)
    if openness > 0.12:
        box[inside & (yy < centre - 0.62 * inside_h + 3)] = TEETH.astype(np.uint8)
    return img


# --------------------------------------------------------------------------- reading a mouth back
def mouth_openness(rgb: np.ndarray, rect: list[int]) -> float:
    """How far the mouth in an RGB image (uint8 [H, W, 3]) is open: the height of its open part (dark inside or
    teeth) as a share of the crop square's side. Closed ≈ 0.01, wide open ≈ 0.3."""
    x1, y1, x2, y2 = rect
    side = y2 - y1
    zone = rgb[y1 + side // 6:y2 - side // 6, x1 + side // 5:x2 - side // 5].astype(np.float32)
    r, g = zone[..., 0], zone[..., 1]
    dark = (r < 120) & (g < 70) & (r > g + 15)
    teeth = (g > 200) & (zone.max(-1) - zone.min(-1) < 35)
    rows = ((dark | teeth).sum(1) >= 3).sum()
    return float(rows / side)


def landmarks_for(rect: list[int]) -> str:
    """A 110-point landmark file whose SPEC §7.1 points give `rect`: x1 = p1.x, y1 = p52.y, x2 = p31.x."""
    x1, y1, x2, _ = rect
    points = [[(x1 + x2) / 2, y1 + (x2 - x1) / 2]] * 110
    points[1], points[31], points[52] = [x1, y1 + 40], [x2, y1 + 40], [(x1 + x2) / 2, y1]
    return "\n".join(f"{x:.1f} {y:.1f}" for x, y in points) + "\n"


def write_avatar(out_dir: str | Path, frames: int = POSE_PERIOD) -> Path:
    """The demo avatar: `frames` idle frames (mouth closed, head motion and blinks) as frame_%04d.jpg +
    crop_rects.json. Deterministic; frames = POSE_PERIOD loops seamlessly."""
    import torch

    from lipsync.codec.image_kernels import write_jpeg

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rects = []
    for t in range(frames):
        image = torch.from_numpy(render(t)).permute(2, 0, 1).contiguous()
        write_jpeg(image, str(out / f"frame_{t:04d}.jpg"), quality=92)
        rects.append(crop_rect(t))
    (out / "crop_rects.json").write_text(json.dumps(rects))
    forget_poses()  # a server that drew its demo avatar keeps no 0.4 GB cache
    return out
