"""What every parent calculator is: typed options, the options that define its physics, and `run`.

A parent is a frozen pydantic model whose fields are its options (ASE's `default_parameters`, typed
and checked); its class says what it is: `name`, `physics_fields` (a result's identity), whether a
job keeps a directory, the default δ threshold, whether whole targets are cheap to label, and the
MPI resources of one job. `run(payload, job_dir)` returns energy (eV) and forces (eV/Å) or raises
`ReferenceFailed` (ASE's `CalculationFailed`).

Every parent also has the execution options `retries`, `walltime_s` and `max_force`: how often the
driver retries a failed job, how long one attempt may run, and the largest force a result may hold
(`result_problem`: a non-finite or absurd result is a failure, never data). They are not physics.
"""

from __future__ import annotations

import math
from pathlib import Path
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from ase.calculators.calculator import CalculationFailed
from ase.data import atomic_numbers
from numpy.typing import ArrayLike
from pydantic import Field

from pipeline.errors import BadInput
from pipeline.execution.options import BadOption, NonNegativeInt, Options, PositiveFloat, checked_options
from pipeline.science.initial_sets import CELL_RELAX_FMAX, CELL_RELAX_STEPS

DFT_THRESHOLD = 0.3
"""Default `active.threshold` (eV/Å) of a DFT parent (docs/campaign.md, `[active]`)."""
MAX_FORCE = 50.0
"""Default `max_force`, eV/Å: a result with a larger |F_i| is refused as absurd. Sane structures stay
far below it (a rattled Pt55 under EMT: 2.9 eV/Å; relaxations and MD up to melting: under ~20 eV/Å);
EMT reaches it only for two Pt atoms closer than 1.85 Å (2/3 of their bond), which no target holds."""


class ReferenceFailed(CalculationFailed):
    """A reference calculation gave no energy and forces (ASE's `CalculationFailed`); the message is the reason."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else ""


class WalltimeExceeded(ReferenceFailed):
    """An attempt ran past its parent's `walltime_s` and was stopped."""


