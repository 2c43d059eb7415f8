"""Compositing and JPEG (SPEC §8) against an OpenCV transcription of SyncTalk_2D's paste-back."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lipsync.codec.jpeg import encode_frames
from lipsync.model.avatar import BLEND_INSET, BLEND_RAMP, Avatar, blend_mask, load_avatar
from lipsync.model.compose import composite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import TensorOps  # noqa: E402


def opencv_paste(img_bgr: np.ndarray, rect, pred_bgr: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = rect
    crop = cv2.resize(img_bgr[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    crop[4:324, 4:324] = (pred_bgr * 255).astype(np.uint8)
    out = img_bgr.copy()
    out[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    return out


def test_composite_matches_opencv_and_leaves_the_rest(tiny_avatar):
    avatar = load_avatar(tiny_avatar)
    ids = [1, 5, 1]
    pred = torch.rand(3, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    frames = composite(avatar, pred, ids)
    assert frames.dtype == torch.uint8 and frames.shape == (3, 3, 192, 256)
    for b, f in enumerate(ids):
        img = avatar.frames[f].permute(1, 2, 0).numpy()[..., ::-1].copy()
        ref = opencv_paste(img, avatar.rects[f], pred[b].permute(1, 2, 0).numpy())
        ours = frames[b].permute(1, 2, 0).numpy()[..., ::-1]
        assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
        x1, y1, x2, y2 = avatar.rects[f]
        outside = np.ones(img.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(ours[outside], img[outside])


def test_composite_into_a_reused_buffer_equals_a_fresh_one(tiny_avatar):
    """The server composites CPU frames into one buffer batch after batch: each batch equals a fresh composite,
    with nothing left over from the batch before (a larger one, other frames), in the avatar's layout."""
    avatar = load_avatar(tiny_avatar)
    buffer = torch.full((4, *avatar.frames.shape[1:]), 77, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)
    for ids in ([0, 3, 5, 2], [5, 1], [4]):
        pred = torch.rand(len(ids), 3, 320, 320, generator=generator)
        got = composite(avatar, pred, ids, out=buffer)
        assert got.data_ptr() == buffer.data_ptr() and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, composite(avatar, pred, ids))


def test_alpha_one_equals_hard_paste(tiny_avatar):
    hard = load_avatar(tiny_avatar)
    soft = load_avatar(tiny_avatar)
    soft.alpha = [torch.ones(1, r[3] - r[1], r[2] - r[0]) for r in soft.rects]
    pred = torch.rand(2, 3, 320, 320)
    assert torch.equal(composite(hard, pred, [0, 3]), composite(soft, pred, [0, 3]))


