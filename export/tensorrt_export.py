"""TensorRT export: the same artefact the engine cache holds (a torch_tensorrt ExportedProgram), written to a
path of your choice and loadable by `render --engine-file` and by the server (`engine_file` in a model)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lipsync.engines import PRECISIONS, EngineConfig, EngineError, tensorrt_available


def export_tensorrt(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig, path: str | Path,
                    device: str = "cuda") -> tuple[Path, float]:
    """Compile `net` with torch_tensorrt (dynamo IR, explicit typing, dynamic batch) and save it; returns the
    path and the max abs error against eager fp32 at the opt batch size."""
    ok, why = tensorrt_available()
    if not ok:
        raise EngineError(f"TensorRT export needs torch_tensorrt and a CUDA GPU: {why}")
    import torch_tensorrt

    precision = "fp16" if config.precision == "auto" else config.precision
    dtype = PRECISIONS[precision]
    reference = net.to(device).eval().float()
    probe = [torch.rand(config.opt_batch, *s, device=device) for s in sample_shapes]
    with torch.inference_mode():
        expected = reference(*probe)
    typed = net.to(dtype)
    inputs = [torch_tensorrt.Input(min_shape=(config.min_batch, *s), opt_shape=(config.opt_batch, *s),
                                   max_shape=(config.max_batch, *s), dtype=dtype) for s in sample_shapes]
    program = torch_tensorrt.compile(typed, ir="dynamo", arg_inputs=inputs, use_explicit_typing=True)
    with torch.inference_mode():
        error = float((program(*[p.to(dtype) for p in probe]).float() - expected).abs().max())
    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(program, str(out), arg_inputs=inputs, output_format="exported_program")
    return out, error