class ParentConfigError(BadInput):
    """A `[parent]` setting is wrong; `field` names it, e.g. ``parent.gpaw.ecut``."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.field, self.problem))


# ---------------------------------------------------------------------------------------------
# The base class.


class Parent(Options):
    """A parent calculator; its fields are its options, defaults filled in."""

    name: ClassVar[str]
    physics_fields: ClassVar[tuple[str, ...]] = ()
    """The options that decide the result; execution options (ranks, launcher, timeout) are left out."""
    needs_job_dir: ClassVar[bool] = False
    """Whether a job writes files worth keeping (its own folder under WORKDIR/jobs)."""
    default_threshold: ClassVar[float] = DFT_THRESHOLD
    """Default `active.threshold`, eV/Å."""
    evaluates_targets: ClassVar[bool] = False
    """Whether labelling whole targets is cheap, so the campaign reports the final model's force MAE."""
    stops_at_walltime: ClassVar[bool] = False
    """Whether `run` itself stops a job at `walltime_s` (GPAW kills its process group); else the
    reference app interrupts it there (`apps.reference_job`)."""
    supported_elements: ClassVar[frozenset[str] | None] = None
    """The chemical symbols the parent has parameters for; None: any element."""

    # execution, shared by all parents (not physics: a job's identity and result do not depend on them)
    retries: NonNegativeInt = Field(2, description="A failed job is tried again up to this many times: 1 + retries attempts per run")
    walltime_s: PositiveFloat | None = Field(None, description="Seconds one attempt may run; None: no limit")
    max_force: PositiveFloat = Field(
        MAX_FORCE, description="Largest |F_i| (eV/Å) a result may hold; a larger one is refused as a failed calculation"
    )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> "Parent":
        """The parent with `options` (a `[parent.NAME]` table) checked; `ParentConfigError` names
        the first bad one (an unknown option before a bad value)."""
        try:
            return checked_options(cls, options)
        except BadOption as bad:
            where = f".{bad.name}" if bad.name else ""  # none for a check of the whole table
            if bad.known is not None:
                known = ", ".join(bad.known) or "none"
                raise ParentConfigError(f"parent.{cls.name}{where}", f"unknown option (known: {known})") from None
            raise ParentConfigError(f"parent.{cls.name}{where}", bad.problem) from None

    def physics(self) -> dict[str, Any]:
        """The `physics_fields` as plain JSON: what identifies a result (the same chunk with other
        ranks is the same job)."""
        return self.model_dump(mode="json", include=set(self.physics_fields))

    def mpi_resources(self) -> dict[str, Any]:
        """Parsl MPI resource specification of one job: one rank on one node."""
        return {"num_nodes": 1, "num_ranks": 1, "ranks_per_node": 1, "launcher_options": ""}

    def run(self, payload: Mapping[str, Any], job_dir: str | None = None, attempt: int = 1) -> dict[str, Any]:
        """Energy (eV) and forces (eV/Å) of one structure (an `atoms_to_payload` dict).

        Returns ``{"energy", "forces" (N×3 list), "wall_time_s", "host", "external_id", "log_file"}``;
        `external_id` is the batch job id (``SLURM_JOB_ID``) where there is one. Raises
        `ReferenceFailed` with the reason when no result comes or it is invalid (`result_problem`).
        `attempt` counts the job's starts (1 the first); a parent may ignore it.
        """
        start = time.perf_counter()
        energy, forces, log_file = self.calculate(dict(payload), job_dir)
        return self.checked_result(payload, energy, forces, start, log_file)

    def checked_result(
        self, payload: Mapping[str, Any], energy: float, forces: ArrayLike, start: float, log_file: str | None
    ) -> dict[str, Any]:
        """The result dict of `run` for a calculation begun at `start` (`time.perf_counter()`, s);
        `ReferenceFailed` ("invalid result: …") when `result_problem` finds one."""
        forces = np.asarray(forces, dtype=float)
        problem = result_problem(energy, forces, len(payload["numbers"]), self.max_force)
        if problem is not None:
            raise ReferenceFailed(f"{self.name}: invalid result: {problem}")
        return {
            "energy": float(energy),
            "forces": forces.tolist(),
            "wall_time_s": time.perf_counter() - start,
            "host": socket.gethostname(),
            "external_id": os.environ.get("SLURM_JOB_ID"),
            "log_file": log_file,
        }

    def calculate(self, payload: dict[str, Any], job_dir: str | None) -> tuple[float, ArrayLike, str | None]:
        """Energy (eV), forces (eV/Å, N×3) and the log file kept, if any; `ReferenceFailed` on failure."""
        raise NotImplementedError

    def relax_cell(
        self,
        payload: Mapping[str, Any],
        job_dir: str | None = None,
        attempt: int = 1,
        fmax: float = CELL_RELAX_FMAX,
        steps: int = CELL_RELAX_STEPS,
    ) -> dict[str, Any]:
        """Relax positions and cell of one periodic structure (`science.initial_sets.relax_cell`: ASE's
        cell filter and BFGS, to `fmax` eV/Å or `steps` steps): the `run` result of the relaxed cell
        with its geometry as ``final_positions`` (N×3, Å) and ``final_cell`` (3×3, Å)."""
        start = time.perf_counter()
        energy, forces, positions, cell, log_file = self.calculate_cell_relaxation(dict(payload), job_dir, fmax, steps)
        result = self.checked_result(payload, energy, forces, start, log_file)
        result.update(final_positions=np.asarray(positions, dtype=float).tolist(), final_cell=np.asarray(cell, dtype=float).tolist())
        return result

    def calculate_cell_relaxation(
        self, payload: dict[str, Any], job_dir: str | None, fmax: float, steps: int
    ) -> tuple[float, ArrayLike, ArrayLike, ArrayLike, str | None]:
        """Energy (eV), forces (eV/Å), positions and cell (Å) of the relaxed structure, and the log
        file kept; `ReferenceFailed` on failure or where the parent gives no stress."""
        raise ReferenceFailed(f"{self.name}: this parent cannot relax a cell")

    def element_problem(self, symbols: Sequence[str]) -> str | None:
        """What the parent lacks for `symbols` (elements without parameters), or None."""
        if self.supported_elements is None:
            return None
        missing = [symbol for symbol in symbols if symbol not in self.supported_elements]
        if not missing:
            return None
        known = " ".join(sorted(self.supported_elements, key=lambda symbol: atomic_numbers[symbol]))
        return f"the {self.name} parent has no parameters for {', '.join(missing)} (it knows {known})"


def result_problem(energy: Any, forces: ArrayLike, n_atoms: int, max_force: float) -> str | None:
    """What makes a result unfit to store, or None: forces not N×3, a non-finite energy (eV) or force,
    or a force |F_i| above `max_force` (eV/Å). The one check every reference result passes."""
    forces = np.asarray(forces, dtype=float)
    if forces.shape != (n_atoms, 3):
        return f"forces of shape {forces.shape}, expected ({n_atoms}, 3)"
    try:
        energy = float(energy)
    except (TypeError, ValueError):
        return f"energy {energy!r} is not a number"
    if not math.isfinite(energy):
        return f"non-finite energy {energy}"
    if not np.all(np.isfinite(forces)):
        return f"non-finite forces on {int(np.sum(~np.isfinite(forces).all(axis=1)))} of {n_atoms} atoms"
    largest = float(np.linalg.norm(forces, axis=1).max()) if n_atoms else 0.0
    if largest > max_force:
        return f"|F| = {largest:.3g} eV/Å on atom {int(np.linalg.norm(forces, axis=1).argmax())} exceeds max_force = {max_force:g} eV/Å"
    return None


LOG_TAIL_LINES = 25
"""Lines of a failed job's calculator output and stderr quoted in its failure reason."""


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def with_log_tails(reason: str, log_file: Path | None, stderr: str) -> str:
    """`reason`, then the last lines of the calculator's output and of the runner's stderr."""
    parts = [reason]
    if log_file is not None and log_file.exists() and log_file.read_text(errors="replace").strip():
        parts.append(f"--- last lines of {log_file}:\n{_tail(log_file.read_text(errors='replace'))}")
    if stderr.strip():
        parts.append(f"--- stderr:\n{_tail(stderr)}")
    return "\n".join(parts)
