"""torchvision's image kernels loaded without the torchvision package: the same bytes and pixels as torchvision.io
(and OpenCV's decoder), and the server's modules import neither torchvision nor torch._dynamo."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from lipsync.codec import image_kernels
from lipsync.codec.jpeg import decode_rgb, encode_frames


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Two 48×64 RGB frames with smooth content (JPEG-friendly) and a sharp edge."""
    y, x = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
    base = torch.stack([x * 4, y * 5, (x + y) * 2]).clamp(0, 255)
    base[:, 20:30, 30:40] = 255
    return torch.stack([base, 255 - base]).to(torch.uint8)


def test_jpeg_bytes_equal_torchvision_and_decode_like_opencv(frames):
    import torchvision.io as tvio

    ours = encode_frames(frames, quality=80)
    theirs = [bytes(t.numpy()) for t in tvio.encode_jpeg(list(frames.unbind(0)), quality=80)]
    assert ours == theirs
    for jpeg in ours:
        rgb = decode_rgb(jpeg)
        reference = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(rgb.numpy().astype(int) - reference.astype(int)).max() <= 1  # libjpeg builds round alike


def test_interleaved_frames_encode_to_the_same_bytes_without_a_copy(frames):
    """The CPU avatar holds its frames channels-last (HWC in memory), which libjpeg reads as they are: the same
    JPEG bytes as the planar frames, and the avatar (as load_avatar makes it) keeps that layout."""
    from lipsync.model.avatar import Avatar

    interleaved = frames.contiguous(memory_format=torch.channels_last)
    assert encode_frames(interleaved, quality=80) == encode_frames(frames, quality=80)
    held = Avatar(frames, [[8, 8, 40, 40]] * 2, variant="160").frames
    assert held.is_contiguous(memory_format=torch.channels_last) and torch.equal(held, frames)


def test_files_round_trip_as_torchvision_reads_them(frames, tmp_path):
    import torchvision.io as tvio

    image_kernels.write_png(frames[0], tmp_path / "f.png")
    image_kernels.write_jpeg(frames[1], tmp_path / "f.jpg", quality=95)
    assert torch.equal(image_kernels.decode_image(tmp_path / "f.png", "rgb"), frames[0])
    assert torch.equal(tvio.read_image(str(tmp_path / "f.png")), frames[0])
    for name, mode, tv_mode in (("f.jpg", "rgb", tvio.ImageReadMode.RGB), ("f.png", "gray", tvio.ImageReadMode.GRAY)):
        assert torch.equal(image_kernels.decode_image(tmp_path / name, mode),
                           tvio.decode_image(str(tmp_path / name), mode=tv_mode))
    gray = cv2.imread(str(tmp_path / "f.png"), cv2.IMREAD_GRAYSCALE)
    assert np.abs(image_kernels.decode_image(tmp_path / "f.png", "gray")[0].numpy().astype(int) - gray).max() <= 1


def test_the_server_render_and_avatar_modules_do_not_import_torchvision():
    code = ("import sys, lipsync.api.server, lipsync.runtime.render, lipsync.model.avatar, lipsync.codec.jpeg\n"
            "from lipsync.codec.jpeg import encode_frames\n"
            "import torch\n"
            "assert encode_frames(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))[0][:2] == b'\\xff\\xd8'\n"
            "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'onnxscript') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
