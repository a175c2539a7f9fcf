"""The alloy bench set (issue 27): targets of two to four elements that EMT knows, of many kinds.

Beside the pure-metal set of `bench/convergence_set.py` and built the same way: each target is an
alloy structure of 100–600 atoms, relaxed with EMT (FIRE, to 0.1 eV/Å or 300 steps; mixed lattice
constants leave strained sites) and then rattled until its largest EMT force is about 5 eV/Å, with a
larger transfer structure of the same composition and kind. Kinds: random alloys (binary, ternary,
four elements), a core–shell particle, a surface-segregated particle, ordered intermetallics (an L1₀
crystal, an L1₂ particle) and an alloy slab.

The `cells` start of every case is `random_cells` (the paper's kind: 20 periodic fcc cells of 1–16
atoms, random occupation, strained and rattled); the `initial` start is `nft initial` for the case's
elements (see `write_case`). Everything is deterministic for a seed.

    python bench/alloy_set.py OUTDIR [--cases NAME,…] [--seed S] [--start cells|initial]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.cluster import Decahedron, Icosahedron, Octahedron
from ase.data import atomic_numbers
from ase.neighborlist import neighbor_list
from ase.optimize import FIRE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402, F401  (puts the repository root on sys.path)
from convergence_set import Case, _alloy, _cluster, _vegard, main, random_cells  # noqa: E402

RELAX_FMAX = 0.1  # eV/Å
RELAX_STEPS = 300


def _relaxed(atoms: Atoms) -> Atoms:
    """`atoms` after an EMT relaxation of its positions (FIRE, `RELAX_FMAX` or `RELAX_STEPS`), no calculator."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    FIRE(atoms, logfile=None).run(fmax=RELAX_FMAX, steps=RELAX_STEPS)
    atoms.calc = None
    return atoms


def _surface(atoms: Atoms) -> np.ndarray:
    """Mask of the under-coordinated atoms of an fcc structure (fewer than 12 neighbours within 1.2
    times its median nearest-neighbour distance; the second shell is √2 times farther): the outer
    shell of a particle, the surface layers of a slab."""
    first, distance = neighbor_list("id", atoms, 3.2)  # the nearest neighbours of every EMT metal: 2.5–2.9 Å
    nearest = np.full(len(atoms), np.inf)
    np.minimum.at(nearest, first, distance)
    coordination = np.bincount(neighbor_list("i", atoms, 1.2 * float(np.median(nearest))), minlength=len(atoms))
    return coordination < 12


def _core_shell(cluster: Atoms, core: str, shell: str) -> Atoms:
    """The particle with its under-coordinated outer shell of `shell` and the rest of `core`."""
    atoms = _cluster(cluster)
    atoms.numbers = np.where(_surface(atoms), atomic_numbers[shell], atomic_numbers[core])
    return atoms


def _segregated(cluster: Atoms, symbols: tuple[str, str], inner: float, outer: float, seed: int) -> Atoms:
    """A random alloy of `symbols` whose outer shell holds the first element at fraction `outer`
    and whose interior holds it at fraction `inner` (surface segregation)."""
    atoms = _cluster(cluster)
    surface = _surface(atoms)
    first = np.random.default_rng(seed).random(len(atoms)) < np.where(surface, outer, inner)
    atoms.numbers = np.where(first, atomic_numbers[symbols[0]], atomic_numbers[symbols[1]])
    return atoms


def _fcc_indices(atoms: Atoms, a: float) -> np.ndarray:
    """Integer coordinates (units of a/2) of fcc sites relative to the site nearest the centre."""
    origin = atoms.positions[np.argmin(np.linalg.norm(atoms.positions - atoms.positions.mean(axis=0), axis=1))]
    return np.rint(2.0 * (atoms.positions - origin) / a).astype(int)


def _l10(atoms: Atoms, symbols: tuple[str, str], a: float) -> Atoms:
    """L1₀ order on an fcc structure of lattice constant `a`: (001) planes alternately of each element."""
    atoms = atoms.copy()
    atoms.numbers = np.where(_fcc_indices(atoms, a)[:, 2] % 2 == 0, atomic_numbers[symbols[0]], atomic_numbers[symbols[1]])
    return atoms


def _l12(atoms: Atoms, majority: str, minority: str, a: float) -> Atoms:
    """L1₂ order (A₃B) on an fcc structure: `minority` on the cube corners, `majority` on the face centres."""
    atoms = atoms.copy()
    corner = np.all(_fcc_indices(atoms, a) % 2 == 0, axis=1)
    atoms.numbers = np.where(corner, atomic_numbers[minority], atomic_numbers[majority])
    return atoms


