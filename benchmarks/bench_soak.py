"""Soak: N live sessions talking for a long time against one `lipsync serve`, watching what only time shows.

    python benchmarks/bench_soak.py --sessions 2 --minutes 30 --variant 160 --out benchmarks/results/soak-cpu.json

Each session is one Converse that lasts the whole run; an utterance of the committed speech (1.5–4 s of it, seeded)
is sent every `--every` seconds, all at once as a TTS would, and every fifth is barged in. Every `--sample-s`
seconds the run records, per point: the server process's resident memory (VmRSS) and open file descriptors, the
frames, late (HELD) frames and speech frames received so far, and each session's **A/V offset**: the audio carried
so far, in frames (samples / samples per frame), minus the frames received — 0 while sound and picture stay
together; drift is its largest change over the run. Writes JSON and a PNG (memory and descriptors over time).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import numpy as np
from common import assets, environment, figure, model_override, save_figure, write

from lipsync._proto import lipsync_pb2 as pb
from lipsync._proto import lipsync_pb2_grpc as pb_grpc
from lipsync.apps.client import channel, open_stream
from lipsync.apps.serve import spawn
from lipsync.codec import audio

SPEECH = Path(__file__).resolve().parent.parent / "assets" / "speech.wav"


def proc_status(pid: int) -> tuple[float, int]:
    """(resident MB, open file descriptors) of a process."""
    rss = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


class Session:
    """One long Converse: counts what it receives."""

    def __init__(self, k: int, pcm: bytes, every_s: float, seconds: float):
        self.k, self.pcm, self.every_s, self.seconds = k, pcm, every_s, seconds
        self.frames = self.late = self.speech = self.audio_samples = self.samples_per_frame = 0
        self.utterances = self.finished = 0
        self.rng = random.Random(k)

    async def requests(self):
        yield pb.ConverseRequest(config=pb.ConverseConfig(model_id="bench", format=pb.AudioFormat(
            encoding=pb.PCM_S16LE, sample_rate=16000, channels=1), jpeg_quality=70))
        started = time.monotonic()
        await asyncio.sleep(self.rng.uniform(0.5, self.every_s))
        while time.monotonic() - started < self.seconds:
            n = self.rng.randint(24000, 64000) // 2 * 2  # 1.5–4 s of speech
            lo = self.rng.randint(0, max(0, len(self.pcm) - 2 * n)) // 2 * 2
            self.utterances += 1
            yield pb.ConverseRequest(start_utterance=pb.UtteranceStart(utterance_id=f"s{self.k}-{self.utterances}",
                                                                       interrupt=self.utterances % 5 == 0))
            yield pb.ConverseRequest(audio=self.pcm[lo:lo + 2 * n])
            yield pb.ConverseRequest(end_utterance=True)
            await asyncio.sleep(self.every_s)

    async def run(self, target: str) -> None:
        async with channel(target) as ch:
            call = open_stream(pb_grpc.LipSyncStub(ch).Converse, self.requests())
            async for response in call:
                if response.HasField("session"):
                    self.samples_per_frame = response.session.samples_per_frame
                    continue
                frame = response.frame
                self.frames += 1
                self.audio_samples += len(frame.audio) // 2
                self.late += frame.kind == pb.HELD
                self.speech += frame.kind == pb.SPEECH
                self.finished += sum(e.WhichOneof("event") == "finished" for e in response.events)

    def offset_frames(self) -> float:
        return self.audio_samples / self.samples_per_frame - self.frames if self.samples_per_frame else 0.0


async def soak(target: str, pid: int, args: argparse.Namespace) -> list[dict]:
    wave = audio.load_wav(SPEECH)
    pcm = (np.tile(wave.numpy(), 4) * 32767).astype(np.int16).tobytes()
    sessions = [Session(k, pcm, args.every, args.minutes * 60) for k in range(args.sessions)]
    tasks = [asyncio.ensure_future(s.run(target)) for s in sessions]
    points, started = [], time.monotonic()
    while not all(t.done() for t in tasks):
        await asyncio.sleep(args.sample_s)
        rss, fds = proc_status(pid)
        points.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss, 1), "fds": fds,
                       "frames": sum(s.frames for s in sessions), "late": sum(s.late for s in sessions),
                       "speech": sum(s.speech for s in sessions),
                       "utterances": sum(s.utterances for s in sessions),
                       "av_offset_frames": [round(s.offset_frames(), 3) for s in sessions]})
        print(points[-1], flush=True)
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
    return points


def plot(points: list[dict], path: Path) -> None:
    fig, (a, b) = figure(2)
    t = [p["t_s"] / 60 for p in points]
    a.plot(t, [p["rss_mb"] for p in points])
    a.set(xlabel="minutes", ylabel="server RSS (MB)", title="memory over the soak")
    b.plot(t, [p["fds"] for p in points])
    b.set(xlabel="minutes", ylabel="open file descriptors", title="descriptors over the soak")
    save_figure(fig, [a, b], path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=8.0, help="seconds between a session's utterances")
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=120.0, help="memory growth is counted after this")
    parser.add_argument("--variant", choices=("328", "160"), default="160")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for the server")
    args = parser.parse_args()
    files = assets(args.width, args.height, variant=args.variant)
    # admission control is not under test: every session is admitted (a busy CPU measures little capacity)
    proc, port = spawn([model_override(files, args.variant), f"device={args.device}", "server.metrics_port=-1",
                        "server.live.duty_cycle=0.01", *args.overrides])
    try:
        points = asyncio.run(soak(f"127.0.0.1:{port}", proc.pid, args))
    finally:
        proc.terminate()
        proc.wait(120)
    warm = [p for p in points if p["t_s"] >= args.warmup_s] or points
    offsets = np.array([p["av_offset_frames"] for p in points])
    import torch
    result = {"benchmark": "soak", "environment": environment(torch.device(args.device)),
              "sessions": args.sessions, "minutes": args.minutes, "every_s": args.every, "variant": args.variant,
              "frame": f"{args.width}x{args.height}",
              "rss_growth_after_warmup_mb": round(warm[-1]["rss_mb"] - warm[0]["rss_mb"], 1),
              "fds_first_last": [points[0]["fds"], points[-1]["fds"]],
              "av_offset_drift_frames": round(float(offsets.max() - offsets.min()), 3) if len(offsets) else None,
              "late_rate": round(points[-1]["late"] / max(points[-1]["frames"], 1), 5),
              "utterances": points[-1]["utterances"], "points": points}
    write(result, args.out)
    if args.out:
        plot(points, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
