"""The server's JPEG frames → RGB pixels for media libraries (simplejpeg: libjpeg-turbo, no torch)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def decode_rgb(jpeg: bytes) -> np.ndarray:
    """JPEG bytes → contiguous uint8 RGB [H, W, 3]. simplejpeg (and numpy with it) loads on first use, so a program
    that only forwards the JPEG bytes never pays for it."""
    import simplejpeg

    return simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
