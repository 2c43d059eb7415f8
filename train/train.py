"""Train the demo presenter's SyncTalk_2D model — the 328 generator and the audio encoder, SPEC §4 and §6 — from
scratch on a dataset from make_dataset.py, and write them as fp16 state dicts that lipsync loads like any user's.

Recipe (seeded; every number is a flag):
- a sample is a video frame t: its ROI (SPEC §7.3) is the target, the same ROI masked is the generator's masked
  input, and the reference input is the ROI of a frame in the same pose (t mod POSE_PERIOD) whose mouth is shut
  (a pause in the recording) — as at inference, where the reference is the avatar's own frame, mouth shut, so the
  mouth can only come from the audio;
- the audio encoder is first taught alone (`--pretrain-steps`, cheap: mel windows only) to say the oracle's
  openness and width of the video frame at each window's centre through a linear head, so its embeddings carry the
  mouth shape before the generator ever sees them; then it trains jointly with the generator on SPEC §5's
  features of frame t (BatchNorm in training mode over the batch's windows) at a tenth of the generator's learning
  rate (`--encoder-lr-scale`), the head's loss kept as an auxiliary term over random windows (`--aux-weight`,
  `--aux-batch`) so the embeddings stay tied to the mouth;
- loss: L1 over the ROI plus `mouth_weight` × L1 over the mouth's zone (plus the auxiliary term);
- AdamW, linear warm-up then cosine decay; bf16 autocast where the device has it.

A second, short stage (`--init` the first stage's weights, `--freeze-encoder`, `--edge-share`) shows the generator
the zero feature rows of SPEC §5 at utterance edges — rare in one long recording, common in served utterances — so
a frame's mouth does not depend on where its utterance began or ends. `--full-edge-share` gives more of those
samples a whole edge (an utterance's first frame: 8 zero rows), `--border-weight` adds an L1 term over the ROI's
outer `--border-px` pixels so the generated square's edge matches the frame. A third stage uses the first (an
utterance's first frame then reads shut in silence; `make demo-model` runs all three); the border term, tried at
weight 2, painted lip colour onto the jaw in some frames and is left off (`compose: blend` hides the border).

    python train/train.py --data out/presenter/train --out assets/demo_model \
        --log benchmarks/results/demo-model/train-log.jsonl
    python train/train.py --data out/presenter/train --out assets/demo_model --init assets/demo_model \
        --freeze-encoder --edge-share 0.5 --steps 150 --lr 3e-4 --warmup 10 --checkpoint-every 0 \
        --log benchmarks/results/demo-model/edges-log.jsonl
    python train/train.py --data out/presenter/train --out assets/demo_model --init assets/demo_model \
        --freeze-encoder --edge-share 0.5 --full-edge-share 0.5 --steps 120 --lr 3e-4 --warmup 10 \
        --checkpoint-every 0 --log benchmarks/results/demo-model/finish-log.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipsync.codec import audio
from lipsync.model import audio_features, presenter
from lipsync.model.avatar import MASK_SLICES, rect_from_landmarks  # noqa: E402
from lipsync.model.compose import TEMPLATE_BORDER, resize_bicubic  # noqa: E402
from lipsync.model.engines import cpu_bf16_supported  # noqa: E402
from lipsync.model.networks import AudioEncoder, Generator, load_audio_encoder, load_generator  # noqa: E402

SIZE, TEMPLATE = 320, 328
MOUTH_ZONE = (slice(60, 200), slice(70, 250))  # rows, columns of the ROI around the presenter's mouth
CENTRE_OFFSET = 2  # mel window v is centred on video frame v + 2


def load_rois(data: Path, limit: int = 0, progress: bool = True) -> torch.Tensor:
    """Every frame's ROI (SPEC §7.3 steps 1–2) as uint8 RGB [F, 3, 320, 320] (the first `limit` if set)."""
    from torchvision.io import decode_jpeg, read_file

    count = len(list((data / "full_body_img").glob("*.jpg")))
    count = min(count, limit) if limit else count
    rois = torch.empty(count, 3, SIZE, SIZE, dtype=torch.uint8)
    started = time.perf_counter()
    for i in range(count):
        x1, y1, x2, y2 = rect_from_landmarks(data / "landmarks" / f"{i}.lms")
        frame = decode_jpeg(read_file(str(data / "full_body_img" / f"{i}.jpg")))
        crop = resize_bicubic(frame[:, y1:y2, x1:x2], (TEMPLATE, TEMPLATE))
        rois[i] = crop[:, TEMPLATE_BORDER:TEMPLATE_BORDER + SIZE, TEMPLATE_BORDER:TEMPLATE_BORDER + SIZE]
        if progress and ((i + 1) % 2000 == 0 or i + 1 == count):
            print(f"  {data.name}: {i + 1}/{count} ROIs ({time.perf_counter() - started:.0f} s)", flush=True)
    return rois


