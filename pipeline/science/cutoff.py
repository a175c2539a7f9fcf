"""The smooth cosine cutoff every descriptor kind multiplies its radial terms by."""

from __future__ import annotations

import math

import torch


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fc(r) = ½(cos(πr/Rc) + 1) inside the cutoff, 0 outside; returns (fc, dfc/dr)."""
    inside = r < cutoff
    phase = math.pi * r / cutoff
    fc = torch.where(inside, 0.5 * (torch.cos(phase) + 1.0), torch.zeros_like(r))
    dfc = torch.where(inside, -0.5 * math.pi / cutoff * torch.sin(phase), torch.zeros_like(r))
    return fc, dfc
