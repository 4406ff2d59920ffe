"""The one rule for a ``device`` knob: the values it takes, and the torch device it becomes
(embed, clip_score, heads and dedup use it)."""

from __future__ import annotations

import re

import torch

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_problem(device: object) -> str | None:
    """What is wrong with a ``device`` knob, in words; None when it is one of the values.

    >>> device_problem("cuda:1") is None, device_problem("gpu")
    (True, "device must be auto, cpu, cuda or cuda:N, got 'gpu'")
    """
    if _DEVICE.match(str(device)):  # str: a torch.device given as is
        return None
    return f"device must be auto, cpu, cuda or cuda:N, got {device!r}"


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
