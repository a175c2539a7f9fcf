"""ASE's EMT as a parent: in-process, no options, cheap enough to label whole targets."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from ase.calculators.emt import parameters as _emt_parameters

from pipeline.execution.parents.base import Parent, ReferenceFailed
from pipeline.science.structures import payload_to_atoms


class EmtParent(Parent):
    """Effective-medium theory (ASE `EMT`): Al, Cu, Ag, Au, Ni, Pd, Pt, and H, C, N, O."""

    name: ClassVar[str] = "emt"
    default_threshold: ClassVar[float] = 0.1
    evaluates_targets: ClassVar[bool] = True
    supported_elements: ClassVar[frozenset[str]] = frozenset(_emt_parameters)

    def calculate(self, payload: dict[str, Any], job_dir: str | None) -> tuple[float, np.ndarray, None]:
        """EMT energy (eV) and forces (eV/Å); an element without EMT parameters fails the job."""
        from ase.calculators.emt import EMT

        atoms = payload_to_atoms(payload)
        atoms.calc = EMT()
        try:
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
        except Exception as error:  # EMT lacks parameters for an element, or a degenerate geometry
            raise ReferenceFailed(f"emt: {type(error).__name__}: {error}") from None
        return energy, forces, None

    def calculate_cell_relaxation(
        self, payload: dict[str, Any], job_dir: str | None, fmax: float, steps: int
    ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, None]:
        """The EMT-relaxed cell (EMT gives the stress): energy (eV), forces (eV/Å), positions and cell (Å)."""
        from ase.calculators.emt import EMT

        from pipeline.science.initial_sets import relax_cell

        try:
            relaxed, energy, forces, _ = relax_cell(payload_to_atoms(payload), EMT(), fmax, steps)
        except Exception as error:
            raise ReferenceFailed(f"emt: cell relaxation: {type(error).__name__}: {error}") from None
        return energy, forces, relaxed.positions, relaxed.cell.array, None
