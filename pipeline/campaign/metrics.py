"""Small helpers for the numbers a campaign records with its models and iterations."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(value: Any) -> float | None:
    """`value` as a float, or None where it is missing, NaN or infinite (JSON has no such numbers)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fit_determination(metrics: dict[str, Any]) -> str | None:
    """One line when a training's fit had more weights than residuals for some element (the metrics
    of `TrainingReport`: `element_residuals`, `element_weights`, `weight_decay`), saying what kept it
    well-posed; None when every element's network had more residuals than weights."""
    counts = metrics.get("element_residuals") or {}
    weights = int(metrics.get("element_weights") or 0)
    short = {symbol: counts[symbol] for symbol in sorted(counts, key=_atomic_number) if counts[symbol] < weights}
    if not short:
        return None
    listed = ", ".join(f"{symbol} {count}" for symbol, count in short.items())
    decay = float(metrics.get("weight_decay") or 0.0)
    remedy = f"the weight decay {decay:g} keeps it well-posed" if decay > 0 else "nothing keeps it well-posed: set [model] weight_decay > 0"
    return f"fit underdetermined: residuals per element ({listed}) < {weights} weights per network; {remedy}"


def _atomic_number(symbol: str) -> int:
    """The order `fit_determination` lists elements in: the same before and after the metrics' trip
    through the database (which may reorder a JSON object's keys)."""
    from ase.data import atomic_numbers

    return atomic_numbers.get(symbol, 0)
