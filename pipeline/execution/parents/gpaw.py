"""GPAW as a parent: one MPI job per structure in a job directory that keeps GPAW's text output.

A job runs ``LAUNCHER gpaw python -m pipeline.execution.gpaw_runner IN.json OUT.json``; the options
default to the paper's settings (plane waves 450 eV, PBE, Fermi-Dirac 0.1 eV, k_i = ⌈30 Å/|a_i|⌉).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from ase import Atoms
from pydantic import Field, field_serializer, model_validator

from pipeline.execution.options import (
    Flag,
    Grid,
    NonNegativeFloat,
    Number,
    Options,
    PositiveFloat,
    PositiveInt,
    Table,
    Text,
    OneOf,
    option_error,
    rejects,
)
from pipeline.execution.parents.base import Parent, ReferenceFailed, with_log_tails
from pipeline.execution.parents.mpi_launch import MpiLaunch
from pipeline.execution.process_group import run_process_group
from pipeline.science.structures import payload_to_atoms

REPO_ROOT = Path(__file__).resolve().parents[3]
GPAW_LOG_NAME = "gpaw.txt"

Mode = Annotated[Literal["pw", "lcao", "fd"], OneOf()]
Smearing = Annotated[Literal["fermi-dirac", "marzari-vanderbilt", "methfessel-paxton"], OneOf()]
Setups = Annotated[
    str | dict[str, str],
    Field(min_length=1),
    rejects("must be a setup name ('paw', '10', ...) or a table element = name, got {value}"),
]
DEFAULT_SETUPS = "paw"
Bands = Annotated[int | str, rejects("bands must be an integer or 'occupied'/'all', got {value}")]


class ScfConvergence(Options):
    """GPAW's SCF `convergence` criteria; unset ones keep GPAW's defaults."""

    energy: PositiveFloat | None = Field(None, description="SCF convergence of the energy (eV per valence electron); default: GPAW's")
    density: PositiveFloat | None = Field(
        None, description="SCF convergence of the density (electrons per valence electron); default: GPAW's"
    )
    eigenstates: PositiveFloat | None = Field(
        None, description="SCF convergence of the eigenstates (eV² per valence electron); default: GPAW's"
    )
    forces: PositiveFloat | None = Field(None, description="SCF convergence of the forces (eV/Å); default: GPAW's")
    bands: Bands | None = Field(None, description="An integer, \"occupied\" or \"all\"")

    @model_validator(mode="before")
    @classmethod
    def _known_criteria(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.model_fields))
            if unknown:
                known = ", ".join(sorted(cls.model_fields))
                raise option_error(f"unknown criterion {unknown[0]!r} (known: {known})")
        return value


Convergence = Annotated[ScfConvergence, rejects("must be a table of SCF criteria, got {value}")]


class GpawParent(MpiLaunch, Parent):
    """DFT with GPAW under MPI: the physics options, then how a job runs (which leaves the result as it is)."""

    name: ClassVar[str] = "gpaw"
    physics_fields: ClassVar[tuple[str, ...]] = (
        "mode",
        "ecut",
        "h",
        "basis",
        "xc",
        "smearing",
        "smearing_width",
        "kpt_density",
        "kpts",
        "convergence",
        "maxiter",
        "spinpol",
        "magmom",
        "charge",
        "setups",
    )
    needs_job_dir: ClassVar[bool] = True
    stops_at_walltime: ClassVar[bool] = True  # past walltime_s its process group is killed (run_process_group)

    # physics (the paper's defaults)
    mode: Mode = Field("pw", description='GPAW mode: "pw" (plane waves), "lcao" (atomic orbitals) or "fd" (real-space grid)')
    ecut: PositiveFloat = Field(450.0, description="Plane-wave cutoff, eV (mode pw)")
    h: PositiveFloat = Field(0.2, description="Grid spacing, Å (modes fd and lcao)")
    basis: Text = Field("dzp", description="LCAO basis (mode lcao)")
    xc: Text = Field("PBE", description="Exchange-correlation functional, as GPAW names it")
    smearing: Smearing = Field("fermi-dirac", description="Occupation smearing: fermi-dirac, marzari-vanderbilt or methfessel-paxton")
    smearing_width: NonNegativeFloat = Field(0.1, description="Fermi-Dirac smearing width (eV)")
    kpt_density: PositiveFloat = Field(30.0, description="k-points: k_i = ceil(kpt_density / |a_i|) on periodic axes, Å")
    kpts: Grid | None = Field(None, description="Explicit k-point grid, overrides kpt_density")
    convergence: Convergence = ScfConvergence()
    maxiter: PositiveInt = Field(333, description="SCF iterations before the job fails")
    spinpol: Flag = Field(False, description="Spin-polarised calculation (initial moments from magmom)")
    magmom: Number = Field(0.0, description="Initial moment per atom, μB (spinpol)")
    charge: Number = Field(0.0, description="Total charge, e")
    setups: Setups = Field(DEFAULT_SETUPS, description="PAW datasets: GPAW's `setups`, e.g. \"10\" or {Pt = \"10\"} (10-electron Pt)")
    # execution (do not change the result)
    # ranks, ranks_per_node, launcher, launcher_args: MpiLaunch
    parallel: Table = Field({}, description="GPAW's `parallel` keyword, passed through")

    @model_validator(mode="before")
    @classmethod
    def _timeout_is_walltime(cls, value: Any) -> Any:
        """`timeout_s`, the name before `walltime_s` was shared by all parents, is still read as it."""
        if isinstance(value, Mapping) and "timeout_s" in value:
            if "walltime_s" in value:
                raise option_error("timeout_s is the old name of walltime_s: give walltime_s only")
            value = {("walltime_s" if key == "timeout_s" else key): item for key, item in value.items()}
        return value

    def physics(self) -> dict[str, Any]:
        """As every parent's, but `setups` only when not GPAW's default: jobs stored before the
        option existed keep their identity (and are not recomputed on resume)."""
        physics = super().physics()
        if physics.get("setups") == DEFAULT_SETUPS:
            del physics["setups"]
        return physics

    @field_serializer("convergence")
    def _set_criteria(self, convergence: ScfConvergence) -> dict[str, Any]:
        return convergence.model_dump(exclude_none=True)

    # -- running one job -----------------------------------------------------------------------

    def calculate(self, payload: dict[str, Any], job_dir: str | None) -> tuple[float, Any, str | None]:
        """Energy (eV) and forces (eV/Å) from one MPI job; without `job_dir` in a scratch folder."""
        result, log_file = self._job(payload, job_dir, None)
        return result["energy"], result["forces"], log_file

    def calculate_cell_relaxation(
        self, payload: dict[str, Any], job_dir: str | None, fmax: float, steps: int
    ) -> tuple[float, Any, Any, Any, str | None]:
        """The cell relaxed inside one MPI job (`science.initial_sets.relax_cell`); plane waves only,
        the mode that gives GPAW's stress."""
        if self.mode != "pw":
            raise ReferenceFailed(f"gpaw: cell relaxation needs the stress, which only mode = 'pw' gives (mode is {self.mode!r})")
        result, log_file = self._job(payload, job_dir, {"fmax": fmax, "steps": steps})
        return result["energy"], result["forces"], result["final_positions"], result["final_cell"], log_file

    def _job(self, payload: dict[str, Any], job_dir: str | None, relax_cell: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        """The runner's result dict of one MPI job (a single point, or a cell relaxation with
        `relax_cell` = {fmax, steps}) and the log kept; without `job_dir` in a scratch folder."""
        if payload_to_atoms(payload).cell.rank < 3:
            raise ReferenceFailed("gpaw: the structure needs a full cell (a box with vacuum for a chunk)")
        if job_dir is None:
            with tempfile.TemporaryDirectory(prefix="nft-gpaw-") as scratch:
                return self._run_in(payload, Path(scratch), relax_cell)[0], None
        return self._run_in(payload, Path(job_dir), relax_cell)

    def _run_in(self, payload: dict[str, Any], job_dir: Path, relax_cell: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
        job_dir.mkdir(parents=True, exist_ok=True)
        input_file, result_file, log_file = job_dir / "gpaw-input.json", job_dir / "gpaw-result.json", job_dir / GPAW_LOG_NAME
        result_file.unlink(missing_ok=True)
        input_file.write_text(
            json.dumps({"payload": payload, "params": self.model_dump(mode="json"), "txt": GPAW_LOG_NAME, "relax_cell": relax_cell})
        )
        command = self.launch_prefix() + [
            gpaw_command(),
            "python",
            "-m",
            "pipeline.execution.gpaw_runner",
            input_file.name,
            result_file.name,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = "1"  # GPAW parallelises over MPI ranks; threads would oversubscribe
        try:
            returncode, stdout, stderr = run_process_group(command, job_dir, env, self.walltime_s)
        except OSError as error:
            raise ReferenceFailed(f"gpaw: cannot start {shlex.join(command)}: {error}") from None
        (job_dir / "launcher.log").write_text(
            f"$ {shlex.join(command)}\nexit code: {returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        )
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        if result is not None and "error" not in result:
            return result, str(log_file)
        if returncode is None:
            reason = f"gpaw: timed out after {self.walltime_s} s (walltime_s)"
        elif result is not None:
            reason = f"gpaw: {result['error']}"
        else:
            reason = f"gpaw: {shlex.join(command)} exited with code {returncode} and no result"
        raise ReferenceFailed(with_log_tails(reason, log_file, stderr))

    # -- GPAW set-up, inside the MPI job (gpaw_runner) -----------------------------------------

    def kpts_for(self, atoms: Atoms) -> tuple[int, int, int]:
        """The k-point grid: explicit `kpts`, else ceil(kpt_density/|a_i|) on periodic axes, 1 elsewhere."""
        if self.kpts:
            k1, k2, k3 = (int(k) for k in self.kpts)
            return k1, k2, k3
        n1, n2, n3 = (
            max(1, math.ceil(self.kpt_density / length)) if periodic and length > 0 else 1
            for periodic, length in zip(atoms.pbc, atoms.cell.lengths())
        )
        return n1, n2, n3

    def setup(self, payload: Mapping[str, Any], txt: str | None = None) -> tuple[Atoms, dict[str, Any]]:
        """The structure and `gpaw.GPAW` keyword arguments for one job.

        k-points come from the structure as given (Γ only for a non-periodic chunk); a non-periodic
        box is then made periodic for plane waves, which need it (the vacuum keeps images apart).
        """
        atoms = payload_to_atoms(dict(payload))
        if atoms.cell.rank < 3:
            raise ReferenceFailed("gpaw: the structure needs a full cell (a box with vacuum for a chunk)")
        if self.spinpol and self.magmom:
            atoms.set_initial_magnetic_moments([self.magmom] * len(atoms))
        kwargs: dict[str, Any] = {
            "mode": {"name": "pw", "ecut": self.ecut} if self.mode == "pw" else self.mode,
            "xc": self.xc,
            "occupations": {"name": self.smearing, "width": self.smearing_width},
            "kpts": {"size": self.kpts_for(atoms), "gamma": True},
            "maxiter": self.maxiter,
            "spinpol": self.spinpol,
            "charge": self.charge,
            "setups": dict(self.setups) if isinstance(self.setups, dict) else self.setups,
            "txt": txt,
        }
        if self.mode in ("fd", "lcao"):
            kwargs["h"] = self.h
        if self.mode == "lcao":
            kwargs["basis"] = self.basis
        criteria = self.convergence.model_dump(exclude_none=True)
        if criteria:
            kwargs["convergence"] = criteria
        if self.parallel:
            kwargs["parallel"] = dict(self.parallel)
        if self.mode == "pw":
            atoms.pbc = True
        return atoms, kwargs


def gpaw_command() -> str:
    """GPAW's launcher (`gpaw python` turns on its MPI), beside this interpreter if installed there."""
    beside = Path(sys.executable).parent / "gpaw"
    return str(beside) if beside.exists() else shutil.which("gpaw") or "gpaw"
