"""Avatar import and model inputs (SPEC §7) against OpenCV and literal transcriptions."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from lipsync.model.avatar import AvatarError, avatar_frame, find_source, load_avatar


def pingpong_reference(start: int, count: int, frames: int) -> list[int]:
    """SyncTalk_2D's inference loop: walk forward, bounce at the ends."""
    if frames == 1:
        return [0] * count
    seq, idx, step = [], 0, 1
    for _ in range(start + count):
        seq.append(idx)
        if idx + step < 0 or idx + step > frames - 1:
            step = -step
        idx += step
    return seq[start:]


@pytest.mark.parametrize("frames", [1, 2, 40])
@pytest.mark.parametrize("start", [0, 1, 57])
def test_pingpong_sequence(frames, start):
    ours = [avatar_frame(start + i, frames) for i in range(200)]
    assert ours == pingpong_reference(start, 200, frames)


def test_loop_sequence():
    assert [avatar_frame(n, 3, "loop") for n in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_synctalk_dataset_rects_follow_landmarks(synctalk_dataset):
    source = find_source(synctalk_dataset)
    for i, rect in enumerate(source.rects):
        lms = np.loadtxt(synctalk_dataset / "landmarks" / f"{i}.lms").astype(np.int32)
        x1, y1, x2 = lms[1][0], lms[52][1], lms[31][0]
        assert rect == [x1, y1, x2, y1 + x2 - x1]
    avatar = load_avatar(synctalk_dataset)
    img = cv2.imread(str(synctalk_dataset / "full_body_img" / "3.jpg"))
    assert np.array_equal(avatar.frames[3].permute(1, 2, 0).numpy()[..., ::-1], img)


@pytest.mark.parametrize("variant,tsize,mask", [("328", 328, (slice(5, 310), slice(5, 315))),
                                                ("160", 168, (slice(5, 150), slice(5, 155)))])
def test_model_inputs_match_opencv(tiny_avatar, variant, tsize, mask):
    avatar = load_avatar(tiny_avatar, variant)
    rects = json.loads((tiny_avatar / "crop_rects.json").read_text())
    ids = [0, 4, 2]
    inputs = avatar.model_inputs(ids).numpy()
    s = tsize - 8
    assert inputs.shape == (3, 6, s, s)
    for b, f in enumerate(ids):
        x1, y1, x2, y2 = rects[f]
        img = cv2.imread(str(tiny_avatar / f"frame_{f:04d}.jpg"))  # BGR, like SyncTalk_2D
        crop = cv2.resize(img[y1:y2, x1:x2], (tsize, tsize), interpolation=cv2.INTER_CUBIC)
        roi = crop[4:4 + s, 4:4 + s].astype(np.float32)
        masked = roi.copy()
        masked[mask] = 0
        ref = np.concatenate([roi, masked], axis=2).transpose(2, 0, 1) / 255.0
        assert np.abs(inputs[b] - ref).max() <= 1 / 255 + 1e-6


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_frame_is_named(tiny_avatar, tmp_path):
    bad = _copy(tiny_avatar, tmp_path / "a")
    (bad / "frame_0002.jpg").unlink()
    with pytest.raises(AvatarError, match="missing frame .*frame_2.jpg"):
        find_source(bad)


def test_rect_outside_frame(tiny_avatar, tmp_path):
    bad = _copy(tiny_avatar, tmp_path / "a")
    rects = json.loads((bad / "crop_rects.json").read_text())
    rects[1] = [200, 100, 300, 200]
    (bad / "crop_rects.json").write_text(json.dumps(rects))
    with pytest.raises(AvatarError, match=r"rectangle 1 \[200, 100, 300, 200\] lies outside the 256×192"):
        load_avatar(bad)


def test_count_mismatch(tiny_avatar, tmp_path):
    bad = _copy(tiny_avatar, tmp_path / "a")
    rects = json.loads((bad / "crop_rects.json").read_text())
    (bad / "crop_rects.json").write_text(json.dumps(rects[:-1]))
    with pytest.raises(AvatarError, match="5 rectangles but .* has 6 frames"):
        find_source(bad)


def test_mixed_frame_sizes(tiny_avatar, tmp_path):
    bad = _copy(tiny_avatar, tmp_path / "a")
    cv2.imwrite(str(bad / "frame_0003.jpg"), np.zeros((100, 120, 3), np.uint8))
    with pytest.raises(AvatarError, match=r"frame_0003.jpg is 120×100 but the first frame is 256×192"):
        load_avatar(bad)


def test_undecodable_frame_is_named_and_the_rest_keep_their_order(tiny_avatar, tmp_path):
    """Frames decode on several threads: a broken one still stops the load naming its file, and a good avatar's
    frames come out in their files' order (each equal to OpenCV's decode of its file)."""
    bad = _copy(tiny_avatar, tmp_path / "a")
    (bad / "frame_0004.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(AvatarError, match="cannot decode image .*frame_0004.jpg"):
        load_avatar(bad)
    avatar = load_avatar(tiny_avatar)
    for i in range(avatar.frame_count):
        reference = cv2.cvtColor(cv2.imread(str(tiny_avatar / f"frame_{i:04d}.jpg")), cv2.COLOR_BGR2RGB)
        assert np.abs(avatar.frames[i].permute(1, 2, 0).numpy().astype(int) - reference).max() <= 2


def test_missing_landmarks(synctalk_dataset, tmp_path):
    bad = _copy(synctalk_dataset, tmp_path / "d")
    (bad / "landmarks" / "4.lms").unlink()
    with pytest.raises(AvatarError, match="missing landmark file .*4.lms"):
        find_source(bad)


def test_not_an_avatar(tmp_path):
    with pytest.raises(AvatarError, match="neither an avatar directory"):
        find_source(tmp_path)
    with pytest.raises(AvatarError, match="avatar directory not found: .*nowhere"):
        find_source(tmp_path / "nowhere")


def test_video_source(tiny_avatar, tmp_path):
    import av

    out = tmp_path / "v"
    out.mkdir()
    shutil.copy(tiny_avatar / "crop_rects.json", out)
    with av.open(str(out / "avatar.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 256, 192, "yuv444p"
        stream.options = {"qp": "0"}
        for f in range(6):
            img = cv2.cvtColor(cv2.imread(str(tiny_avatar / f"frame_{f:04d}.jpg")), cv2.COLOR_BGR2RGB)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    avatar = load_avatar(out)
    assert avatar.frame_count == 6 and avatar.frames.shape[1:] == (3, 192, 256)
    reference = load_avatar(tiny_avatar)
    assert (avatar.frames.int() - reference.frames.int()).abs().float().mean() < 3


def test_avatar_import_cli_converts_a_dataset(synctalk_dataset, tmp_path):
    from lipsync.apps.cli import main

    out = tmp_path / "imported"
    assert main(["avatar", "import", str(synctalk_dataset), str(out)]) == 0
    imported, original = load_avatar(out), load_avatar(synctalk_dataset)
    assert imported.rects == original.rects
    assert torch.equal(imported.frames, original.frames)
    assert main(["avatar", "info", str(out)]) == 0
