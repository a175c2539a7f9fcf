"""The convergence bench set: targets of many fcc metals, shapes and sizes that nobody tuned for.

Each case is a target (rattled until its largest EMT force is about 5 eV/Å, the paper's range),
a larger structure of the same kind for transfer, and a small bulk initial set of its element(s)
(strained and rattled cells of 2–16 atoms, labelled by EMT; `--start initial`: an `nft initial` set
of its elements instead). Everything is deterministic for a seed. The alloy set (bench/alloy_set.py)
builds on the helpers here.

    python bench/convergence_set.py OUTDIR [--cases NAME,…] [--seed S] [--start cells|initial]
    # writes OUTDIR/<case>/{target,transfer,initial}.traj
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.cluster import Decahedron, Icosahedron, Octahedron
from ase.data import atomic_numbers
from ase.io import write

from pipeline.science.examples import FCC_CELL_TEMPLATES, emt_label
from pipeline.science.examples import fcc_lattice_constant as lattice_constant

TARGET_MAX_FORCE_EV_PER_ANGSTROM = 5.0
"""Rattle each target until its largest EMT force is about this (the paper's Pt260: 0.1–5 eV/Å)."""


def _cluster(atoms: Atoms) -> Atoms:
    """A plain non-periodic copy (no cell, no calculator)."""
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, pbc=False)


def rattle_to_force(atoms: Atoms, seed: int, max_force: float = TARGET_MAX_FORCE_EV_PER_ANGSTROM) -> Atoms:
    """`atoms` with a normal rattle whose amplitude is bisected until max |F_EMT| ≈ `max_force` eV/Å."""
    noise = np.random.default_rng(seed).normal(size=atoms.positions.shape)
    low, high = 0.0, 0.3

    def rattled(sigma: float) -> tuple[Atoms, float]:
        trial = atoms.copy()
        trial.positions += sigma * noise
        trial.calc = EMT()
        return trial, float(np.linalg.norm(trial.get_forces(), axis=1).max())

    best = atoms
    for _ in range(25):
        sigma = 0.5 * (low + high)
        best, force = rattled(sigma)
        if abs(force - max_force) < 0.05:
            break
        low, high = (sigma, high) if force < max_force else (low, sigma)
    best.calc = None
    return best


ALLOY_CELLS = 8
"""Random-alloy initial sets: this many 32-atom cells (instead of `count` cells of 2–16 atoms)."""


def _strain_rattle_label(atoms: Atoms, rng: np.random.Generator) -> Atoms:
    """`atoms` strained (symmetric, ±3 %), rattled (σ drawn from 0.02–0.12 Å), wrapped and EMT-labelled."""
    strain = rng.uniform(-0.03, 0.03, size=(3, 3))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
    atoms.positions += rng.normal(0.0, rng.uniform(0.02, 0.12), size=atoms.positions.shape)
    atoms.wrap()
    return emt_label(atoms)


def bulk_cells(symbols: tuple[str, ...], count: int, seed: int) -> list[Atoms]:
    """EMT-labelled periodic fcc cells of the elements (Vegard lattice constant), each strained
    (±3 %) and rattled (σ 0.02–0.12 Å): `count` cells of 2–16 atoms of one element, or for alloys
    `ALLOY_CELLS` cubic 2×2×2 cells (32 atoms) with random decoration.

    A random decoration of a 2–16-atom periodic cell is an ordered compound, whose few environments
    leave most of a random alloy's uncovered: on the PtAu bench target (the same 60 chunks, default
    training; bench/RESULTS.md, "The PtAu alloy") the force MAE against EMT was 0.077 eV/Å with 20
    small cells (160 atoms) and 0.050 with these (256 atoms). (The alloy bench, bench/alloy_set.py,
    starts from `random_cells` instead: the paper's kind of start.)"""
    rng = np.random.default_rng(seed)
    if len(symbols) > 1:
        count = ALLOY_CELLS
    templates = FCC_CELL_TEMPLATES if len(symbols) == 1 else (({"cubic": True}, (2, 2, 2)),)
    cells = []
    for k in range(count):
        keywords, repeat = templates[k % len(templates)]
        numbers = np.array([atomic_numbers[s] for s in symbols])
        if len(symbols) == 1:
            fraction = np.array([1.0])
        else:
            fraction = rng.dirichlet(np.ones(len(symbols)))
        a = float(sum(f * lattice_constant(s) for f, s in zip(fraction, symbols)))
        template = bulk(symbols[0], "fcc", a=a, **keywords).repeat(repeat)
        atoms = Atoms(numbers=template.numbers, positions=template.positions, cell=template.cell, pbc=True)
        if len(symbols) > 1:
            atoms.numbers = rng.choice(numbers, size=len(atoms), p=fraction)
        cells.append(_strain_rattle_label(atoms, rng))
    return cells


