"""Structure files: reading one (every image checked, with the labels it stores), and writing
labelled extxyz that reads back bit for bit, so an exported training set trains exactly the model
its rows train (ASE's own extxyz writer rounds per-atom floats to 8 decimals)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write

from pipeline.errors import BadInput
from pipeline.science.structures import LabelledStructure, structure_problem


def read_structure_file(path: Path, where: str) -> list[Atoms]:
    """Every image of an ASE-readable file (labels, where present, come along as a calculator), each
    passing `structure_problem`; BadInput ``WHERE: …`` (`where` names the file, or the field that
    gave it) when the file cannot be read, holds no structure or holds an impossible one."""
    from ase.io import read

    try:
        images = read(str(path), index=":")
    except Exception as error:  # ASE raises many types for unreadable files
        lines = str(error).strip().splitlines()
        reason = lines[0][:120] if lines else type(error).__name__
        raise BadInput(f"{where}: not a readable structure file ({reason})") from None
    images = images if isinstance(images, list) else [images]
    if not images:
        raise BadInput(f"{where}: contains no structures")
    for index, atoms in enumerate(images):
        problem = structure_problem(atoms)
        if problem:
            raise BadInput(f"{where}: image {index} {problem}")
    return images


@dataclass(frozen=True)
class StoredLabels:
    """The labels a structure file stores with a structure."""

    energy: float | None  # eV; None when the file stores forces only (a campaign then computes the structure)
    forces: np.ndarray  # eV/Å, N×3


def stored_labels(atoms: Atoms) -> StoredLabels | None:
    """The labels stored with a structure read from a file (its calculator's results): forces (eV/Å)
    and the energy (eV; "energy", else "free_energy"), or None when it stores no forces, forces that
    are not N×3 or not finite, or a non-finite energy: such a structure carries no usable label."""
    results = getattr(atoms.calc, "results", None) or {}
    if results.get("forces") is None:
        return None
    forces = np.asarray(results["forces"], dtype=float)
    if forces.shape != (len(atoms), 3) or not np.all(np.isfinite(forces)):
        return None
    energy = results.get("energy", results.get("free_energy"))
    if energy is not None:
        energy = float(energy)
        if not math.isfinite(energy):
            return None
    return StoredLabels(energy, forces)


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
    for symbol, position, flag, force in zip(
        atoms.get_chemical_symbols(), atoms.positions, atoms.arrays["force_mask"], atoms.arrays["forces"]
    ):
        values = [symbol, *map(_exact, position), "T" if flag else "F", *map(_exact, force)]
        lines.append(" ".join(values))
    return "\n".join(lines) + "\n"


def _exact(value: float) -> str:
    """The shortest text that reads back as exactly this float."""
    return repr(float(value))
