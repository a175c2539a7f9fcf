"""The training and prediction device: the one place that asks whether torch sees a CUDA GPU."""

from __future__ import annotations

from typing import get_args

import torch

from pipeline.science.settings import DeviceName

DEVICES: tuple[str, ...] = get_args(DeviceName)


def missing_gpu() -> str | None:
    """Why a "cuda" device cannot be honoured here (torch sees no CUDA GPU), or None when it can."""
    if torch.cuda.is_available():
        return None
    return f"torch {torch.__version__} sees no CUDA GPU on this machine"


def resolve_device(name: str) -> torch.device:
    """The torch device of a `device` setting: "auto" is cuda when torch sees a GPU, else cpu.

    ValueError for "cuda" when torch sees no GPU (a CPU-only torch or no visible device).
    """
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cpu" if missing_gpu() else "cuda")
    if name == "cuda" and (why := missing_gpu()):
        raise ValueError(f"device 'cuda': {why} (use 'auto' or 'cpu')")
    return torch.device(name)
