"""Avatars (SPEC §7): frames + crop rectangles, validated, held on the device as uint8, with per-frame crop
templates and generator inputs precomputed once."""
from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from lipsync.codec.image_kernels import decode_image
from lipsync.model.compose import TEMPLATE_BORDER, resize_bicubic
from lipsync.model.networks import INPUT_SIZE, TEMPLATE_SIZE
from lipsync.model.transfer import index_tensor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
SEQUENCES = ("pingpong", "loop")
# Mouth region blanked in the generator's second input, as numpy slices [rows, cols] (§7.3 step 3).
MASK_SLICES = {"328": (slice(5, 310), slice(5, 315)), "160": (slice(5, 150), slice(5, 155))}


class AvatarError(ValueError):
    """An avatar source that cannot be used; the message names the offending file."""


# --------------------------------------------------------------------------- sequencing (§7.4)
def avatar_frame(n: int, frame_total: int, sequence: str = "pingpong") -> int:
    """Avatar frame drawn for position n = start_frame + output index."""
    if frame_total == 1:
        return 0
    if sequence == "loop":
        return n % frame_total
    period = 2 * (frame_total - 1)
    t = n % period
    return t if t <= frame_total - 1 else period - t


# --------------------------------------------------------------------------- sources
def rect_from_landmarks(path: Path) -> list[int]:
    """Crop square from a SyncTalk_2D 110-point .lms file: x1=lms[1].x, y1=lms[52].y, x2=lms[31].x, y2=y1+w."""
    try:
        points = [[int(float(v)) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]
    except ValueError as exc:
        raise AvatarError(f"{path}: not a landmark file ({exc})") from None
    if len(points) < 53 or any(len(p) != 2 for p in points):
        raise AvatarError(f"{path}: expected 110 'x y' landmark lines, found {len(points)}")
    x1, y1, x2 = points[1][0], points[52][1], points[31][0]
    return [x1, y1, x2, y1 + (x2 - x1)]


def _numbered(files: Iterable[Path], pattern: str) -> dict[int, Path]:
    found: dict[int, Path] = {}
    regex = re.compile(pattern)
    for f in files:
        m = regex.fullmatch(f.name)
        if m and f.suffix.lower() in IMAGE_SUFFIXES + (".lms",):
            found[int(m.group(1))] = f
    return found


def _contiguous(numbered: dict[int, Path], where: Path, example: str) -> list[Path]:
    if not numbered:
        raise AvatarError(f"no frames found in {where} (expected files like {example})")
    first = min(numbered)
    if first not in (0, 1):
        raise AvatarError(f"frames in {where} start at number {first}; expected 0 or 1")
    last = max(numbered)
    missing = [i for i in range(first, last + 1) if i not in numbered]
    if missing:
        name = example.replace("N", str(missing[0]))
        raise AvatarError(f"missing frame {where / name} ({len(missing)} missing between {first} and {last})")
    return [numbered[i] for i in range(first, last + 1)]


@dataclass
class AvatarSource:
    """Where an avatar's frames come from: image files or one video, plus one rectangle per frame."""
    root: Path
    images: list[Path] | None
    video: Path | None
    rects: list[list[int]]
    alpha: Path | None

    @property
    def frame_count(self) -> int:
        return len(self.rects)


def find_source(path: str | Path) -> AvatarSource:
    """Recognise an avatar directory or a SyncTalk_2D dataset directory and validate its layout."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise AvatarError(f"avatar directory not found: {root}")
    alpha = root / "alpha.png"
    alpha = alpha if alpha.is_file() else None
    if (root / "full_body_img").is_dir():
        images = _contiguous(_numbered((root / "full_body_img").iterdir(), r"(\d+)\.\w+"),
                             root / "full_body_img", "N.jpg")
        lms_dir = root / "landmarks"
        if not lms_dir.is_dir():
            raise AvatarError(f"SyncTalk_2D dataset {root} has no landmarks/ directory")
        rects = []
        for img in images:
            lms = lms_dir / f"{img.stem}.lms"
            if not lms.is_file():
                raise AvatarError(f"missing landmark file {lms} for frame {img}")
            rects.append(rect_from_landmarks(lms))
        return AvatarSource(root, images, None, rects, alpha)
    rect_file = root / "crop_rects.json"
    if not rect_file.is_file():
        raise AvatarError(f"{root} is neither an avatar directory (no crop_rects.json) "
                          "nor a SyncTalk_2D dataset (no full_body_img/)")
    try:
        rects = json.loads(rect_file.read_text())
        rects = [[int(v) for v in r] for r in rects]
        if not rects or any(len(r) != 4 for r in rects):
            raise ValueError("expected a non-empty list of [x1, y1, x2, y2]")
    except (ValueError, TypeError) as exc:
        raise AvatarError(f"{rect_file}: {exc}") from None
    videos = sorted(f for f in root.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES)
    if videos:
        return AvatarSource(root, None, videos[0], rects, alpha)
    images = _contiguous(_numbered(root.iterdir(), r"frame_(\d+)\.\w+"), root, "frame_N.jpg")
    if len(images) != len(rects):
        raise AvatarError(f"{rect_file} has {len(rects)} rectangles but {root} has {len(images)} frames")
    return AvatarSource(root, images, None, rects, alpha)


def _read_image(path: Path) -> Tensor:
    try:
        return decode_image(path, "rgb")
    except Exception as exc:
        raise AvatarError(f"cannot decode image {path}: {exc}") from None


def _read_video(path: Path, progress: bool) -> list[Tensor]:
    import av

    try:
        with av.open(str(path)) as container:
            return [torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
                    for frame in tqdm(container.decode(video=0), desc=f"decoding {path.name}", unit="frame",
                                      disable=None if progress else True)]
    except av.error.FFmpegError as exc:
        raise AvatarError(f"cannot decode video {path}: {exc}") from None


# --------------------------------------------------------------------------- the loaded avatar
class Avatar:
    """Frames [F,3,H,W] uint8 RGB on the device (channels-last in memory on the CPU), rectangles, crop templates
    [F,3,T,T] and optional alpha."""

    def __init__(self, frames: Tensor, rects: list[list[int]], variant: str = "328", sequence: str = "pingpong",
                 alpha: Tensor | None = None, name: str = "avatar", progress: bool = False):
        if sequence not in SEQUENCES:
            raise AvatarError(f"unknown sequence {sequence!r}; expected one of {SEQUENCES}")
        if frames.device.type == "cpu":  # held interleaved (HWC in memory): the CPU's JPEG and H.264 encoders read
            frames = frames.contiguous(memory_format=torch.channels_last)  # pixels so (see codec.jpeg)
        self.frames, self.rects, self.variant, self.sequence, self.name = frames, rects, variant, sequence, name
        self.size = INPUT_SIZE[variant]
        self.template_size = TEMPLATE_SIZE[variant]
        height, width = frames.shape[2:]
        for i, (x1, y1, x2, y2) in enumerate(rects):
            if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
                raise AvatarError(f"{name}: crop rectangle {i} {[x1, y1, x2, y2]} lies outside the "
                                  f"{width}×{height} frame")
        side = self.template_size
        self.templates = torch.stack([
            resize_bicubic(frames[i, :, y1:y2, x1:x2], (side, side))
            for i, (x1, y1, x2, y2) in enumerate(tqdm(rects, desc=f"{name}: crop templates", unit="frame",
                                                       disable=None if progress else True))])
        # Per-frame alpha resized to each rectangle; None means α ≡ 1 (hard paste).
        self.alpha: list[Tensor] | None = None
        if alpha is not None:
            self.alpha = [torch.nn.functional.interpolate(alpha[None, None].float(), size=(y2 - y1, x2 - x1),
                                                          mode="bilinear", align_corners=False)[0]
                          for x1, y1, x2, y2 in rects]

    @property
    def frame_count(self) -> int:
        return len(self.rects)  # one per frame; a list's length, not a tensor's shape (asked every live slot)

    @property
    def device(self) -> torch.device:
        return self.frames.device

    def frame_for(self, n: int) -> int:
        return avatar_frame(n, self.frame_count, self.sequence)

    def frames_for(self, start_frame: int, first: int, count: int) -> list[int]:
        """Avatar frames of output frames first..first+count-1 for a request starting at `start_frame`."""
        return [self.frame_for(start_frame + i) for i in range(first, first + count)]

    def index(self, frame_ids: list[int]) -> Tensor:
        """Frame ids as an index tensor on the avatar's device (from pinned memory, without a host sync)."""
        return index_tensor(frame_ids, self.device)

    def model_inputs(self, frame_ids: list[int]) -> Tensor:
        """Generator visual input [B,6,S,S] float BGR in [0,1]: the ROI and the ROI with the mouth blanked."""
        b, s = TEMPLATE_BORDER, self.size
        # index_select, not advanced indexing: on the CPU the latter gathers element by element (20× slower)
        roi = self.templates.index_select(0, self.index(frame_ids))[:, :, b:b + s, b:b + s].flip(1)
        masked = roi.clone()
        rows, cols = MASK_SLICES[self.variant]
        masked[:, :, rows, cols].zero_()  # (`= 0` would copy a host scalar to the device)
        return torch.cat([roi, masked], dim=1).float().div_(255.0)

    def empty_frames(self, count: int) -> Tensor:
        """Uninitialised frames [count,3,H,W] uint8 laid out as this avatar's (channels-last on the CPU), for
        composites the encoders read without a conversion."""
        layout = torch.channels_last if self.frames.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        return torch.empty((count, *self.frames.shape[1:]), dtype=self.frames.dtype, device=self.frames.device,
                           memory_format=layout)

    @property
    def nbytes(self) -> int:
        held = [self.frames, self.templates] + (self.alpha or [])
        return sum(t.numel() * t.element_size() for t in held)


def load_avatar(path: str | Path, variant: str = "328", sequence: str = "pingpong",
                device: str | torch.device = "cpu", feather: int = 0, progress: bool = False,
                compose: str = "paste") -> Avatar:
    """Load and validate an avatar directory or SyncTalk_2D dataset onto `device`. The paste's alpha: the
    avatar's alpha.png when it ships one, else `compose: blend`'s soft mask, else `feather`'s ramp, else none
    (SyncTalk_2D's hard paste)."""
    source = find_source(path)
    if source.video is not None:
        frames = _read_video(source.video, progress)
        if len(frames) != source.frame_count:
            raise AvatarError(f"{source.root / 'crop_rects.json'} has {source.frame_count} rectangles but "
                              f"{source.video} has {len(frames)} frames")
    else:
        assert source.images is not None
        # Decoded on several threads (the decoder releases the GIL): 50 frames at 1280x720 in 0.10 s instead of
        # 0.16 on 2 cores, and a long avatar on a many-core GPU host loads in a fraction of the time
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="avatar-decode") as pool:
            frames = list(tqdm(pool.map(_read_image, source.images), total=len(source.images),
                               desc=f"loading {source.root.name}", unit="frame", disable=None if progress else True))
    shape = frames[0].shape
    for i, frame in enumerate(frames):
        if frame.shape != shape:
            where = source.images[i] if source.images else f"{source.video} frame {i}"
            raise AvatarError(f"{where} is {frame.shape[2]}×{frame.shape[1]} but the first frame is "
                              f"{shape[2]}×{shape[1]}: all frames must have the same size")
    # the decoders give HWC memory: stacked as it is, the CPU avatar's layout (a planar stack and a conversion back
    # cost 0.6 s for 150 frames at 1280x720 on 2 cores, this 0.14 s); planar on a GPU, as nvJPEG reads it
    stacked = torch.stack([frame.permute(1, 2, 0) for frame in frames]).permute(0, 3, 1, 2).to(device)
    if stacked.device.type != "cpu":
        stacked = stacked.contiguous()
    side = TEMPLATE_SIZE[variant]
    alpha = None
    if source.alpha is not None:
        mask = decode_image(source.alpha, "gray").float().div(255.0)
        alpha = torch.nn.functional.interpolate(mask[None], size=(side, side), mode="bilinear")[0, 0]
    elif compose == "blend":
        alpha = blend_mask(side)
    elif feather > 0:
        alpha = feather_mask(side, feather)
    return Avatar(stacked, source.rects, variant, sequence, alpha.to(device) if alpha is not None else None,
                  name=source.root.name, progress=progress)