def test_feathered_alpha_blends_towards_the_frame(tiny_avatar):
    feathered = load_avatar(tiny_avatar, feather=40)
    hard = load_avatar(tiny_avatar)
    pred = torch.zeros(1, 3, 320, 320)  # black mouth region
    a, b = composite(feathered, pred, [0]), composite(hard, pred, [0])
    x1, y1, x2, y2 = hard.rects[0]
    corner = (slice(None), y1, x1)
    frame = hard.frames[0][corner].int()
    # α is small at the border: the feathered corner stays much closer to the original frame
    assert (a[0][corner].int() - frame).abs().max() * 4 < (b[0][corner].int() - frame).abs().max()
    centre = (slice(None), (y1 + y2) // 2, (x1 + x2) // 2)
    assert torch.equal(a[0][centre], b[0][centre])  # α=1 inside


def test_blend_keeps_the_squares_edge_from_the_frame_and_the_mouth_from_the_generator(tiny_avatar):
    blended, hard = load_avatar(tiny_avatar, compose="blend"), load_avatar(tiny_avatar)
    pred = torch.zeros(1, 3, 320, 320)
    a, b = composite(blended, pred, [0]), composite(hard, pred, [0])
    x1, y1, x2, y2 = hard.rects[0]
    frame = hard.frames[0]
    edge = [(y1, x1), (y1, (x1 + x2) // 2), ((y1 + y2) // 2, x2 - 1), (y2 - 1, x2 - 1)]  # corners and edges
    assert all(torch.equal(a[0][:, y, x], frame[:, y, x]) for y, x in edge)  # α = 0: the frame's own pixels
    centre = (slice(None), (y1 + y2) // 2, (x1 + x2) // 2)
    assert torch.equal(a[0][centre], b[0][centre])  # α = 1 over the mouth: exactly the paste
    alpha = blend_mask(328)
    row = alpha[164]
    assert row[:BLEND_INSET].max() == 0 and row[BLEND_INSET + BLEND_RAMP:164].min() == 1
    assert (row[:165].diff() >= 0).all()  # rises without a step back: no ring
    assert torch.equal(alpha, alpha.flip(0)) and torch.equal(alpha, alpha.T)


def mixed_avatar() -> Avatar:
    """Four 128×96 noise frames whose crop rectangles have three sizes, with the blend alpha."""
    frames = torch.randint(0, 256, (4, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    rects = [[10, 8, 50, 48], [60, 20, 96, 62], [70, 40, 110, 80], [4, 30, 58, 90]]  # 40×40, 36×42, 40×40, 54×60
    return Avatar(frames, rects, alpha=blend_mask(328))


def test_blended_batch_of_mixed_sizes_matches_opencv():
    """Frames whose rectangles differ in size, in one batch: each is the OpenCV paste blended over the frame's own
    pixels with the alpha resized by OpenCV (bilinear), within one level."""
    avatar = mixed_avatar()
    ids = [0, 1, 2, 3, 1, 0]
    pred = torch.rand(len(ids), 3, 320, 320, generator=torch.Generator().manual_seed(3))
    frames = composite(avatar, pred, ids)
    alpha = blend_mask(328).numpy()
    for b, f in enumerate(ids):
        img = avatar.frames[f].permute(1, 2, 0).numpy()[..., ::-1].copy()
        x1, y1, x2, y2 = avatar.rects[f]
        pasted = opencv_paste(img, avatar.rects[f], pred[b].permute(1, 2, 0).numpy())[y1:y2, x1:x2]
        a = cv2.resize(alpha, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)[..., None]
        ref = np.round(a * pasted + (1 - a) * img[y1:y2, x1:x2])
        ours = frames[b].permute(1, 2, 0).numpy()[..., ::-1]
        assert np.abs(ours[y1:y2, x1:x2].astype(int) - ref.astype(int)).max() <= 1
        outside = np.ones(img.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(ours[outside], img[outside])


def test_compositing_costs_each_frame_one_device_call():
    """Host work per frame: after the batch's calls per rectangle size (gather, resize, blend), each further frame
    of a size adds only its paste — on a GPU, one kernel launch, not one per step of the blend."""
    avatar = mixed_avatar()

    def device_calls(ids: list[int]) -> int:
        pred = torch.rand(len(ids), 3, 320, 320)
        with TensorOps() as calls:
            composite(avatar, pred, ids)
        return calls.count

    small, large = device_calls([0, 1, 3]), device_calls([0, 1, 3] + [0, 2] * 4)
    assert (large - small) / 8 <= 1.5, (small, large)


def test_jpeg_batch_decodes_in_rgb_order():
    frames = torch.zeros(2, 3, 64, 96, dtype=torch.uint8)
    frames[0, 0] = 255  # pure red
    frames[1, 2] = 255  # pure blue
    blobs = encode_frames(frames, quality=90)
    assert len(blobs) == 2 and all(b[:2] == b"\xff\xd8" for b in blobs)
    red = cv2.imdecode(np.frombuffer(blobs[0], np.uint8), cv2.IMREAD_COLOR)
    blue = cv2.imdecode(np.frombuffer(blobs[1], np.uint8), cv2.IMREAD_COLOR)
    assert red.shape == (64, 96, 3) and red[..., 2].mean() > 240 and red[..., 0].mean() < 15
    assert blue[..., 0].mean() > 240 and blue[..., 2].mean() < 15
    noise = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert len(encode_frames(noise, 10)[0]) < len(encode_frames(noise, 95)[0])


@pytest.mark.parametrize("compose", ["paste", "blend"])
def test_squares_are_exactly_the_composited_rectangles(tiny_avatar, compose):
    """SQUARE output's pixels equal what `composite` writes inside each crop rectangle, with its alpha; outside
    them the composited frame is the avatar's own (so pasting the square onto the avatar frame is the frame)."""
    from lipsync.model.compose import squares

    avatar = load_avatar(tiny_avatar, compose=compose)
    ids = [0, 3, 5, 3, 1]
    pred = torch.rand(len(ids), 3, 320, 320, generator=torch.Generator().manual_seed(4))
    frames = composite(avatar, pred, ids)
    got = squares(avatar, pred, ids)
    for b, f in enumerate(ids):
        x1, y1, x2, y2 = avatar.rects[f]
        assert got[b].dtype == torch.uint8 and torch.equal(got[b], frames[b, :, y1:y2, x1:x2])
        pasted = avatar.frames[f].clone()
        pasted[:, y1:y2, x1:x2] = got[b]
        assert torch.equal(pasted, frames[b])
