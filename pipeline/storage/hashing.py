"""The hashes the database identifies things by: a file's bytes (model files) and an `ase.Atoms` geometry."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ase import Atoms

from pipeline.storage.schema import geometry_hash

__all__ = ["atoms_geometry_hash", "file_sha256"]


def atoms_geometry_hash(atoms: Atoms) -> str:
    """The geometry hash the database uses: numbers, positions/cell rounded to 1e-6 Å, pbc."""
    return geometry_hash(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (model files are recorded with it)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
