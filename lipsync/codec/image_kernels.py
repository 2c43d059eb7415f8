"""torchvision's image kernels — libjpeg/libpng on the CPU, nvJPEG on CUDA, the ones `torchvision.io` calls — loaded
without importing the torchvision package.

`import torchvision.io` runs torchvision's `__init__`, which imports torchvision.models and, through torchvision.ops,
torch._dynamo: ~7 s on 2 cores, paid by every `lipsync` command that touches an image, for code lipsync never uses.
The kernels live in one extension library of the torchvision install (`image.so`); loading it registers them as
`torch.ops.image.*`. Where that library cannot be found or loaded, `torchvision.io` is imported instead, which
registers the same kernels. The functions below are the few lipsync uses, with torchvision.io's behaviour (tests
compare them with it).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MODES = {"unchanged": 0, "gray": 1, "rgb": 3}  # torchvision.io.ImageReadMode's values
_lock = threading.Lock()
_loaded: list[Any] = []


def _library() -> Path | None:
    """torchvision's image extension library, found without executing the torchvision package."""
    spec = importlib.util.find_spec("torchvision")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(folder) / f"image{suffix}"
            if candidate.is_file():
                return candidate
    return None


def ops() -> Any:
    """`torch.ops.image`, its kernels registered (once per process)."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            library = _library()
            try:
                if library is None:
                    raise OSError("torchvision's image library was not found")
                torch.ops.load_library(str(library))
                torch.ops.image.encode_jpeg  # noqa: B018 (raises when the library did not register it)
            except (OSError, AttributeError, RuntimeError) as exc:
                log.debug("loading %s directly failed (%s); importing torchvision.io", library, exc)
                import torchvision.io  # noqa: F401 (registers the kernels)
            _loaded.append(torch.ops.image)
    return _loaded[0]


def encode_jpeg(images: list[Tensor], quality: int) -> list[Tensor]:
    """uint8 [3,H,W] images, all on one device → JPEG byte tensors on that device (nvJPEG, batched, on CUDA)."""
    if images and images[0].is_cuda:
        return ops().encode_jpegs_cuda(images, quality)
    return [ops().encode_jpeg(image, quality) for image in images]


def decode_jpeg(data: Tensor, mode: str = "unchanged") -> Tensor:
    """JPEG bytes (uint8 CPU tensor) → uint8 [C,H,W] on the CPU."""
    return ops().decode_jpeg(data, MODES[mode], False)


def read_file(path: str | Path) -> Tensor:
    """A file's bytes as a uint8 CPU tensor."""
    return ops().read_file(str(path))


def decode_image(path: str | Path, mode: str = "rgb") -> Tensor:
    """A JPEG or PNG file → uint8 [C,H,W] (`mode` rgb or gray); EXIF orientation ignored, as by torchvision.io's
    default."""
    return ops().decode_image(read_file(path), MODES[mode], False)


def write_jpeg(image: Tensor, path: str | Path, quality: int = 75) -> None:
    """uint8 [3,H,W] → a JPEG file."""
    ops().write_file(str(path), encode_jpeg([image], quality)[0].cpu())


def write_png(image: Tensor, path: str | Path, compression_level: int = 6) -> None:
    """uint8 [C,H,W] → a PNG file."""
    ops().write_file(str(path), ops().encode_png(image.cpu(), compression_level))
