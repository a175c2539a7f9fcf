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
