"""`lipsync render` end to end on a tiny avatar, run as a user would: the console command in a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import SPEECH

av = pytest.importorskip("av", reason="PyAV is not installed (render writes MP4 with it)")
from torchvision.io import decode_image

from lipsync.codec import audio
from lipsync.model import audio_features


@pytest.fixture(scope="module")
def short_wav(tmp_path_factory):
    """The first 0.6 s of the committed speech sample, at its original 22.05 kHz."""
    data, fmt = audio.read_wav(SPEECH)
    out = tmp_path_factory.mktemp("wav") / "short.wav"
    pcm = data[: int(0.6 * fmt.sample_rate) * 2]
    import wave
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(fmt.sample_rate)
        w.writeframes(pcm)
    return out


def test_render_frames_and_mp4(weights, tiny_avatar, short_wav, tmp_path):
    frames_dir, mp4 = tmp_path / "frames", tmp_path / "out.mp4"
    cmd = [sys.executable, "-m", "lipsync", "render", "--checkpoint", str(weights["328"]),
           "--audio-encoder", str(weights["encoder"]), "--avatar", str(tiny_avatar), "--audio", str(short_wav),
           "--start-frame", "1", "--out", str(mp4), "--frames-out", str(frames_dir), "--format", "png",
           "--device", "cpu", "--backend", "onnxruntime"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    wave = audio.load_wav(short_wav)
    expected = audio_features.frame_count(wave.numel())
    files = sorted(frames_dir.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(expected)]
    rects = json.loads((tiny_avatar / "crop_rects.json").read_text())
    for i, f in enumerate(files):
        out = cv2.imread(str(f))
        assert out is not None and out.shape == (192, 256, 3)
        src_index = [1, 2, 3, 4, 5, 4, 3, 2, 1, 0][i % 10]  # pingpong from start frame 1 over 6 frames
        src = decode_image(str(tiny_avatar / f"frame_{src_index:04d}.jpg")).permute(1, 2, 0).numpy()[..., ::-1]
        x1, y1, x2, y2 = rects[src_index]
        outside = np.ones((192, 256), bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(out[outside], src[outside]), f"frame {i}: pixels outside the crop changed"
        assert not np.array_equal(out[y1:y2, x1:x2], src[y1:y2, x1:x2])
    with av.open(str(mp4)) as container:
        kinds = sorted(s.type for s in container.streams)
        assert kinds == ["audio", "video"]
        assert sum(1 for _ in container.decode(video=0)) == expected
    assert f"video: {mp4}" in done.stdout


def test_render_reports_bad_input_cleanly(weights, tiny_avatar, tmp_path):
    cmd = [sys.executable, "-m", "lipsync", "render", "--checkpoint", str(tmp_path / "missing.pth"),
           "--audio-encoder", str(weights["encoder"]), "--avatar", str(tiny_avatar), "--audio", str(SPEECH),
           "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"checkpoint not found: {tmp_path / 'missing.pth'}" in done.stderr
    assert "Traceback" not in done.stderr


def _encode_m4a(wav, out) -> None:
    """The short WAV as AAC in an .m4a, written with PyAV."""
    from fractions import Fraction
    data, fmt = audio.read_wav(wav)
    samples = np.frombuffer(data, np.int16).astype(np.float32) / 32768.0
    with av.open(str(out), "w") as container:
        stream = container.add_stream("aac", rate=fmt.sample_rate, layout="mono")
        step = stream.codec_context.frame_size or 1024
        for pts in range(0, len(samples), step):
            frame = av.AudioFrame.from_ndarray(samples[None, pts:pts + step].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = fmt.sample_rate, pts, Fraction(1, fmt.sample_rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_render_takes_any_audio_file(weights, tiny_avatar, short_wav, tmp_path):
    m4a = tmp_path / "speech.m4a"
    _encode_m4a(short_wav, m4a)
    wave = audio.load_audio(m4a)
    assert abs(wave.numel() - audio.load_wav(short_wav).numel()) < 0.1 * 16000  # codec padding at most
    done = subprocess.run([sys.executable, "-m", "lipsync", "render", "--checkpoint", str(weights["328"]),
                           "--audio-encoder", str(weights["encoder"]), "--avatar", str(tiny_avatar), "--audio",
                           str(m4a), "--frames-out", str(tmp_path / "f"), "--format", "jpeg", "--device", "cpu",
                           "--backend", "onnxruntime"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "f").glob("*.jpg"))) == audio_features.frame_count(wave.numel())


def test_render_checks_the_audio_before_loading_the_model(tiny_avatar, tmp_path):
    done = subprocess.run([sys.executable, "-m", "lipsync", "render", "--checkpoint", str(tmp_path / "none.pth"),
                           "--audio-encoder", str(tmp_path / "none.pth"), "--avatar", str(tiny_avatar),
                           "--audio", str(tmp_path / "missing.mp3"), "--out", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"audio file not found: {tmp_path / 'missing.mp3'}" in done.stderr
    assert "checkpoint" not in done.stderr


@pytest.mark.parametrize("name,message", [("demo server.port=1", "must name a file conf/models/NAME.yaml"),
                                          ("../../etc/x", "must name a file conf/models/NAME.yaml"),
                                          ("nosuchmodel", "nosuchmodel")])
def test_render_model_names_a_declared_file(name, message, tmp_path):
    """`--model` is a file name under conf/models/: override syntax or a path is refused before anything loads."""
    done = subprocess.run([sys.executable, "-m", "lipsync", "render", "--model", name, "--audio",
                           str(SPEECH), "--out", str(tmp_path / "o.mp4")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stdout + done.stderr
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("command,default", [(["render"], "(default: pingpong)"), (["client"], "(default: demo)"),
                                             (["serve"], "(default: False)"), (["export"], "(default: 328)")])
def test_help_shows_defaults(command, default, capsys):
    """The console entry point's own parser (in process: a subprocess per flag would only re-import torch)."""
    from lipsync.apps.cli import main
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0 and default in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("width,height,layout", [(67, 49, "planar"), (68, 50, "interleaved"), (67, 49, "interleaved")])
def test_mp4_writer_keeps_each_colour_in_its_channel(tmp_path, width, height, layout):
    """Frames go to x264 as planar G,B,R straight from a planar CHW tensor, or as packed RGB from one interleaved
    in memory (the CPU avatar's); decoded, each channel is where it was (against OpenCV's own colour conversion of
    the decoded frame, not ours). An odd size is cropped to even."""
    import torch

    from lipsync.codec.video import Mp4Writer
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    frame = (torch.stack([x, y, 1 - x * y]) * 255).round().to(torch.uint8)  # R, G, B: three different ramps
    frames = frame[None].repeat(3, 1, 1, 1)
    if layout == "interleaved":
        frames = frames.contiguous(memory_format=torch.channels_last)
    writer = Mp4Writer(tmp_path / "colours.mp4", width, height, with_audio=False, crf=10)
    writer.write(frames)
    writer.close()
    with av.open(str(tmp_path / "colours.mp4")) as container:
        decoded = [f.to_ndarray(format="yuv420p") for f in container.decode(video=0)]
    assert len(decoded) == 3
    rgb = cv2.cvtColor(decoded[0], cv2.COLOR_YUV2RGB_I420).transpose(2, 0, 1).astype(np.float64)
    expected = frame[:, :height - height % 2, :width - width % 2].numpy().astype(np.float64)
    assert rgb.shape == expected.shape
    for channel in range(3):  # every channel within a few levels of its ramp (x264 at crf 10, 4:2:0 chroma)
        assert np.abs(rgb[channel] - expected[channel]).mean() < 6, channel