def _l10_crystal_vacancy(symbols: tuple[str, str], repeat: int) -> Atoms:
    """A periodic L1₀ crystal of repeat³ cubic cells (Vegard lattice constant) with one vacancy."""
    a = _vegard(symbols)
    crystal = bulk(symbols[0], "fcc", a=a, cubic=True).repeat(repeat)
    crystal = _l10(crystal, symbols, a)
    del crystal[len(crystal) // 2]
    return crystal


def _random_slab(symbols: tuple[str, ...], size: tuple[int, int, int], seed: int) -> Atoms:
    """A random-alloy fcc(111) slab, periodic in x and y (8 Å of vacuum on each side)."""
    slab = fcc111(symbols[0], size=size, a=_vegard(symbols), vacuum=8.0, periodic=True)
    return _alloy(slab, symbols, seed)


def _particle(kind: str, symbols: tuple[str, ...], *shape: int, fractions: tuple[float, ...] | None = None) -> Atoms:
    """An fcc particle (`Icosahedron`, `Decahedron` or `Octahedron` with `shape`) at the Vegard lattice constant."""
    build = {"icosahedron": Icosahedron, "decahedron": Decahedron, "octahedron": Octahedron}[kind]
    return _cluster(build(symbols[0], *shape, latticeconstant=_vegard(symbols, fractions)))


def _l12_particle(majority: str, minority: str, length: int, cutoff: int) -> Atoms:
    a = _vegard((majority, minority), (0.75, 0.25))
    return _l12(_cluster(Octahedron(majority, length, cutoff, latticeconstant=a)), majority, minority, a)


PDAG, CUPDPT, AGCU, CUNI = ("Ag", "Pd"), ("Cu", "Pd", "Pt"), ("Ag", "Cu"), ("Cu", "Ni")
CUAU, PTNI, AUPD, CUAGAUPD = ("Au", "Cu"), ("Ni", "Pt"), ("Au", "Pd"), ("Ag", "Au", "Cu", "Pd")

ALLOY_CASES: tuple[Case, ...] = (
    Case(
        "PdAg-random-cuboctahedron-309",
        PDAG,
        lambda: _relaxed(_alloy(_particle("octahedron", PDAG, 9, 4), PDAG, 11)),
        lambda: _relaxed(_alloy(_particle("octahedron", PDAG, 11, 5), PDAG, 12)),
        random_cells,
    ),
    Case(
        "CuPdPt-random-icosahedron-147",
        CUPDPT,
        lambda: _relaxed(_alloy(_particle("icosahedron", CUPDPT, 4), CUPDPT, 13)),
        lambda: _relaxed(_alloy(_particle("icosahedron", CUPDPT, 5), CUPDPT, 14)),
        random_cells,
    ),
    Case(
        "Cu@Ag-core-shell-icosahedron-147",
        AGCU,
        lambda: _relaxed(_core_shell(_particle("icosahedron", AGCU, 4), "Cu", "Ag")),
        lambda: _relaxed(_core_shell(_particle("icosahedron", AGCU, 5), "Cu", "Ag")),
        random_cells,
    ),
    Case(
        "CuNi-Cu-segregated-decahedron-383",
        CUNI,
        lambda: _relaxed(_segregated(_particle("decahedron", CUNI, 5, 2, 1), ("Cu", "Ni"), 0.25, 0.85, 15)),
        lambda: _relaxed(_segregated(_particle("decahedron", CUNI, 6, 3, 1), ("Cu", "Ni"), 0.25, 0.85, 16)),
        random_cells,
    ),
    Case(
        "CuAu-L10-crystal-vacancy-255",
        CUAU,
        lambda: _relaxed(_l10_crystal_vacancy(("Cu", "Au"), 4)),
        lambda: _relaxed(_l10_crystal_vacancy(("Cu", "Au"), 5)),
        random_cells,
    ),
    Case(
        "Pt3Ni-L12-truncated-octahedron-405",
        PTNI,
        lambda: _relaxed(_l12_particle("Pt", "Ni", 9, 3)),
        lambda: _relaxed(_l12_particle("Pt", "Ni", 11, 4)),
        random_cells,
    ),
    Case(
        "AuPd-random-slab111-216",
        AUPD,
        lambda: _relaxed(_random_slab(AUPD, (6, 6, 6), 17)),
        lambda: _relaxed(_random_slab(AUPD, (8, 8, 6), 18)),
        random_cells,
    ),
    Case(
        "CuAgAuPd-random-truncated-octahedron-201",
        CUAGAUPD,
        lambda: _relaxed(_alloy(_particle("octahedron", CUAGAUPD, 7, 2), CUAGAUPD, 19)),
        lambda: _relaxed(_alloy(_particle("octahedron", CUAGAUPD, 9, 3), CUAGAUPD, 20)),
        random_cells,
    ),
)


if __name__ == "__main__":
    main(ALLOY_CASES, __doc__.splitlines()[0])
