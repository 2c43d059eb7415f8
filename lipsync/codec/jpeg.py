"""JPEG encoding (SPEC §8 step 5) with torchvision's kernels: nvJPEG on CUDA, libjpeg on CPU, one batched call."""
from __future__ import annotations

import torch
from torch import Tensor

from lipsync.codec.image_kernels import decode_jpeg, encode_jpeg

MIN_QUALITY, MAX_QUALITY = 1, 100


def encode_frames(frames: Tensor, quality: int = 75) -> list[bytes]:
    """uint8 RGB frames [B,3,H,W] on any device → JPEG bytes; the only device→host copy of the pipeline."""
    return encode_images(list(frames.unbind(0)), quality)


def encode_images(images: list[Tensor], quality: int = 75) -> list[bytes]:
    """uint8 RGB images [3,h,w] of any sizes, on one device → JPEG bytes, in one batched call and one transfer."""
    if not MIN_QUALITY <= quality <= MAX_QUALITY:
        raise ValueError(f"JPEG quality {quality} is outside {MIN_QUALITY}..{MAX_QUALITY}")
    if not images:
        return []
    dense = [_dense(image) for image in images]
    if dense[0].is_cuda:
        encoded = _encode_on_gpu(dense, quality)
    else:
        encoded = encode_jpeg(dense, quality)
    sizes = [e.numel() for e in encoded]
    blob = torch.cat(encoded).cpu().numpy().tobytes()  # one transfer for the whole batch
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return [blob[a:b] for a, b in zip(offsets, offsets[1:])]


def _encode_on_gpu(images: list[Tensor], quality: int) -> list[Tensor]:
    """nvJPEG through torchvision, ordered with the caller's stream. torchvision encodes on a stream of its own
    that does not wait for the caller's (the composite that made `images` may still be running there), and copies
    each bitstream out on the legacy default stream, which the caller's non-blocking streams do not wait for. So:
    the caller's stream is finished first (the composite's event, waited for on this thread, which nvJPEG blocks
    per image anyway), and the default stream after, before anything reads the bitstreams."""
    device = images[0].device
    composed = torch.cuda.Event()
    composed.record(torch.cuda.current_stream(device))
    composed.synchronize()
    encoded = encode_jpeg(images, quality)
    torch.cuda.default_stream(device).synchronize()
    return encoded


def _dense(image: Tensor) -> Tensor:
    """An image as the encoder reads it without a copy of its own. On the CPU libjpeg takes interleaved pixels and
    torchvision transposes a planar image first: an image already interleaved in memory (the CPU avatar's frames
    and their composites) goes as it is — a 1280×720 frame in 1.6 ms instead of 4.0 on this project's 2-core EPYC,
    the same bytes. Elsewhere (nvJPEG) and for other layouts: contiguous planar."""
    if image.device.type == "cpu" and image.permute(1, 2, 0).is_contiguous():
        return image
    return image.contiguous()


def decode_rgb(jpeg: bytes) -> Tensor:
    """JPEG bytes (a frame the server sent) → contiguous uint8 RGB [H,W,3] on the CPU, for media libraries."""
    return decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)).permute(1, 2, 0).contiguous()
