"""Measure the demo model on held-out speech (a voice and sentences training never had).

`lipsync render` renders the evaluation set's recording onto the demo avatar (its idle frames, mouth shut) as the demo
is served (`--compose blend`, conf/models/demo.yaml); for
every output frame the mouth's openness is read from the image (lipsync.presenter.mouth_openness) and compared
with the oracle's frame — the same avatar frame with the mouth the oracle gives for that moment — read the same
way. Writes eval.json (correlation, mean error, per sentence, silence), mouth-strip.png (predicted above oracle)
and mouth-track.png (openness over time).

    python train/evaluate.py --data out/presenter/eval --model assets/demo_model --out benchmarks/results/demo-model
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipsync.model import presenter
from lipsync.model.avatar import COMPOSE_MODES, avatar_frame  # noqa: E402

CLOSED = 0.03  # measured openness below this is a shut mouth (shut ≈ 0.013, openness 0.1 ≈ 0.039)


def read_rgb(path: Path) -> np.ndarray:
    from torchvision.io import decode_image
    return decode_image(str(path)).permute(1, 2, 0).numpy()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="out/presenter/eval")
    parser.add_argument("--model", default="assets/demo_model")
    parser.add_argument("--avatar", default="out/demo_model/presenter", help="the demo avatar (drawn if missing)")
    parser.add_argument("--out", default="benchmarks/results/demo-model")
    parser.add_argument("--compose", default="blend", choices=COMPOSE_MODES,
                        help="the paste (blend: the demo's, conf/models/demo.yaml)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    data, model, out = Path(args.data), Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    avatar = Path(args.avatar)
    if not (avatar / "crop_rects.json").is_file():
        presenter.write_avatar(avatar)
    frames_total = len(json.loads((avatar / "crop_rects.json").read_text()))
    oracle = json.loads((data / "mouth.json").read_text())
    said = json.loads((data / "sentences.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "lipsync", "render", "--checkpoint",
                               str(model / "generator_328.pth"), "--audio-encoder",
                               str(model / "audio_visual_encoder.pth"), "--avatar", str(avatar), "--audio",
                               str(data / "aud.wav"), "--sequence", "loop", "--frames-out", tmp, "--format", "jpeg",
                               "--quality", "95", "--compose", args.compose, "--device", args.device],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"lipsync render failed:\n{done.stderr}")
        render_s = time.perf_counter() - started
        files = sorted(Path(tmp).glob("*.jpg"))
        count = min(len(files), len(oracle["openness"]))
        predicted, expected, strip_pairs = np.zeros(count), np.zeros(count), {}
        for i in range(count):
            f = avatar_frame(i, frames_total, "loop")
            rect = presenter.crop_rect(f)
            image = read_rgb(files[i])
            truth = presenter.render(f, oracle["openness"][i], oracle["width"][i])
            predicted[i] = presenter.mouth_openness(image, rect)
            expected[i] = presenter.mouth_openness(truth, rect)
            strip_pairs[i] = (image, truth, rect)
            if len(strip_pairs) > 400:  # keep memory bounded: only the first sentences feed the strip
                strip_pairs.pop(max(strip_pairs))
    sentences = []
    for s in said:
        lo, hi = int(s["start_s"] * 25), min(count, int((s["start_s"] + s["seconds"]) * 25))
        sentences.append({"text": s["text"], "voice": s["voice"], "frames": hi - lo,
                          "correlation": round(correlation(predicted[lo:hi], expected[lo:hi]), 3)})
    silent = np.array(oracle["openness"][:count]) < 0.02
    result = {
        "benchmark": "demo-model", "data": str(data), "frames": count, "voice": said[0]["voice"],
        "sentences": len(said), "compose": args.compose, "render_seconds": round(render_s, 1),
        "render_fps": round(count / render_s, 2),
        "openness_correlation": round(correlation(predicted, expected), 4),
        "openness_mean_abs_error": round(float(np.abs(predicted - expected).mean()), 4),
        "openness_scale": "share of the crop square's side; shut ≈ 0.013, wide open ≈ 0.27",
        "speech_frames_correlation": round(correlation(predicted[~silent], expected[~silent]), 4),
        "silent_frames": int(silent.sum()),
        "silent_frames_shut": round(float((predicted[silent] < CLOSED).mean()), 4) if silent.any() else None,
        "silent_mean_openness": round(float(predicted[silent].mean()), 4) if silent.any() else None,
        "per_sentence": sentences,
        "command": " ".join(["python", "train/evaluate.py", "--data", args.data, "--model", args.model,
                             "--compose", args.compose]),
    }
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "per_sentence"}, indent=1))
    draw(strip_pairs, predicted, expected, said, out)


def draw(pairs: dict, predicted: np.ndarray, expected: np.ndarray, said: list[dict], out: Path) -> None:
    """mouth-strip.png: 12 frames of the first sentence, predicted (top) over oracle (bottom), each the crop square
    with a margin of a sixth of its side (the frame round the pasted square shows: no outline);
    mouth-track.png: openness over the first three sentences."""
    import cv2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = int(said[0]["start_s"] * 25)
    hi = lo + int(said[0]["seconds"] * 25)
    picks = [k for k in np.linspace(lo, hi - 1, 12).astype(int) if k in pairs]
    rows = []
    for which in (0, 1):
        tiles = []
        for k in picks:
            image, rect = pairs[k][which], pairs[k][2]
            x1, y1, x2, y2 = rect
            margin = (x2 - x1) // 6
            crop = image[max(0, y1 - margin):y2 + margin, max(0, x1 - margin):x2 + margin]
            tile = cv2.resize(np.ascontiguousarray(crop), (192, 192), interpolation=cv2.INTER_AREA)
            tiles.append(cv2.copyMakeBorder(tile, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255)))
        rows.append(np.concatenate(tiles, 1))
    cv2.imwrite(str(out / "mouth-strip.png"), np.concatenate(rows, 0)[..., ::-1])
    end = int((said[min(2, len(said) - 1)]["start_s"] + said[min(2, len(said) - 1)]["seconds"]) * 25) + 10
    t = np.arange(min(end, len(predicted))) / 25
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.plot(t, expected[:len(t)], label="oracle", color="#444")
    ax.plot(t, predicted[:len(t)], label="demo model (lipsync render)", color="#d0542c")
    ax.set_xlabel("seconds (held-out voice and sentences)")
    ax.set_ylabel("mouth openness")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "mouth-track.png", dpi=110)


if __name__ == "__main__":
    main()
