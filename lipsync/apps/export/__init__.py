"""Checkpoint → deployable artefacts: ONNX (onnxruntime, TensorRT's trtexec) and TensorRT ExportedPrograms."""
