"""Host → device transfers, in one place: from pinned (page-locked) memory and without blocking, so the thread
that launches a step's kernels never waits for the batch in flight to copy a few indices. On the CPU they are the
tensors as they are. Nothing else on the serving path builds a device tensor from host data (the device-discipline
test counts what bypasses these)."""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`: a host tensor goes through pinned memory, asynchronously (the caching host
    allocator keeps the staging block until the copy has run)."""
    if tensor.device == device or device.type != "cuda":
        return tensor if tensor.device == device else tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def index_tensor(values: list[int], device: torch.device) -> Tensor:
    """Python ints (frame ids, batch rows) as an int64 index tensor on `device`."""
    return to_device(torch.tensor(values, dtype=torch.long), device)
