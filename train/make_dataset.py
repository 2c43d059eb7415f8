"""Training and evaluation data for the demo presenter, in SyncTalk_2D's dataset layout.

Sentences are drawn (seeded) from word lists, spoken by espeak-ng in several voices, rates and pitches, and laid
end to end with pauses into one recording per set (`aud.wav`, 16 kHz). Each 40 ms video frame of it is the
presenter (lipsync.presenter) with the mouth the oracle gives for that moment of the speech:
`full_body_img/{i}.jpg` (1280×720) and `landmarks/{i}.lms`, exactly what a user's SyncTalk_2D dataset holds, plus
`mouth.json` (the oracle's openness and width per frame) and `sentences.json` (what was said, by whom, where).

The evaluation set uses a voice and sentences the training set never has.

    python train/make_dataset.py --out out/presenter   # writes out/presenter/{train,eval}/
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipsync.codec.audio import decode_pcm, parse_wav, resample  # noqa: E402
from lipsync.model import presenter

SUBJECTS = ["the old man", "my sister", "a small dog", "the teacher", "our neighbour", "the pilot", "every child",
            "the farmer", "a quiet girl", "the doctor", "his brother", "the baker", "a tall woman", "the captain",
            "your friend", "the singer", "a young boy", "the judge", "that cat", "the driver", "my father",
            "the painter", "a busy cook", "the nurse", "our mayor", "the sailor", "a lucky fox", "the poet"]
VERBS = ["bought", "painted", "found", "carried", "opened", "cleaned", "watched", "borrowed", "fixed", "lost",
         "cooked", "measured", "moved", "sold", "wrapped", "counted", "checked", "hid", "built", "followed",
         "remembered", "ordered", "dropped", "noticed", "lifted", "shared", "pushed", "visited", "chose", "kept"]
OBJECTS = ["a blue umbrella", "the wooden boat", "seven apples", "an orange kite", "the heavy box", "a silver key",
           "the morning paper", "two yellow chairs", "a loaf of bread", "the broken clock", "a pair of shoes",
           "the red bicycle", "some fresh fish", "a long ladder", "the kitchen window", "three old coins",
           "a warm blanket", "the garden gate", "a cup of tea", "the purple flowers", "a map of the city",
           "the shiny spoon", "nine tomatoes", "a paper lamp", "the green bottle", "a bag of rice", "the piano"]
PLACES = ["near the river", "after lunch", "in the market", "before dawn", "at the station", "under the bridge",
          "on Monday", "by the sea", "during the storm", "in the attic", "behind the school", "at midnight",
          "on the hill", "across the street", "in the evening", "at the harbour", "near the park", "last summer"]
ENDINGS = ["", "", "and smiled", "and then went home", "without a word", "very slowly", "for the first time",
           "again and again", "with great care", "as usual", "quite happily", "once more"]
QUESTIONS = ["Why did {s} leave {p}?", "Did {s} really see {o}?", "Where is {o} now?", "Who {v} {o} {p}?",
             "How often does {s} go out {p}?", "Is it true that {s} {v} {o}?"]

TRAIN_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-us+f2", "en-gb+f4",
                "en-us+m3", "en-gb-x-rp+f1", "en-029+m2", "en-us-nyc+f3"]
EVAL_VOICE = "en-gb-scotland+f5"


def sentence(rng: random.Random) -> str:
    s, v, o, p = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)
    if rng.random() < 0.2:
        return rng.choice(QUESTIONS).format(s=s, v=v, o=o, p=p)
    text = f"{s} {v} {o} {p} {rng.choice(ENDINGS)}".strip()
    return text[0].upper() + text[1:] + rng.choice([".", ".", "!"])


def corpus(count_train: int, count_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct sentences; the evaluation ones never occur in training."""
    rng = random.Random(seed)
    seen: list[str] = []
    while len(seen) < count_train + count_eval:
        text = sentence(rng)
        if text not in seen:
            seen.append(text)
    return seen[count_eval:], seen[:count_eval]