def random_cells(symbols: tuple[str, ...], count: int, seed: int) -> list[Atoms]:
    """The paper's kind of start: `count` EMT-labelled periodic fcc cells of 1–16 atoms (the primitive
    cell, then `FCC_CELL_TEMPLATES` in turn), each site occupied at random with a composition drawn per cell
    (flat Dirichlet over `symbols`), the lattice constant by Vegard's law of the cell's own atoms,
    strained (±3 %) and rattled (σ 0.02–0.12 Å)."""
    rng = np.random.default_rng(seed)
    templates = (({}, (1, 1, 1)), *FCC_CELL_TEMPLATES)
    numbers = np.array([atomic_numbers[s] for s in symbols])
    constants = {atomic_numbers[s]: lattice_constant(s) for s in symbols}
    cells = []
    for k in range(count):
        keywords, repeat = templates[k % len(templates)]
        template = bulk("Cu", "fcc", a=1.0, **keywords).repeat(repeat)  # unit lattice constant, scaled below
        occupation = rng.choice(numbers, size=len(template), p=rng.dirichlet(np.ones(len(symbols))))
        a = float(np.mean([constants[int(z)] for z in occupation]))
        atoms = Atoms(numbers=occupation, positions=a * template.positions, cell=a * template.cell.array, pbc=True)
        cells.append(_strain_rattle_label(atoms, rng))
    return cells


def _slab_with_adatom(symbol: str, size: tuple[int, int, int]) -> Atoms:
    slab = fcc111(symbol, size=size, a=lattice_constant(symbol), vacuum=8.0, periodic=True)
    top = slab.positions[:, 2].max()
    layer = slab.positions[np.isclose(slab.positions[:, 2], top, atol=0.1)]
    site = layer[:3].mean(axis=0)  # a hollow site between three top-layer atoms
    site[2] = top + lattice_constant(symbol) / np.sqrt(3)  # one (111) interlayer spacing
    slab += Atoms(symbol, positions=[site])
    return slab


