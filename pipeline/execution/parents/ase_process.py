"""A parent that runs an ASE calculator in a process of its own, in the job's directory.

A job runs ``python -m pipeline.execution.ase_runner IN.json OUT.json`` as one process group
(`run_process_group`): past `walltime_s`, or when the worker dies, the group is killed with every
program the calculator started (a `cp2k_shell`, an MPI launcher and its ranks). The runner builds the
parent again from its options and calls `compute_here`, which a subclass shapes with
`calculator_for` (the ASE calculator of one structure) and `failure_in` (a failure the calculator
reported only in its output, e.g. an SCF that did not converge).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, ClassVar

from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from pydantic import Field

from pipeline.execution.options import PositiveInt, rejects
from pipeline.execution.parents.base import Parent, ReferenceFailed, with_log_tails
from pipeline.execution.process_group import run_process_group
from pipeline.science.structures import payload_to_atoms

REPO_ROOT = Path(__file__).resolve().parents[3]
LAUNCHER_LOG_NAME = "launcher.log"
INPUT_NAME, RESULT_NAME = "nft-input.json", "nft-result.json"

Threads = Annotated[int, Field(ge=1), rejects("must be an integer >= 1, got {value}")]


class AseProcessParent(Parent):
    """A parent whose jobs run an ASE calculator in their own process and directory."""

    needs_job_dir: ClassVar[bool] = True
    stops_at_walltime: ClassVar[bool] = True  # the job's process group is killed at walltime_s
    log_name: ClassVar[str | None] = None
    """The calculator's own output in the job directory, kept as the job's log; None: the launcher log."""

    threads: PositiveInt = Field(1, description="OpenMP threads of one job (OMP_NUM_THREADS of the calculator and what it starts)")

    # -- on the worker: one job in its own process ---------------------------------------------

    def calculate(self, payload: dict[str, Any], job_dir: str | None) -> tuple[float, Any, str | None]:
        """Energy (eV) and forces (eV/Å) from the runner process; without `job_dir` in a scratch folder."""
        self.check_structure(payload_to_atoms(payload))
        if job_dir is None:
            with tempfile.TemporaryDirectory(prefix=f"nft-{self.name}-") as scratch:
                result, _ = self._run_in(payload, Path(scratch))
                return result["energy"], result["forces"], None
        result, log_file = self._run_in(payload, Path(job_dir))
        return result["energy"], result["forces"], log_file

    def _run_in(self, payload: dict[str, Any], job_dir: Path) -> tuple[dict[str, Any], str]:
        job_dir.mkdir(parents=True, exist_ok=True)
        result_file = job_dir / RESULT_NAME
        result_file.unlink(missing_ok=True)
        (job_dir / INPUT_NAME).write_text(json.dumps({"parent": self.name, "params": self.model_dump(mode="json"), "payload": payload}))
        command = [sys.executable, "-m", "pipeline.execution.ase_runner", INPUT_NAME, RESULT_NAME]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["OMP_NUM_THREADS"] = str(self.threads)
        try:
            returncode, stdout, stderr = run_process_group(command, job_dir, env, self.walltime_s)
        except OSError as error:
            raise ReferenceFailed(f"{self.name}: cannot start {shlex.join(command)}: {error}") from None
        launcher_log = job_dir / LAUNCHER_LOG_NAME
        launcher_log.write_text(f"$ {shlex.join(command)}\nexit code: {returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        log_file = job_dir / self.log_name if self.log_name else launcher_log
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        if result is not None and "error" not in result:
            return result, str(log_file)
        if returncode is None:
            reason = f"{self.name}: timed out after {self.walltime_s} s (walltime_s)"
        elif result is not None:
            reason = f"{self.name}: {result['error']}"
        else:
            reason = f"{self.name}: {shlex.join(command)} exited with code {returncode} and no result"
        raise ReferenceFailed(with_log_tails(reason, job_dir / self.log_name if self.log_name else None, stderr))

    # -- in the runner process (pipeline.execution.ase_runner) ---------------------------------

    def check_structure(self, atoms: Atoms) -> None:
        """`ReferenceFailed` before any process starts when the structure cannot run (e.g. no cell)."""

    def calculator_for(self, atoms: Atoms) -> BaseCalculator:
        """The ASE calculator of one job, made in the runner process inside the job directory."""
        raise NotImplementedError

    def failure_in(self, calculator: BaseCalculator) -> str | None:
        """A failure the calculator reported only in its output (not by raising), or None."""
        return None

    def compute_here(self, payload: dict[str, Any]) -> tuple[float, Any]:
        """Energy (eV; the free energy where the calculator gives one, as its forces derive from it) and
        forces (eV/Å) of one structure, here; the calculator is closed at the end (its processes stop)."""
        atoms = payload_to_atoms(payload)
        self.check_structure(atoms)
        calculator = self.calculator_for(atoms)
        try:
            atoms.calc = calculator
            forces = atoms.get_forces()
            consistent = "free_energy" in getattr(calculator, "implemented_properties", ())
            energy = atoms.get_potential_energy(force_consistent=consistent)
            failure = self.failure_in(calculator)
        finally:
            close = getattr(calculator, "close", None)
            if callable(close):
                close()
        if failure is not None:
            raise ReferenceFailed(failure)
        return float(energy), forces