COMPOSE_MODES = ("paste", "blend")
BLEND_INSET, BLEND_RAMP = 16, 56  # template pixels (of 328): kept from the frame, then blended over


def blend_mask(side: int, inset: int = BLEND_INSET, ramp: int = BLEND_RAMP) -> Tensor:
    """Template-space alpha of `compose: blend`: 0 over the square's outer `inset` pixels (the generator's border
    pixels, which its training never ties to the frame, stay the avatar's own), then a smooth (smoothstep) rise to
    1 over `ramp` pixels, along a rounded square (an L4 "superellipse", so the corners show no crease). The mouth
    and jaw, well inside, are the generator's alone."""
    centre = (side - 1) / 2
    u = (torch.arange(side).float() - centre) / centre
    r = (u[:, None] ** 4 + u[None, :] ** 4) ** 0.25  # 1 on the square's edge midpoints, rounded at the corners
    distance = (1 - r).clamp(min=0) * centre  # pixels in from the rounded edge
    t = ((distance - inset) / ramp).clamp(0, 1)
    return t * t * (3 - 2 * t)


def feather_mask(side: int, feather: int) -> Tensor:
    """Template-space alpha: 1 inside, ramping linearly to 0 over `feather` pixels at the border."""
    ramp = ((torch.arange(side) + 0.5).minimum(side - 0.5 - torch.arange(side).float()) / feather).clamp(0, 1)
    return ramp[:, None].minimum(ramp[None, :])
