"""Parent calculators: the reference methods whose energies (eV) and forces (eV/Å) the model learns.

One small class each (`base.Parent`): `emt` runs in-process (ASE EMT); `gpaw` runs one MPI job per
structure in a job directory that keeps GPAW's text output; `cp2k` (CP2K's shell through ASE) and
`ase` (any ASE calculator class, by import path) run each job in a process of their own, in its
job directory (`ase_process`). `parent_for(name, options)` is what the
config loader and a Parsl app call; an app receives the name and `model_dump()`, plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.execution.parents.base import (
    DFT_THRESHOLD,
    MAX_FORCE,
    Parent,
    ParentConfigError,
    ReferenceFailed,
    WalltimeExceeded,
    result_problem,
)
from pipeline.execution.parents.ase_generic import AseParent
from pipeline.execution.parents.cp2k import CP2K_LOG_NAME, Cp2kParent
from pipeline.execution.parents.emt import EmtParent
from pipeline.execution.parents.gpaw import GPAW_LOG_NAME, GpawParent

PARENTS: dict[str, type[Parent]] = {parent.name: parent for parent in (EmtParent, GpawParent, Cp2kParent, AseParent)}
"""The parents by `[parent] calculator` name."""

__all__ = [
    "CP2K_LOG_NAME",
    "DFT_THRESHOLD",
    "GPAW_LOG_NAME",
    "MAX_FORCE",
    "PARENTS",
    "AseParent",
    "Cp2kParent",
    "EmtParent",
    "GpawParent",
    "Parent",
    "ParentConfigError",
    "ReferenceFailed",
    "WalltimeExceeded",
    "parent_for",
    "result_problem",
]


def parent_for(name: str | None, options: Mapping[str, Any] | None = None) -> Parent:
    """The parent called `name` (case-insensitive; None or an unknown name is an error) with `options`
    checked; `ParentConfigError` names the field, ``parent.calculator`` or ``parent.<name>.<option>``."""
    if not isinstance(name, str) or name.lower() not in PARENTS:
        raise ParentConfigError("parent.calculator", f"unknown calculator {name!r} (known: {', '.join(PARENTS)})")
    return PARENTS[name.lower()].from_options(options)