def mel_windows(data: Path) -> torch.Tensor:
    """SPEC §2–§3 windows of the dataset's audio: [D, 1, 80, 16]."""
    return mel_windows_of(audio.load_wav(data / "aud.wav"))


def mel_windows_of(wave: torch.Tensor) -> torch.Tensor:
    """SPEC §2–§3 windows of 16 kHz speech: [D, 1, 80, 16]."""
    mel = audio_features.melspectrogram(wave)
    count = audio_features.window_count(mel.shape[0])
    starts = [min(audio_features.window_start(v), mel.shape[0] - audio_features.WINDOW_STEPS) for v in range(count)]
    return torch.stack([mel[s:s + audio_features.WINDOW_STEPS].T for s in starts])[:, None]


ROWS = audio_features.CONTEXT_BEFORE + audio_features.CONTEXT_AFTER  # embedding rows per frame (SPEC §5)


def batch_features(encoder: AudioEncoder, windows: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """SPEC §5 features [B,32,16,16] of the given frames; the encoder runs once on every window they need."""
    # [B,ROWS], −1: a zero row
    rows = torch.tensor([audio_features.context_embeddings(t, windows.shape[0]) for t in frames])
    valid = rows >= 0
    needed, inverse = torch.unique(rows[valid], return_inverse=True)
    embeddings = encoder(windows[needed.to(windows.device)])
    block = embeddings.new_zeros(len(frames), ROWS, embeddings.shape[1])
    block[valid.to(block.device)] = embeddings[inverse.to(block.device)]
    return block.reshape(len(frames), 32, 16, 16)


def utterance_edges(features: torch.Tensor, share: float, rng: random.Random, full: float = 0.0) -> torch.Tensor:
    """For a `share` of the samples, the zero rows SPEC §5 gives frames at an utterance's start (1–8 leading rows)
    or end (1–7 trailing rows), so the generator learns that they say nothing about the mouth; a `full` share of
    those get the most an edge has (8 leading rows: an utterance's first frame; 7 trailing: its last), the case a
    uniform draw shows least and every served utterance begins with."""
    if share <= 0:
        return features
    rows = features.reshape(features.shape[0], ROWS, -1).clone()
    for b in range(rows.shape[0]):
        if rng.random() < share:
            whole = rng.random() < full
            leading, trailing = audio_features.CONTEXT_BEFORE, audio_features.CONTEXT_AFTER - 1
            if rng.random() < 0.5:
                rows[b, :leading if whole else rng.randint(1, leading)] = 0
            else:
                rows[b, ROWS - (trailing if whole else rng.randint(1, trailing)):] = 0
    return rows.reshape(features.shape)


def centred_targets(mouth: dict, windows: int) -> torch.Tensor:
    """Per mel window v, the oracle's (openness, width) of the video frame at its centre: window v covers
    [40·v, 40·v + 200) ms, whose middle is frame v + 2's."""
    frames = len(mouth["openness"])
    centre = [min(v + CENTRE_OFFSET, frames - 1) for v in range(windows)]
    return torch.tensor([[mouth["openness"][f], mouth["width"][f]] for f in centre], dtype=torch.float32)


def head_correlation(encoder: AudioEncoder, head: torch.nn.Linear, windows: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[float, float]:
    """Correlation of the head's openness with the oracle's on these windows: all, and speech only."""
    with torch.no_grad():
        said = torch.cat([head(encoder(chunk))[:, 0] for chunk in windows.split(1024)]).cpu()
    truth = targets[:, 0]
    speech = truth >= 0.02
    corr = [float(torch.corrcoef(torch.stack([said[m], truth[m]]))[0, 1]) for m in (truth >= 0, speech)]
    return round(corr[0], 4), round(corr[1], 4)


def pretrain_encoder(encoder: AudioEncoder, windows: torch.Tensor, targets: torch.Tensor, eval_windows: torch.Tensor,
                     eval_targets: torch.Tensor, steps: int, batch: int, lr: float, log) -> torch.nn.Linear:
    """Teach the encoder (plus a linear head) the oracle's mouth shape per window; returns the head."""
    head = torch.nn.Linear(512, 2).to(windows.device)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, max(1, steps // 20))
        pick = torch.randint(0, windows.shape[0], (batch,), generator=generator).to(windows.device)
        loss = torch.nn.functional.mse_loss(head(encoder(windows[pick])), targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            record = {"pretrain_step": step, "loss": round(loss.item(), 6),
                      "minutes": round((time.perf_counter() - started) / 60, 2)}
            if step % 500 == 0 or step == steps - 1:
                encoder.eval()
                record["eval_openness_corr"], record["eval_speech_openness_corr"] = head_correlation(
                    encoder, head, eval_windows, eval_targets)
                encoder.train()
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
    return head


def visual_input(rois: torch.Tensor, frames: list[int], references: torch.Tensor, variant: str = "328"
                 ) -> torch.Tensor:
    """Generator input [B,6,S,S] BGR in [0,1]: the reference ROIs (uint8 RGB) and the targets' ROIs masked
    (SPEC §7.3 3–4)."""
    masked = rois[frames].flip(1).clone()
    rows, cols = MASK_SLICES[variant]
    masked[:, :, rows, cols] = 0
    return torch.cat([references.flip(1), masked], 1).float().div_(255.0)


def idle_rois(frames: list[int]) -> torch.Tensor:
    """The presenter's own ROIs of these frames with the mouth shut — the avatar's frames at inference."""
    out = []
    for t in frames:
        x1, y1, x2, y2 = presenter.crop_rect(t)
        image = torch.from_numpy(presenter.render(t)).permute(2, 0, 1)
        crop = resize_bicubic(image[:, y1:y2, x1:x2].contiguous(), (TEMPLATE, TEMPLATE))
        out.append(crop[:, TEMPLATE_BORDER:TEMPLATE_BORDER + SIZE, TEMPLATE_BORDER:TEMPLATE_BORDER + SIZE])
    return torch.stack(out)


def shut_references(openness: list[float], count: int) -> dict[int, list[int]]:
    """Per pose (t mod POSE_PERIOD), the dataset's frames in that pose whose mouth is shut (the oracle's openness
    below 0.02: pauses between and within sentences) — what the avatar's own frame is at inference."""
    by_pose: dict[int, list[int]] = {}
    for t in range(count):
        if openness[t] < 0.02:
            by_pose.setdefault(t % presenter.POSE_PERIOD, []).append(t)
    return by_pose


def references_for(frames: list[int], count: int, shut: dict[int, list[int]], rng: random.Random) -> list[int]:
    """For each frame, a frame in the same pose with the mouth shut (another same-pose frame if none is shut)."""
    out = []
    for t in frames:
        choices = shut.get(t % presenter.POSE_PERIOD) or list(range(t % presenter.POSE_PERIOD, count,
                                                                    presenter.POSE_PERIOD))
        out.append(rng.choice(choices))
    return out


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_fp16(generator: Generator, encoder: AudioEncoder, out: Path) -> dict[str, int]:
    """fp16 state dicts: generator_328.pth and audio_visual_encoder.pth (keys without the `audio_encoder.` prefix,
    as SyncTalk_2D stores them)."""
    out.mkdir(parents=True, exist_ok=True)
    gen = {k: v.half() if v.is_floating_point() else v for k, v in generator.state_dict().items()}
    enc = {k.removeprefix("audio_encoder."): v.half() if v.is_floating_point() else v
           for k, v in encoder.state_dict().items()}
    torch.save(gen, out / "generator_328.pth")
    torch.save(enc, out / "audio_visual_encoder.pth")
    return {name: (out / name).stat().st_size for name in ("generator_328.pth", "audio_visual_encoder.pth")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="out/presenter/train")
    parser.add_argument("--eval-data", default="out/presenter/eval", help="held-out set for the logged eval loss")
    parser.add_argument("--out", default="assets/demo_model")
    parser.add_argument("--log", default="benchmarks/results/demo-model/train-log.jsonl")
    parser.add_argument("--steps", type=int, default=850)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--mouth-weight", type=float, default=4.0)
    parser.add_argument("--pretrain-steps", type=int, default=450, help="encoder-alone steps on the oracle")
    parser.add_argument("--pretrain-batch", type=int, default=128)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--aux-weight", type=float, default=10.0, help="the encoder head's loss in joint training")
    parser.add_argument("--encoder-lr-scale", type=float, default=0.1,
                        help="the taught encoder's learning rate in joint training, relative to the generator's")
    parser.add_argument("--aux-batch", type=int, default=32, help="windows per step for the auxiliary term")
    parser.add_argument("--edge-share", type=float, default=0.0,
                        help="share of samples given an utterance edge's zero feature rows")
    parser.add_argument("--full-edge-share", type=float, default=0.0,
                        help="of those, the share given a whole edge (an utterance's first or last frame)")
    parser.add_argument("--border-weight", type=float, default=0.0,
                        help="extra L1 weight over the ROI's outer --border-px pixels: the generated square's edge "
                        "matches the frame it is pasted into")
    parser.add_argument("--border-px", type=int, default=16)
    parser.add_argument("--init", default="", help="start from this directory's weights (a second stage)")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="keep the audio encoder as loaded (no pre-training, no auxiliary term)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--max-frames", type=int, default=0, help="use only the first N frames (quick checks)")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="also save to --checkpoint-dir every N steps")
    parser.add_argument("--checkpoint-dir", default="out/demo_model_checkpoint")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data, eval_data = Path(args.data), Path(args.eval_data)
    started = time.perf_counter()
    rois, windows = load_rois(data, args.max_frames), mel_windows(data).to(device)
    eval_rois, eval_windows = load_rois(eval_data, args.max_frames), mel_windows(eval_data).to(device)
    count = rois.shape[0]
    mouth = json.loads((data / "mouth.json").read_text())
    shut = shut_references(mouth["openness"], count)
    targets = centred_targets(mouth, windows.shape[0]).to(device)
    eval_targets = centred_targets(json.loads((eval_data / "mouth.json").read_text()), eval_windows.shape[0])
    print(f"data: {count} training frames, {eval_rois.shape[0]} held-out ({time.perf_counter() - started:.0f} s)",
          flush=True)
    if args.init:
        generator = load_generator(Path(args.init) / "generator_328.pth", device=device).train()
        encoder = load_audio_encoder(Path(args.init) / "audio_visual_encoder.pth", device=device)
    else:
        generator, encoder = Generator("328").to(device), AudioEncoder().to(device)
    if device.type == "cpu":
        generator = generator.to(memory_format=torch.channels_last)
    bf16 = device.type == "cuda" or cpu_bf16_supported()
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    log.write(json.dumps({"event": "start", "args": vars(args), "frames": count, "bf16": bf16,
                          "poses_with_shut_references": len(shut),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}) + "\n")
    groups = [{"params": list(generator.parameters()), "scale": 1.0}]
    if args.freeze_encoder:
        head = None
        encoder.eval().requires_grad_(False)
    else:
        head = pretrain_encoder(encoder, windows, targets, eval_windows, eval_targets.to(device),
                                args.pretrain_steps, args.pretrain_batch, args.pretrain_lr, log)
        groups.append({"params": list(encoder.parameters()) + list(head.parameters()),
                       "scale": args.encoder_lr_scale})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4)
    eval_frames = list(range(8, eval_rois.shape[0] - 8, max(1, eval_rois.shape[0] // 32)))[:32]
    eval_start = json.loads((eval_data / "mouth.json").read_text())["start_frame"]
    eval_references = idle_rois([eval_start + t for t in eval_frames])

    border = torch.ones(SIZE, SIZE, dtype=torch.bool)
    border[args.border_px:SIZE - args.border_px, args.border_px:SIZE - args.border_px] = False

    def loss_of(rois_, windows_, frames, references, edges: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        visual = visual_input(rois_, frames, references).to(device)
        if device.type == "cpu":
            visual = visual.contiguous(memory_format=torch.channels_last)
        target = rois_[frames].flip(1).float().div(255.0).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features = utterance_edges(batch_features(encoder, windows_, frames), edges, rng, args.full_edge_share)
            predicted = generator(visual, features).float()
        error = (predicted - target).abs()
        rows, cols = MOUTH_ZONE
        return error.mean(), error[:, :, rows, cols].mean(), error[:, :, border.to(error.device)].mean()

    train_start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = group["scale"] * learning_rate(step, args.steps, args.lr, args.warmup)
        frames = [rng.randrange(count) for _ in range(args.batch)]
        whole, mouth_l1, border_l1 = loss_of(rois, windows, frames, rois[references_for(frames, count, shut, rng)],
                                             args.edge_share)
        aux = torch.zeros((), device=device)
        if head is not None:
            picks = torch.tensor([rng.randrange(windows.shape[0]) for _ in range(args.aux_batch)], device=device)
            aux = torch.nn.functional.mse_loss(head(encoder(windows[picks])), targets[picks])
        loss = whole + args.mouth_weight * mouth_l1 + args.border_weight * border_l1 + args.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            record = {"step": step, "loss": round(loss.item(), 5), "l1": round(whole.item(), 5),
                      "mouth_l1": round(mouth_l1.item(), 5), "border_l1": round(border_l1.item(), 5),
                      "aux": round(aux.item(), 6), "lr": optimizer.param_groups[0]["lr"],
                      "minutes": round((time.perf_counter() - train_start) / 60, 2)}
            if step % (4 * args.log_every) == 0 or step == args.steps - 1:
                generator.eval(), encoder.eval()
                with torch.no_grad():  # held-out voice and sentences; the reference is the same pose, mouth shut
                    whole_e, mouth_e, border_e = loss_of(eval_rois, eval_windows, eval_frames, eval_references)
                record.update(eval_l1=round(whole_e.item(), 5), eval_mouth_l1=round(mouth_e.item(), 5),
                              eval_border_l1=round(border_e.item(), 5))
                generator.train(), encoder.train(not args.freeze_encoder)
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if args.checkpoint_every and step and step % args.checkpoint_every == 0:
            save_fp16(generator, encoder, Path(args.checkpoint_dir))
    generator.eval(), encoder.eval()
    sizes = save_fp16(generator.to(memory_format=torch.contiguous_format).cpu(), encoder.cpu(), Path(args.out))
    minutes = (time.perf_counter() - started) / 60
    log.write(json.dumps({"event": "done", "minutes_total": round(minutes, 2), "files": sizes}) + "\n")
    log.close()
    print(f"trained in {minutes:.1f} min (data loading included); wrote {args.out}: {sizes}", flush=True)


if __name__ == "__main__":
    main()
