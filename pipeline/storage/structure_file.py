"""Labelled structure files: extxyz that reads back bit for bit, so an exported training set trains
exactly the model its rows train (ASE's own extxyz writer rounds per-atom floats to 8 decimals)."""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write

from pipeline.science.structures import LabelledStructure


def write_labelled_extxyz(path: str | Path, structures: Sequence[LabelledStructure]) -> None:
    """Write structures with energy (eV, when trained), forces (eV/Å) and `force_mask` as extxyz,
    every float at full precision (shortest round-trip repr), in the given order."""
    with open(path, "w", encoding="utf-8") as out:
        for item in structures:
            out.write(_frame(item))


def _frame(item: LabelledStructure) -> str:
    """One extxyz frame: ASE's header (its info values, Lattice included, are already exact) over
    per-atom lines written here at full precision."""
    atoms = Atoms(numbers=item.atoms.numbers, positions=item.atoms.positions, cell=item.atoms.cell, pbc=item.atoms.pbc)
    atoms.arrays["force_mask"] = np.asarray(item.force_mask, dtype=bool)
    atoms.arrays["forces"] = np.asarray(item.forces, dtype=float)
    if item.energy is not None:
        atoms.info["energy"] = float(item.energy)
    columns = ["symbols", "positions", "force_mask", "forces"]
    header = io.StringIO()
    write(header, atoms, format="extxyz", columns=columns, write_results=False)
    count, comment = header.getvalue().splitlines()[:2]
    lines = [count, comment]
    for symbol, position, flag, force in zip(atoms.get_chemical_symbols(), atoms.positions, atoms.arrays["force_mask"],
                                             atoms.arrays["forces"]):
        values = [symbol, *map(_exact, position), "T" if flag else "F", *map(_exact, force)]
        lines.append(" ".join(values))
    return "\n".join(lines) + "\n"


def _exact(value: float) -> str:
    """The shortest text that reads back as exactly this float."""
    return repr(float(value))
