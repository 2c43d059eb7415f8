"""ONNX export (SPEC §12): generator inputs `input` [B,6,S,S] + `audio` [B,32,16,16] → `output`; encoder
`mel_spectrogram` [B,1,80,16] → `audio_features` [B,512]; dynamic batch; validated with onnx.checker."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lipsync.model.engines import export_onnx

log = logging.getLogger(__name__)
OPSET = 18
MAX_EXPORT_BATCH = 1024


def _export(net: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str], output_name: str,
            path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(net, example, path, input_names, output_name, path.name, opset=OPSET, max_batch=MAX_EXPORT_BATCH)
    onnx.checker.check_model(str(path))
    return path


def export_generator(net: nn.Module, path: str | Path) -> Path:
    size = 320 if net.variant == "328" else 160
    example = (torch.rand(2, 6, size, size), torch.rand(2, 32, 16, 16))
    return _export(net, example, ["input", "audio"], "output", Path(path))


def export_audio_encoder(net: nn.Module, path: str | Path) -> Path:
    return _export(net, (torch.rand(2, 1, 80, 16),), ["mel_spectrogram"], "audio_features", Path(path))


def max_error_onnxruntime(path: Path, net: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |onnxruntime − eager fp32| on `inputs` (CPU)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.inference_mode():
        ref = net(*inputs.values()).numpy()
    return float(abs(got - ref).max())
