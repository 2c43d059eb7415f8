"""Compositing (SPEC §8 steps 1–4): paste generator predictions back into avatar frames, batched on the device."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from lipsync.model.avatar import Avatar

TEMPLATE_BORDER = 4


def resize_bicubic(images: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 [...,C,h,w] → uint8 [...,C,H,W]; bicubic (a=−0.75, align_corners=False, no antialias) like
    OpenCV INTER_CUBIC, rounded and clamped."""
    batched = images if images.dim() == 4 else images[None]
    out = F.interpolate(batched.float(), size=size, mode="bicubic", align_corners=False, antialias=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if images.dim() == 4 else out[0]


def predictions_to_rgb8(predictions: Tensor) -> Tensor:
    """Generator output [B,3,S,S] BGR in (0,1) → uint8 RGB by truncation (§8 step 1)."""
    return (predictions.float() * 255.0).to(torch.uint8).flip(1)


def composite(avatar: Avatar, predictions: Tensor, frame_ids: list[int]) -> Tensor:
    """Paste each prediction into its avatar frame: [B,3,S,S] BGR float → frames [B,3,H,W] uint8 RGB."""
    side, border = avatar.size, TEMPLATE_BORDER
    index = avatar.index(frame_ids)
    templates = avatar.templates[index]  # advanced indexing: already a copy
    templates[:, :, border:border + side, border:border + side] = predictions_to_rgb8(predictions)
    out = avatar.frames[index]
    # Frames whose rectangles have the same size are resized in one call.
    groups: dict[tuple[int, int], list[int]] = {}
    for b, f in enumerate(frame_ids):
        x1, y1, x2, y2 = avatar.rects[f]
        groups.setdefault((y2 - y1, x2 - x1), []).append(b)
    for size, members in groups.items():
        patches = resize_bicubic(templates[members], size)
        for patch, b in zip(patches, members):
            f = frame_ids[b]
            x1, y1, x2, y2 = avatar.rects[f]
            if avatar.alpha is None:
                out[b, :, y1:y2, x1:x2] = patch
            else:
                alpha = avatar.alpha[f]
                region = out[b, :, y1:y2, x1:x2].float()
                out[b, :, y1:y2, x1:x2] = (alpha * patch.float() + (1 - alpha) * region).round_().to(torch.uint8)
    return out
