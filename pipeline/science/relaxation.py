"""Relaxation with uncertainty (the paper's method, docs/campaign.md): relax with the ensemble mean
and, whenever δ of the current geometry exceeds the threshold, ask for a better model there before going on.

Pure logic: the caller supplies the calculator and the callback that improves it (the campaign
layer carves chunks, computes them and retrains); a notebook can pass any function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.optimize import BFGS, FIRE, LBFGS

OPTIMIZERS = {"BFGS": BFGS, "FIRE": FIRE, "LBFGS": LBFGS}
"""The ASE optimizers a relaxation can use, by name."""
DEFAULT_FMAX = 0.05
"""Default force limit of a relaxation, eV/Å (`nft relax --fmax`)."""
DEFAULT_OPTIMIZER = "BFGS"
"""Default optimizer of a relaxation (`nft relax --optimizer`)."""
DEFAULT_MAX_STEPS = 200
"""Default most optimizer steps of a relaxation (`nft relax --steps`)."""

CONVERGED = "converged"
STEPS = "steps"
UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class Improvement:
    """What the callback made of an uncertain geometry: a new calculator, the chunks it added
    there, and a label for the new model (e.g. the campaign iteration)."""

    calculator: Calculator
    chunks_added: int
    model: int | None = None


Improve = Callable[[Atoms, Mapping[str, Any]], "Improvement | None"]
"""(the uncertain geometry, its step in `info["step"]` and δ_i in `arrays["delta"]`; the calculator's
results there) → a better calculator, or None when nothing more can be learnt there."""


@dataclass(frozen=True)
class RelaxationStep:
    """One evaluation of a geometry: `step` optimizer steps taken before it, by model `model`;
    energy eV, fmax and δ = max δ_i eV/Å; `chunks_added` for a better model at this geometry."""

    step: int
    model: int | None
    energy: float
    fmax: float
    delta: float
    chunks_added: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RelaxationResult:
    """The relaxed structure (its last evaluation attached), every evaluation in order, and why it
    stopped: `converged` (fmax below the target, δ below the threshold), `steps` (the step limit) or
    `uncertain` (fmax reached but δ above the threshold with nothing more to learn there)."""

    atoms: Atoms
    steps: list[RelaxationStep]
    reason: str

    @property
    def converged(self) -> bool:
        return self.reason == CONVERGED


def relax_with_uncertainty(
    atoms: Atoms,
    calculator: Calculator,
    threshold: float,
    improve: Improve,
    fmax: float = DEFAULT_FMAX,
    optimizer: str = DEFAULT_OPTIMIZER,
    max_steps: int = DEFAULT_MAX_STEPS,
    first_step: int = 0,
    model: int | None = None,
    on_frame: Callable[[Atoms, RelaxationStep], None] | None = None,
) -> RelaxationResult:
    """Relax `atoms` (a copy; the input is left as it is) with `calculator`, whose results hold the
    per-atom δ_i as `uncertainties` (eV/Å).

    Every geometry is evaluated; when its δ exceeds `threshold` (eV/Å) `improve` is called, and
    with the calculator it returns the same geometry is evaluated again (the optimizer restarts
    there: its history belongs to the old model). Stops when fmax < `fmax` (eV/Å) with δ below the
    threshold, or after `max_steps` optimizer steps in all (`first_step` were taken before, by an
    earlier run that this one resumes). `on_frame` sees every evaluation as it happens: a copy of
    the geometry with its results and per-atom δ_i in `arrays["delta"]`, and its row.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    if not fmax > 0:
        raise ValueError(f"fmax must be positive, not {fmax}")
    current = atoms.copy()
    current.calc = calculator
    dynamics = OPTIMIZERS[optimizer](current, logfile=None)
    steps: list[RelaxationStep] = []
    step = first_step
    while True:
        frame, row = _evaluate(current, step, model)
        if row.delta > threshold:
            improvement = improve(frame.copy(), current.calc.results)
            if improvement is not None:
                row = RelaxationStep(**{**row.as_dict(), "chunks_added": improvement.chunks_added})
                _emit(frame, row, steps, on_frame)
                current.calc, model = improvement.calculator, improvement.model
                dynamics = OPTIMIZERS[optimizer](current, logfile=None)
                continue
        _emit(frame, row, steps, on_frame)
        if row.fmax < fmax:
            reason = CONVERGED if row.delta <= threshold else UNCERTAIN
            break
        if step >= max_steps:
            reason = STEPS
            break
        dynamics.step()
        step += 1
    return RelaxationResult(frame, steps, reason)


def _evaluate(atoms: Atoms, step: int, model: int | None) -> tuple[Atoms, RelaxationStep]:
    """The geometry with its energy, forces and δ_i frozen on a copy, and its row."""
    forces = atoms.get_forces()
    energy = float(atoms.get_potential_energy())
    uncertainties = np.asarray(atoms.calc.results["uncertainties"], dtype=float)
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces.copy())
    frame.arrays["delta"] = uncertainties.copy()
    frame.info["step"] = step
    row = RelaxationStep(
        step=step,
        model=model,
        energy=energy,
        fmax=float(np.sqrt((forces**2).sum(axis=1)).max()) if len(atoms) else 0.0,
        delta=float(uncertainties.max()) if len(atoms) else 0.0,
        chunks_added=0,
    )
    return frame, row


def _emit(frame: Atoms, row: RelaxationStep, steps: list[RelaxationStep], on_frame: Callable[[Atoms, RelaxationStep], None] | None) -> None:
    steps.append(row)
    if on_frame is not None:
        on_frame(frame, row)
