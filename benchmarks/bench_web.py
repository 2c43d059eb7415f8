"""What `lipsync web` costs per browser session on this machine's CPU: each 40 ms frame arrives as JPEG, is decoded
(torchvision) into a video frame and encoded by aiortc for WebRTC (VP8 and H.264, the codecs browsers offer; aiortc
sends VP8 to chromium by default), and its audio by Opus.

Frames are the synthetic avatar's (the same each run), JPEG quality 75 as the server sends them, at each size.
Reported per frame: decode ms, encode ms per codec, and the share of one core a 25 fps session needs.

    python benchmarks/bench_web.py --out benchmarks/results/web-cpu.json
"""
from __future__ import annotations

import argparse
import fractions
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, write  # noqa: E402
from lipsync.apps.web.bridge import jpeg_to_video_frame  # noqa: E402
from lipsync.model.demo import _draw_frame  # noqa: E402


def jpegs(width: int, height: int, count: int) -> list[bytes]:
    from torchvision.io import encode_jpeg
    images = [_draw_frame(i, count, width, height)[0] for i in range(count)]
    return [bytes(encode_jpeg(torch.from_numpy(img).permute(2, 0, 1).contiguous(), quality=75).numpy())
            for img in images]


def per_frame_ms(step, count: int) -> float:
    start = time.perf_counter()
    for k in range(count):
        step(k)
    return (time.perf_counter() - start) * 1e3 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="640x360,1280x720")
    parser.add_argument("--frames", type=int, default=250, help="frames encoded per codec and size (10 s)")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as `lipsync web` runs
    import av
    from aiortc.codecs import get_encoder
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    rows = []
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        data = jpegs(width, height, 24)
        frames = [jpeg_to_video_frame(data[k % len(data)], k) for k in range(args.frames)]
        row = {"width": width, "height": height,
               "decode_ms": per_frame_ms(lambda k: jpeg_to_video_frame(data[k % len(data)], k), args.frames)}
        for mime in ("video/VP8", "video/H264"):
            encoder = get_encoder(RTCRtpCodecParameters(mimeType=mime, clockRate=90000, payloadType=96))
            sizes: list[int] = []

            def encode(k: int) -> None:
                payloads, _ = encoder.encode(frames[k], k == 0)
                sizes.append(sum(len(p) for p in payloads))
            encoder.encode(frames[0], True)  # warm up (codec open)
            row[f"{mime.split('/')[1].lower()}_ms"] = per_frame_ms(encode, args.frames)
            row[f"{mime.split('/')[1].lower()}_kbps"] = sum(sizes) * 8 / (args.frames / 25) / 1e3
        row["core_share_vp8"] = (row["decode_ms"] + row["vp8_ms"]) / 40.0
        row["core_share_h264"] = (row["decode_ms"] + row["h264_ms"]) / 40.0
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    opus = get_encoder(RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, payloadType=111, channels=2))
    pcm = (np.sin(np.arange(1920 * args.frames) * 0.05) * 8000).astype(np.int16)

    def encode_audio(k: int) -> None:
        frame = av.AudioFrame.from_ndarray(pcm[k * 1920:(k + 1) * 1920].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, k * 1920, fractions.Fraction(1, 48000)
        opus.encode(frame)
    result = {"benchmark": "web", "environment": environment(torch.device("cpu")), "frames": args.frames,
              "sizes": rows, "opus_ms_per_40ms": per_frame_ms(encode_audio, args.frames)}
    print(f"opus: {result['opus_ms_per_40ms']:.2f} ms per 40 ms", flush=True)
    write(result, args.out)


if __name__ == "__main__":
    main()