def speak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng → mono float 16 kHz."""
    done = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=True)
    pcm, fmt = parse_wav(done.stdout, f"espeak-ng ({voice})")
    return resample(decode_pcm(pcm, fmt), fmt.sample_rate).numpy()


def build(out: Path, sentences: list[str], voices: list[str], seed: int, start_frame: int = 0) -> dict:
    """One set: speech laid end to end with pauses → aud.wav, frames, landmarks, mouth.json, sentences.json."""
    rng = random.Random(seed)
    if out.exists():
        shutil.rmtree(out)
    (out / "full_body_img").mkdir(parents=True)
    (out / "landmarks").mkdir()
    pieces, said, at = [], [], 0
    for k, text in enumerate(sentences):
        voice, rate, pitch = voices[k % len(voices)], rng.randint(135, 195), rng.randint(25, 75)
        pause = np.zeros(int(rng.uniform(0.25, 0.7) * presenter.SAMPLE_RATE), np.float32)
        speech = speak(text, voice, rate, pitch)
        pieces += [pause, speech]
        said.append({"text": text, "voice": voice, "rate": rate, "pitch": pitch,
                     "start_s": (at + len(pause)) / presenter.SAMPLE_RATE,
                     "seconds": len(speech) / presenter.SAMPLE_RATE})
        at += len(pause) + len(speech)
    pieces.append(np.zeros(int(0.5 * presenter.SAMPLE_RATE), np.float32))
    wave16k = np.concatenate(pieces)
    frames = len(wave16k) // presenter.HOP
    wave16k = wave16k[:frames * presenter.HOP]
    with wave.open(str(out / "aud.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(presenter.SAMPLE_RATE)
        f.writeframes((np.clip(wave16k, -1, 1) * 32767).astype(np.int16).tobytes())
    openness, width = presenter.mouth_track(wave16k, frames)
    from torchvision.io import write_jpeg

    def write(i: int) -> None:
        t = start_frame + i
        image = torch.from_numpy(presenter.render(t, float(openness[i]), float(width[i])))
        write_jpeg(image.permute(2, 0, 1).contiguous(), str(out / "full_body_img" / f"{i}.jpg"), quality=90)
        (out / "landmarks" / f"{i}.lms").write_text(presenter.landmarks_for(presenter.crop_rect(t)))
    for t in range(presenter.POSE_PERIOD):  # fill the pose cache before the threads share it
        presenter.render(start_frame + t)
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for done, _ in enumerate(pool.map(write, range(frames)), 1):
            if done % 1000 == 0 or done == frames:
                print(f"  {out.name}: {done}/{frames} frames ({time.perf_counter() - started:.0f} s)", flush=True)
    (out / "mouth.json").write_text(json.dumps({"start_frame": start_frame, "openness": openness.round(4).tolist(),
                                                "width": width.round(4).tolist()}))
    (out / "sentences.json").write_text(json.dumps(said, indent=1))
    return {"frames": frames, "seconds": len(wave16k) / presenter.SAMPLE_RATE, "sentences": len(sentences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/presenter")
    parser.add_argument("--train-sentences", type=int, default=150)
    parser.add_argument("--eval-sentences", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not shutil.which("espeak-ng"):
        sys.exit("make_dataset: espeak-ng is not installed (Debian/Ubuntu: apt install espeak-ng)")
    train_text, eval_text = corpus(args.train_sentences, args.eval_sentences, args.seed)
    out = Path(args.out).expanduser().resolve()
    summary = {"train": build(out / "train", train_text, TRAIN_VOICES, args.seed + 1),
               "eval": build(out / "eval", eval_text, [EVAL_VOICE], args.seed + 2),
               "train_voices": TRAIN_VOICES, "eval_voice": EVAL_VOICE}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