def _slab_with_vacancy(symbol: str, size: tuple[int, int, int]) -> Atoms:
    slab = fcc100(symbol, size=size, a=lattice_constant(symbol), vacuum=8.0, periodic=True)
    top = np.flatnonzero(np.isclose(slab.positions[:, 2], slab.positions[:, 2].max(), atol=0.1))
    del slab[int(top[len(top) // 2])]
    return slab


def _alloy(structure: Atoms, symbols: tuple[str, ...], seed: int, fractions: tuple[float, ...] | None = None) -> Atoms:
    """A random alloy of `symbols` on the sites of `structure` (a cluster, or a periodic structure that
    keeps its cell): each site drawn independently, with probabilities `fractions` (default equal)."""
    atoms = structure.copy() if structure.pbc.any() else _cluster(structure)
    atoms.calc = None
    rng = np.random.default_rng(seed)
    atoms.numbers = rng.choice([atomic_numbers[s] for s in symbols], size=len(atoms), p=fractions)
    return atoms


@dataclass(frozen=True)
class Case:
    """A bench target: how to build it and its transfer structure, the elements of its initial set and
    the cells of its `cells` start (`cells(elements, count, seed)`)."""

    name: str
    elements: tuple[str, ...]
    target: Callable[[], Atoms]
    transfer: Callable[[], Atoms]
    cells: Callable[[tuple[str, ...], int, int], list[Atoms]] = bulk_cells


def _vegard(symbols: tuple[str, ...], fractions: tuple[float, ...] | None = None) -> float:
    """Vegard's law: the (weighted) mean fcc lattice constant of the elements, Å."""
    return float(np.average([lattice_constant(s) for s in symbols], weights=fractions))


CASES: tuple[Case, ...] = (
    Case(
        "Cu-icosahedron-309",
        ("Cu",),
        lambda: _cluster(Icosahedron("Cu", 5, lattice_constant("Cu"))),
        lambda: _cluster(Icosahedron("Cu", 6, lattice_constant("Cu"))),
    ),
    Case(
        "Au-decahedron-146",
        ("Au",),
        lambda: _cluster(Decahedron("Au", 3, 2, 1, lattice_constant("Au"))),
        lambda: _cluster(Decahedron("Au", 4, 3, 1, lattice_constant("Au"))),
    ),
    Case(
        "Ag-cuboctahedron-309",
        ("Ag",),
        lambda: _cluster(Octahedron("Ag", 9, 4, lattice_constant("Ag"))),
        lambda: _cluster(Octahedron("Ag", 11, 5, lattice_constant("Ag"))),
    ),
    Case(
        "Ni-truncated-octahedron-201",
        ("Ni",),
        lambda: _cluster(Octahedron("Ni", 7, 2, lattice_constant("Ni"))),
        lambda: _cluster(Octahedron("Ni", 9, 3, lattice_constant("Ni"))),
    ),
    Case(
        "Pd-icosahedron-147",
        ("Pd",),
        lambda: _cluster(Icosahedron("Pd", 4, lattice_constant("Pd"))),
        lambda: _cluster(Icosahedron("Pd", 5, lattice_constant("Pd"))),
    ),
    Case(
        "Pt-decahedron-383",
        ("Pt",),
        lambda: _cluster(Decahedron("Pt", 5, 2, 1, lattice_constant("Pt"))),
        lambda: _cluster(Decahedron("Pt", 6, 3, 1, lattice_constant("Pt"))),
    ),
    Case(
        "Al-cuboctahedron-561",
        ("Al",),
        lambda: _cluster(Octahedron("Al", 11, 5, lattice_constant("Al"))),
        lambda: _cluster(Octahedron("Al", 13, 6, lattice_constant("Al"))),
    ),
    Case("Pt111-slab-adatom", ("Pt",), lambda: _slab_with_adatom("Pt", (5, 5, 4)), lambda: _slab_with_adatom("Pt", (7, 7, 4))),
    Case("Cu100-slab-vacancy", ("Cu",), lambda: _slab_with_vacancy("Cu", (5, 5, 5)), lambda: _slab_with_vacancy("Cu", (7, 7, 5))),
    Case(
        "PtAu-alloy-cuboctahedron-309",
        ("Au", "Pt"),
        lambda: _alloy(Octahedron("Pt", 9, 4, _vegard(("Pt", "Au"))), ("Pt", "Au"), 7),
        lambda: _alloy(Octahedron("Pt", 11, 5, _vegard(("Pt", "Au"))), ("Pt", "Au"), 8),
    ),
)


STARTS = ("cells", "initial")
"""Kinds of initial set: `cells` = the case's `cells` (labelled by EMT); `initial` = `nft initial` for
the case's elements with the EMT parent and default settings (`nft_initial_set`)."""
NFT = Path(sys.executable).parent / "nft"


def nft_initial_set(elements: tuple[str, ...], path: Path, seed: int) -> Path:
    """`path`, written by `nft initial ELEMENTS --output path --seed seed` (EMT parent, default settings;
    its database and jobs in PATH.nft, its output in PATH.log) unless it exists already: a cache."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONWARNINGS="ignore", PATH=f"{NFT.parent}{os.pathsep}{os.environ.get('PATH', '')}")
        log = path.parent / f"{path.name}.log"
        with open(log, "w") as handle:
            proc = subprocess.run(
                [str(NFT), "initial", ",".join(elements), "--output", str(path), "--seed", str(seed)],
                cwd=path.parent,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        if proc.returncode != 0 or not path.is_file():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"nft initial {','.join(elements)} failed (exit {proc.returncode}, {log}): {tail}")
    return path


def write_case(
    case: Case, folder: Path, seed: int = 0, initial_count: int = 20, start: str = "cells", cache: Path | None = None
) -> dict[str, Path]:
    """Write the case's target, transfer structure and labelled initial set of kind `start` (`STARTS`);
    returns their paths. The `initial` start's set is generated once per seed into `cache` (default
    `folder`) as nft-initial-seed-S.traj and copied."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.traj" for name in ("target", "transfer", "initial")}
    write(paths["target"], rattle_to_force(case.target(), seed=1000 + seed))
    write(paths["transfer"], rattle_to_force(case.transfer(), seed=2000 + seed))
    if start == "cells":
        write(paths["initial"], case.cells(case.elements, initial_count, seed))
    elif start == "initial":
        shutil.copyfile(nft_initial_set(case.elements, (cache or folder) / f"nft-initial-seed-{seed}.traj", seed), paths["initial"])
    else:
        raise ValueError(f"unknown start {start!r}; known: {', '.join(STARTS)}")
    return paths


def describe(case: Case, paths: dict[str, Path]) -> str:
    """One line: the target's atoms, elements, composition and |F_EMT| range, the transfer size and the
    initial set's cells and atoms."""
    from ase.io import read

    target = read(paths["target"])
    target.calc = EMT()
    forces = np.linalg.norm(target.get_forces(), axis=1)
    initial = read(paths["initial"], index=":")
    sizes = [len(atoms) for atoms in initial]
    return (
        f"{case.name}: {len(target)} atoms, elements {','.join(case.elements)}, {target.get_chemical_formula()}, "
        f"|F| {forces.min():.2f}-{forces.max():.2f} eV/Å, transfer {len(read(paths['transfer']))} atoms, "
        f"initial {len(initial)} cells of {min(sizes)}-{max(sizes)} atoms ({sum(sizes)} in all)"
    )


def main(cases: tuple[Case, ...] = CASES, description: str | None = None) -> None:
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", choices=STARTS, default="cells", help="kind of initial set (default cells)")
    args = parser.parse_args()
    chosen = [c for c in cases if not args.cases or c.name in args.cases.split(",")]
    for case in chosen:
        paths = write_case(case, args.outdir / case.name, seed=args.seed, start=args.start)
        print(describe(case, paths), flush=True)


if __name__ == "__main__":
    main()
