"""MP4 output with PyAV: H.264 frames at 25 fps with the speech muxed in as AAC."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

try:
    import av
except ImportError as exc:  # the MP4 writer is the one user of PyAV on the serving side: `render`, `client --out`
    raise ImportError(f"writing MP4 needs PyAV: pip install av ({exc})") from exc

from lipsync.timebase import FPS, SAMPLE_RATE


class Mp4Writer:
    """Append uint8 RGB frames [N,3,H,W] (any device); `close` muxes the waveform (mono, `sample_rate` Hz)."""

    def __init__(self, path: str | Path, width: int, height: int, with_audio: bool = True, crf: int = 20,
                 sample_rate: int = SAMPLE_RATE, preset: str = "veryfast"):
        self.path = Path(path).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        self.video = self.container.add_stream("libx264", rate=FPS)
        self.video.width, self.video.height = width - width % 2, height - height % 2
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": str(crf), "preset": preset}  # x264 speed/size trade-off
        self.frames = 0
        self.audio = None
        self.sample_rate = sample_rate
        if with_audio:  # streams must exist before the first packet is muxed
            self.audio = self.container.add_stream("aac", rate=sample_rate, layout="mono")

    def write(self, frames: torch.Tensor) -> None:
        w, h = self.video.width, self.video.height
        for image in frames[:, :, :h, :w].cpu():
            pixels = image.permute(1, 2, 0)
            if pixels.is_contiguous():  # interleaved in memory (the CPU avatar's frames): handed over as they are
                frame = av.VideoFrame.from_ndarray(pixels.numpy(), format="rgb24")
            else:
                # Planar G, B, R straight from the CHW tensor: no interleaving copy (it cost more than the swscale
                # conversion to yuv420p that the encoder does next).
                frame = av.VideoFrame(w, h, "gbrp")
                for plane, channel in zip(frame.planes, (1, 2, 0)):
                    rows = image[channel].numpy()
                    if plane.line_size != w:  # rows padded for alignment
                        rows = np.pad(rows, ((0, 0), (0, plane.line_size - w)))
                    plane.update(np.ascontiguousarray(rows))
            frame.pts = self.frames
            self.frames += 1
            for packet in self.video.encode(frame):
                self.container.mux(packet)

    def close(self, wave: torch.Tensor | None = None) -> Path:
        for packet in self.video.encode():
            self.container.mux(packet)
        if self.audio is not None:
            samples = (wave.float().cpu().numpy() if wave is not None else np.zeros(0)).astype(np.float32)
            step = self.audio.codec_context.frame_size or 1024
            for pts in range(0, len(samples), step):
                chunk = samples[pts:pts + step]
                frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = self.sample_rate, pts, Fraction(1, self.sample_rate)
                for packet in self.audio.encode(frame):
                    self.container.mux(packet)
            for packet in self.audio.encode(None):
                self.container.mux(packet)
        self.container.close()
        return self.path
