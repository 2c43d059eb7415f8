"""TensorRT export: the same build and artefact as the engine cache (`engines.compile_tensorrt`, a torch_tensorrt
ExportedProgram), written to a path of your choice and loadable by `render --engine-file` and by the server
(`engine_file` in a model)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lipsync.model.engines import PRECISIONS, EngineConfig, EngineError, compile_tensorrt, tensorrt_available


def export_tensorrt(net: nn.Module, sample_shapes: list[tuple[int, ...]], config: EngineConfig, path: str | Path,
                    device: str = "cuda") -> tuple[Path, float]:
    """Compile `net` and save it; returns the path and the max abs error against eager fp32 at the opt batch."""
    ok, why = tensorrt_available()
    if not ok:
        raise EngineError(f"TensorRT export needs torch_tensorrt and a CUDA GPU: {why}")
    import torch_tensorrt

    precision = "fp16" if config.precision == "auto" else config.precision
    dtype = PRECISIONS[precision]
    target = torch.device(device)
    reference = net.to(target).eval().float()
    probe = [torch.rand(config.opt_batch, *s, device=target) for s in sample_shapes]
    with torch.inference_mode():
        expected = reference(*probe)
    program, inputs = compile_tensorrt(net, sample_shapes, config, target, dtype)
    with torch.inference_mode():
        error = float((program(*[p.to(dtype) for p in probe]).float() - expected).abs().max())
    out = Path(path).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(program, str(out), arg_inputs=inputs, output_format="exported_program")
    return out, error
