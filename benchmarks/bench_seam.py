"""How visible is the pasted square? The seam and blotch metrics of rendered frames against the avatar frames they are
drawn on (issue 26).

Renders the same speech through the in-process serving path (eager, CPU by default), decodes each JPEG frame and
compares it with its avatar frame (mean |output − avatar| over RGB, grey levels):
- `edge_profile`: that difference as a function of the signed distance from the pasted square's edge in frame pixels
  (negative outside the square: never pasted, so JPEG's own error is the baseline);
- `ridge`: the profile's peak within the square's outer 12 px minus that outside baseline — a visible outline when
  it stands above the rest;
- `blotch`: the largest mean difference of an 8×8 block inside the square but outside the mouth zone (a box in
  square-relative coordinates, `--mouth-zone`), with where and in which frame it is;
and writes a strip PNG of the worst frame: output | avatar | 4×|difference| around the square.

    python benchmarks/bench_seam.py --model demo --out benchmarks/results/seam-demo.json
    python benchmarks/bench_seam.py --fixture --seconds 2 --out benchmarks/results/seam-fixture.json

The fixture's generator is untrained (seeded weights paint noise), so its figures show the metric's scale for a
square that matches nothing, not a quality; the demo's are the ones issue 26 bounds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.io import decode_jpeg, write_png

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import assets, environment, write  # noqa: E402
from lipsync.codec import audio  # noqa: E402
from lipsync.model.avatar import COMPOSE_MODES  # noqa: E402
from lipsync.model.engines import EngineConfig  # noqa: E402
from lipsync.model.pipeline import ModelSpec, load_pipeline  # noqa: E402
from lipsync.runtime.render import synthesize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE, INSIDE, EDGE = 8, 48, 12  # profile from 8 px outside to 48 px inside; the ridge is sought in the outer 12


def demo_spec(compose: str | None) -> ModelSpec:
    from omegaconf import OmegaConf

    from lipsync.config import load_config
    from lipsync.model.demo import ensure_demo_model

    declared = OmegaConf.to_container(load_config(["+models=demo"], "render").models)["demo"]
    ensure_demo_model(Path(declared["checkpoint"]), Path(declared["audio_encoder"]), Path(declared["avatar"]))
    return ModelSpec.from_dict("demo", {**declared, **({"compose": compose} if compose else {})})


def fixture_spec(feather: int, compose: str | None) -> ModelSpec:
    files = assets(640, 360, 24)
    return ModelSpec.from_dict("fixture", {**{k: str(v) for k, v in files.items()}, "feather": feather,
                                           "compose": compose or "paste"})


def measure(pipeline, wave: torch.Tensor, mouth_zone: tuple[float, float, float, float], strip: Path | None) -> dict:
    avatar = pipeline.avatar
    result = synthesize(pipeline, wave, quality=90)
    sums, counts = torch.zeros(OUTSIDE + INSIDE), torch.zeros(OUTSIDE + INSIDE)
    worst = {"value": -1.0}
    per_frame_ridge = []
    for frame in result.frames:
        out = decode_jpeg(torch.frombuffer(bytearray(frame.jpeg), dtype=torch.uint8)).float()
        ref = avatar.frames[frame.avatar_frame].cpu().float()
        x1, y1, x2, y2 = avatar.rects[frame.avatar_frame]
        lo_y, lo_x = max(0, y1 - OUTSIDE), max(0, x1 - OUTSIDE)
        diff = (out - ref).abs().mean(0)[lo_y:y2 + OUTSIDE, lo_x:x2 + OUTSIDE]
        ys = torch.arange(lo_y, lo_y + diff.shape[0])[:, None]
        xs = torch.arange(lo_x, lo_x + diff.shape[1])[None, :]
        distance = torch.minimum(torch.minimum(xs - x1, x2 - 1 - xs), torch.minimum(ys - y1, y2 - 1 - ys))
        keep = (distance >= -OUTSIDE) & (distance < INSIDE)
        bins = (distance[keep] + OUTSIDE).long()
        frame_sums = torch.bincount(bins, diff[keep], OUTSIDE + INSIDE)
        frame_counts = torch.bincount(bins, minlength=OUTSIDE + INSIDE).float()
        sums, counts = sums + frame_sums, counts + frame_counts
        profile = frame_sums / frame_counts.clamp(min=1)
        per_frame_ridge.append(float(profile[OUTSIDE:OUTSIDE + EDGE].max() - profile[:OUTSIDE].mean()))
        # blotch: 8×8 blocks inside the square, outside the mouth zone
        inner = (out - ref).abs().mean(0)[y1:y2, x1:x2]
        blocks = torch.nn.functional.avg_pool2d(inner[None, None], 8, 8)[0, 0]
        by, bx = torch.meshgrid(torch.arange(blocks.shape[0]), torch.arange(blocks.shape[1]), indexing="ij")
        fy, fx = (by * 8 + 4) / (y2 - y1), (bx * 8 + 4) / (x2 - x1)
        left, top, right, bottom = mouth_zone
        outside_mouth = ~((fx >= left) & (fx <= right) & (fy >= top) & (fy <= bottom))
        value = float(blocks[outside_mouth].max()) if outside_mouth.any() else 0.0
        if value > worst["value"]:
            k = int(torch.where(outside_mouth, blocks, torch.tensor(-1.0)).argmax())
            worst = {"value": round(value, 2), "frame": frame.index, "avatar_frame": frame.avatar_frame,
                     "block_xy_in_square": [int(bx.flatten()[k]) * 8, int(by.flatten()[k]) * 8],
                     "_images": (out, ref, (x1, y1, x2, y2))}
    profile = (sums / counts.clamp(min=1)).tolist()
    baseline = sum(profile[:OUTSIDE]) / OUTSIDE
    peak_at = max(range(OUTSIDE, OUTSIDE + EDGE), key=lambda i: profile[i])
    if strip is not None:
        out, ref, (x1, y1, x2, y2) = worst["_images"]
        pad = 16
        box = (slice(max(0, y1 - pad), y2 + pad), slice(max(0, x1 - pad), x2 + pad))
        crops = [out[:, box[0], box[1]], ref[:, box[0], box[1]], ((out - ref).abs() * 4)[:, box[0], box[1]]]
        strip.parent.mkdir(parents=True, exist_ok=True)
        write_png(torch.cat(crops, dim=2).clamp(0, 255).to(torch.uint8), str(strip))
    worst.pop("_images", None)
    ordered = sorted(per_frame_ridge)
    return {"frames": len(result.frames), "jpeg_quality": 90,
            "edge_profile": {str(d - OUTSIDE): round(v, 2) for d, v in enumerate(profile)},
            "outside_baseline": round(baseline, 2),
            "ridge": {"value": round(profile[peak_at] - baseline, 2), "peak_distance_px": peak_at - OUTSIDE,
                      "per_frame_p50": round(ordered[len(ordered) // 2], 2), "per_frame_max": round(ordered[-1], 2)},
            "blotch": worst, "mouth_zone": dict(zip(("left", "top", "right", "bottom"), mouth_zone))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=["demo"], help="the demo model as `make demo` serves it")
    which.add_argument("--fixture", action="store_true", help="seeded weights on a synthetic avatar")
    parser.add_argument("--feather", type=int, default=0, help="--fixture: the paste's feather")
    parser.add_argument("--compose", choices=COMPOSE_MODES, help="override the model's compose (demo: its "
                        "conf/models/demo.yaml; fixture: paste)")
    parser.add_argument("--seconds", type=float, default=4.0, help="of assets/speech.wav")
    parser.add_argument("--mouth-zone", type=float, nargs=4, default=[0.2, 0.1, 0.8, 0.8],
                        metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"), help="square-relative box left out of the blotch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = demo_spec(args.compose) if args.model else fixture_spec(args.feather, args.compose)
    pipeline = load_pipeline(spec, EngineConfig(backend="eager"), args.device)
    wave = audio.load_wav(ROOT / "assets" / "speech.wav")[:int(args.seconds * 16000)]
    strip = Path(args.out).with_suffix(".png") if args.out else None
    result = {"environment": environment(torch.device(args.device)), "model": spec.name, "compose": spec.compose,
              "feather": spec.feather,
              **measure(pipeline, wave, tuple(args.mouth_zone), strip)}
    write(result, args.out)


if __name__ == "__main__":
    main()
