"""The MPI launch of one job, as options: ranks, ranks per node, the launcher and its arguments.

`MpiLaunch` is mixed into a parent whose job starts an MPI program (GPAW's Python, CP2K's `cp2k_shell.psmp`); the
options are execution, never physics (the same structure on other ranks is the same job).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from pipeline.execution.options import OneOf, Options, PositiveInt, rejects

Launcher = Annotated[Literal["auto", "mpiexec", "srun"], OneOf()]


def _words(value: Any) -> Any:
    """Launcher arguments given as one string are split as a shell would."""
    if isinstance(value, str):
        return shlex.split(value)
    return list(value) if isinstance(value, tuple) else value


Words = Annotated[list[str], BeforeValidator(_words), rejects("must be a list of strings, got {value}")]


class MpiLaunch(Options):
    """How the ranks of one job start."""

    ranks: PositiveInt = Field(1, description="MPI ranks of one job")
    ranks_per_node: PositiveInt | None = Field(None, description="MPI ranks per node; default: ranks (one node per job)")
    launcher: Launcher = Field(
        "auto", description="How MPI ranks start: auto (Parsl's prefix in an MPIExecutor, srun in Slurm, else mpiexec), srun or mpiexec"
    )
    launcher_args: Words = Field([], description="Extra launcher arguments, e.g. [\"--mpi=pmix\"]")

    def mpi_resources(self) -> dict[str, Any]:
        """Parsl MPI resource specification of one job: its ranks, on whole nodes."""
        ranks_per_node = self.ranks_per_node or self.ranks
        return {
            "num_nodes": max(1, math.ceil(self.ranks / ranks_per_node)),
            "num_ranks": self.ranks,
            "ranks_per_node": min(self.ranks, ranks_per_node),
            "launcher_options": " ".join(self.launcher_args),
        }

    def launch_prefix(self) -> list[str]:
        """The command words that start `ranks` MPI ranks of one job.

        `launcher = "auto"`: Parsl's ``$PARSL_MPI_PREFIX`` when an MPIExecutor placed the job; else
        ``srun`` inside a Slurm allocation; else ``mpiexec``; a one-rank job outside an MPIExecutor
        runs without a launcher.
        """
        launcher = self.launcher
        if launcher == "auto":
            parsl_prefix = os.environ.get("PARSL_MPI_PREFIX")
            if parsl_prefix:
                return shlex.split(parsl_prefix)
            if self.ranks == 1:
                return []
            launcher = "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "mpiexec"
        if launcher == "srun":
            return ["srun", "--ntasks", str(self.ranks), *self.launcher_args]
        return ["mpiexec", "-n", str(self.ranks), *self.launcher_args]
