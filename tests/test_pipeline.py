"""The pipeline end to end on CPU, and the rule that nothing but JPEG bytes returns to the host."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lipsync.codec import audio
from lipsync.model import audio_features
from lipsync.model.engines import EngineConfig
from lipsync.model.pipeline import load_pipeline
from lipsync.runtime.render import synthesize


class HostCopyForbidden(TorchFunctionMode):
    """Fails on .cpu()/.numpy()/.item()/.tolist() of anything but a 1-D uint8 JPEG byte stream, and on .to()
    that moves a device tensor to the CPU (the pipeline's `.to(its_device)` is a no-op on CPU)."""

    BANNED = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.tolist}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        is_jpeg = tensor is not None and tensor.dtype == torch.uint8 and tensor.dim() == 1
        to_cpu = func is torch.Tensor.to and tensor is not None and tensor.device.type != "cpu" and any(
            str(a) == "cpu" for a in list(args[1:]) + [kwargs.get("device")] if a is not None)
        if (func in self.BANNED or to_cpu) and not is_jpeg:
            shape = tuple(tensor.shape) if tensor is not None else ""
            raise AssertionError(f"host transfer {func.__name__} of {shape}")
        return func(*args, **kwargs)


class NoScalarSync(TorchDispatchMode):
    """Fails on any tensor→Python scalar conversion (item(), bool(tensor), int(tensor))."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("tensor → Python scalar inside the pipeline")
        return func(*args, **(kwargs or {}))


def test_synthesize_returns_every_frame(eager_pipeline, speech):
    wave = speech[:9000]
    result = synthesize(eager_pipeline, wave, start_frame=1, quality=80)
    assert len(result.frames) == audio_features.frame_count(9000)
    assert [f.index for f in result.frames] == list(range(len(result.frames)))
    assert [f.avatar_frame for f in result.frames[:7]] == [1, 2, 3, 4, 5, 4, 3]
    for f in result.frames:
        img = cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (192, 256, 3)
    assert set(result.timings_ms) >= {"audio", "inference", "composite", "encode", "total"}


def test_no_host_copies_between_pcm_and_jpeg(eager_pipeline, speech):
    pcm = (speech[:8000].numpy() * 32767).astype(np.int16).tobytes()
    wave = audio.decode_pcm(pcm, audio.AudioFormat("s16le", 16000, 1))
    with HostCopyForbidden(), NoScalarSync():
        result = synthesize(eager_pipeline, wave, quality=75, inline=True)
    assert len(result.frames) == audio_features.frame_count(8000)
    # the guards really fire
    with pytest.raises(AssertionError, match="host transfer"), HostCopyForbidden():
        wave[:4].numpy()
    with pytest.raises(AssertionError, match="scalar"), NoScalarSync():
        wave.sum().item()


def test_engine_output_matches_plain_model(eager_pipeline, weights):
    from lipsync.model.networks import load_generator
    net = load_generator(weights["328"])
    feats, ids = torch.rand(3, 32, 16, 16), [0, 1, 2]
    with torch.no_grad():
        ref = net(eager_pipeline.avatar.model_inputs(ids), feats)
    torch.testing.assert_close(eager_pipeline.infer(feats, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipeline_keeps_frames_on_the_device(tiny_spec, speech):
    cuda = load_pipeline(tiny_spec, EngineConfig.from_dict({"backend": "eager"}), "cuda", micro_batch=32)
    assert cuda.avatar.frames.is_cuda and cuda.avatar.templates.is_cuda
    pcm = (speech[:8000].numpy() * 32767).astype(np.int16).tobytes()
    wave = audio.decode_pcm(pcm, audio.AudioFormat("s16le", 16000, 1), device="cuda")
    with HostCopyForbidden(), NoScalarSync():
        result = synthesize(cuda, wave, quality=75, inline=True)
    assert len(result.frames) == audio_features.frame_count(8000)
    for f in result.frames:
        assert cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (192, 256, 3)
