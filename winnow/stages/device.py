"""The one rule for turning a ``device`` knob into a torch device (embed, heads and dedup use it)."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is the first CUDA device where there is one, else the CPU; asking for CUDA
    where there is none is an error, not a silent fall back to the CPU.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but CUDA is not available here; use device='auto' or 'cpu'")
    return torch.device(device)
