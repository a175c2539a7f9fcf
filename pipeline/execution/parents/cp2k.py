"""CP2K as a parent: ASE's CP2K calculator driving `cp2k_shell`, one process per job in its directory.

Gaussian and plane waves (Quickstep) with GTH pseudopotentials, from the basis and potential files of
the CP2K installation (Debian's `cp2k` package: /usr/share/cp2k). A chunk, a non-periodic box with
vacuum, gets a non-periodic Poisson solver (Martyna-Tuckerman or wavelets); a periodic cell gets
Γ or a Monkhorst-Pack grid. CP2K goes on after `max_scf` with a warning in its output: the parent
reads it and fails the job, so an unconverged SCF is never data.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from ase.units import Rydberg
from pydantic import Field

from pipeline.execution.options import Flag, Grid, NonNegativeFloat, OneOf, PositiveFloat, PositiveInt, String, Text, rejects
from pipeline.execution.parents.ase_process import AseProcessParent
from pipeline.execution.parents.base import ReferenceFailed
from pipeline.execution.parents.mpi_launch import MpiLaunch

CP2K_LOG_NAME = "cp2k.out"
SCF_NOT_CONVERGED = ("SCF run NOT converged", "outer SCF loop FAILED to converge")
"""What CP2K prints (and then goes on) when an SCF stops at MAX_SCF unconverged."""

PoissonSolver = Annotated[Literal["mt", "wavelet"], OneOf()]
Integer = Annotated[int, rejects("must be an integer, got {value}")]


class Cp2kParent(MpiLaunch, AseProcessParent):
    """DFT with CP2K (Quickstep, GTH pseudopotentials): the physics options, then how a job runs."""

    name: ClassVar[str] = "cp2k"
    physics_fields: ClassVar[tuple[str, ...]] = (
        "xc",
        "basis_set",
        "basis_set_file",
        "pseudo_potential",
        "potential_file",
        "cutoff_ry",
        "rel_cutoff_ry",
        "max_scf",
        "eps_scf",
        "electronic_temperature_k",
        "added_mos",
        "charge",
        "multiplicity",
        "uks",
        "poisson_solver",
        "kpt_density",
        "kpts",
        "extra_input",
    )
    log_name: ClassVar[str | None] = CP2K_LOG_NAME

    # physics
    xc: Text = Field("PBE", description="Exchange-correlation functional, as CP2K's XC_FUNCTIONAL names it (PBE, BLYP, PADE, ...)")
    basis_set: Text = Field("DZVP-MOLOPT-SR-GTH", description="Gaussian basis set of every element, e.g. SZV-MOLOPT-SR-GTH (smaller)")
    basis_set_file: Text = Field("BASIS_MOLOPT", description="File that holds the basis set: a name in CP2K's data folder, or a path")
    pseudo_potential: Text = Field("GTH-PBE", description="GTH pseudopotential of every element (its valence follows the basis set)")
    potential_file: Text = Field(
        "GTH_POTENTIALS", description="File that holds the pseudopotentials: a name in CP2K's data folder, or a path"
    )
    cutoff_ry: PositiveFloat = Field(400.0, description="Plane-wave cutoff of the finest density grid (MGRID CUTOFF), Ry")
    rel_cutoff_ry: PositiveFloat = Field(50.0, description="Cutoff that maps a Gaussian onto a grid level (MGRID REL_CUTOFF), Ry")
    max_scf: PositiveInt = Field(100, description="SCF iterations before the job fails (CP2K would go on unconverged: nft fails it)")
    eps_scf: PositiveFloat = Field(1e-6, description="SCF convergence: largest change of the density matrix (EPS_SCF)")
    electronic_temperature_k: NonNegativeFloat = Field(
        1000.0, description="Fermi-Dirac smearing as an electronic temperature, K (metals need it); 0: integer occupations"
    )
    added_mos: Integer = Field(-1, description="Unoccupied orbitals computed with smearing (ADDED_MOS); -1: all the basis allows")
    charge: Integer = Field(0, description="Total charge, e")
    multiplicity: PositiveInt | None = Field(None, description="Spin multiplicity 2S+1; default: CP2K's (lowest)")
    uks: Flag = Field(False, description="Unrestricted (spin-polarised) Kohn-Sham")
    poisson_solver: PoissonSolver = Field(
        "mt", description="Poisson solver of a non-periodic box (a chunk): mt (Martyna-Tuckerman) or wavelet"
    )
    kpt_density: PositiveFloat = Field(
        30.0, description="k-points of a periodic cell: k_i = ceil(kpt_density / |a_i|), Å; Γ only when all are 1"
    )
    kpts: Grid | None = Field(None, description="Explicit Monkhorst-Pack grid of a periodic cell, overrides kpt_density")
    extra_input: String = Field(
        "", description="CP2K input text merged into the generated input (sections nft does not set, e.g. &FORCE_EVAL &DFT &QS)"
    )
    # execution (do not change the result): ranks, launcher (MpiLaunch), threads (AseProcessParent)
    command: Text = Field("cp2k_shell", description="The CP2K shell program; an MPI launch prefixes it when ranks > 1 (cp2k_shell.psmp)")

    # -- the structure and the calculator, in the runner process --------------------------------

    def check_structure(self, atoms: Atoms) -> None:
        if atoms.cell.rank < 3:
            raise ReferenceFailed("cp2k: the structure needs a full cell (a box with vacuum for a chunk)")
        if atoms.pbc.any() and not atoms.pbc.all():
            raise ReferenceFailed(f"cp2k: a structure periodic along some axes only (pbc {atoms.pbc.tolist()}) is not supported")

    def kpts_for(self, atoms: Atoms) -> tuple[int, int, int]:
        """The k-point grid: explicit `kpts`, else ceil(kpt_density/|a_i|) on periodic axes; Γ for a box."""
        if not atoms.pbc.any():
            return 1, 1, 1
        if self.kpts:
            k1, k2, k3 = (int(k) for k in self.kpts)
            return k1, k2, k3
        n1, n2, n3 = (max(1, math.ceil(self.kpt_density / length)) for length in atoms.cell.lengths())
        return n1, n2, n3

    def shell_command(self) -> str:
        """The command line that starts the CP2K shell: MPI launch (ranks > 1 or in an MPIExecutor) and program."""
        prefix = self.launch_prefix()
        program = self.command
        if prefix and program == "cp2k_shell":
            program = "cp2k_shell.psmp"  # the MPI build (Debian's cp2k_shell is a link to it)
        return shlex.join([*prefix, program])

    def input_template(self, atoms: Atoms) -> str:
        """The CP2K input that ASE's calculator completes (coordinates, cell, kinds, XC, cutoff, MAX_SCF):
        `extra_input`, with the SCF, smearing, mixing, Poisson solver and k-points of these options."""
        from ase.calculators.cp2k import parse_input

        root = parse_input(self.extra_input)
        scf = "FORCE_EVAL/DFT/SCF"
        root.add_keyword(scf, f"EPS_SCF {self.eps_scf:.6e}")
        if self.electronic_temperature_k > 0:
            root.add_keyword(scf, f"ADDED_MOS {self.added_mos}")
            root.add_keyword(f"{scf}/SMEAR", "_SECTION_PARAMETERS_ ON")
            root.add_keyword(f"{scf}/SMEAR", "METHOD FERMI_DIRAC")
            root.add_keyword(f"{scf}/SMEAR", f"ELECTRONIC_TEMPERATURE [K] {self.electronic_temperature_k:.6f}")
            root.add_keyword(f"{scf}/MIXING", "METHOD BROYDEN_MIXING")
            root.add_keyword(f"{scf}/MIXING", "ALPHA 0.2")
        root.add_keyword("FORCE_EVAL/DFT/MGRID", f"REL_CUTOFF [Ry] {self.rel_cutoff_ry:.6f}")
        if not atoms.pbc.any():
            root.add_keyword("FORCE_EVAL/DFT/POISSON", "PERIODIC NONE")
            root.add_keyword("FORCE_EVAL/DFT/POISSON", f"PSOLVER {self.poisson_solver.upper()}")
        kpts = self.kpts_for(atoms)
        if kpts != (1, 1, 1):
            root.add_keyword("FORCE_EVAL/DFT/KPOINTS", "SCHEME MONKHORST-PACK {} {} {}".format(*kpts))
        return "\n".join(root.write())

    def calculator_for(self, atoms: Atoms) -> BaseCalculator:
        """ASE's CP2K calculator with these options; it starts `cp2k_shell` (closed by `compute_here`)."""
        from ase.calculators.cp2k import CP2K

        return CP2K(
            command=self.shell_command(),
            label=CP2K_LOG_NAME.removesuffix(".out"),
            xc=self.xc,
            basis_set=self.basis_set,
            basis_set_file=self.basis_set_file,
            pseudo_potential=self.pseudo_potential,
            potential_file=self.potential_file,
            cutoff=self.cutoff_ry * Rydberg,
            max_scf=self.max_scf,
            charge=self.charge,
            multiplicity=self.multiplicity,
            uks=self.uks,
            poisson_solver=None,  # set by input_template, for wavelets too
            stress_tensor=False,
            inp=self.input_template(atoms),
        )

    def failure_in(self, calculator: BaseCalculator) -> str | None:
        """An SCF that stopped at `max_scf` unconverged (CP2K only warns in its output)."""
        output = Path(CP2K_LOG_NAME)
        text = output.read_text(errors="replace") if output.exists() else ""
        if any(marker in text for marker in SCF_NOT_CONVERGED):
            return f"SCF did not converge within max_scf={self.max_scf} iterations (eps_scf={self.eps_scf:g})"
        return None
