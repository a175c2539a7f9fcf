"""The campaign config: one TOML file (docs/campaign.md), validated once, before anything is written.

`load_config(path)` parses the TOML, checks every section with strict pydantic models (unknown keys
and wrong types are errors), resolves paths (relative to the config file; a relative SQLite path
inside the workdir), reads the structure files with ASE and checks that the initial set covers the
targets' elements and that the workdir can be written. Every problem is one `BadInput` line naming
the file and the field, e.g. ``config.toml: chunks.radius: must be > 0``.
"""
from __future__ import annotations

import os
import tempfile
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from pipeline.campaign.training_set import TrainingEnvironment
from pipeline.errors import BadInput, first_problem
from pipeline.execution.parents import PARENTS, Parent, ParentConfigError, parent_for
from pipeline.science.settings import TrainingSettings
from pipeline.science.structures import structure_problem
from pipeline.storage.engine import DatabaseError, check_driver, mask_password, resolve_database_url

MIN_SEPARATION_NEAREST_NEIGHBOURS = 1.1
"""Default `chunks.min_separation`, in units of the initial set's nearest-neighbour distance."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class CampaignSection(_Section):
    name: str = Field(min_length=1)
    workdir: str | None = None  # default: runs/<name> beside the config file
    database: str = "sqlite:///nft.db"


class DataSection(_Section):
    targets: list[str] = Field(min_length=1)
    initial: list[str] = Field(min_length=1)

    @field_validator("targets", "initial", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class _ParentChoice(_Section):
    calculator: str = "emt"

    def tables(self) -> dict[str, dict[str, Any]]:
        """The `[parent.NAME]` option tables given, by parent name."""
        return {name: table for name, table in self if name != "calculator" and table is not None}


ParentSection = create_model(
    "ParentSection",
    __base__=_ParentChoice,
    __doc__="`[parent]`: the calculator's name, and a `[parent.NAME]` table of options for each parent that has options.",
    **{name: (dict[str, Any] | None, None) for name, parent in PARENTS.items() if parent.model_fields},
)


class ChunksSection(_Section):
    radius: float = Field(8.0, gt=0)  # Å
    vacuum: float = Field(6.0, ge=0)  # Å
    max_per_iteration: int = Field(20, ge=1)
    min_separation: float | None = Field(None, ge=0)  # Å; default: 1.1 × the initial set's nearest-neighbour distance
    # where a chunk's central force is trained: "target" (the atom's own environment in the target)
    # or "chunk" (inside the carved chunk, as the paper does); see pipeline/campaign/training_set.py
    training_environment: TrainingEnvironment = "target"


class ActiveSection(_Section):
    threshold: float | None = Field(None, gt=0)  # eV/Å; default by parent
    max_iterations: int = Field(20, ge=1)
    patience: int | None = Field(None, ge=1)
    select_fraction: float | None = Field(None, gt=0, le=1)
    selection_uncertainty: Literal["force", "energy"] = "force"  # what orders the atoms picked for chunks


class SiteSection(_Section):
    name: str = Field("local", min_length=1)  # a file in site_configs/ or a path (relative to the config)
    options: dict[str, Any] = {}


class ConfigFile(_Section):
    """The TOML file, section by section (docs/campaign.md, "The config file")."""

    campaign: CampaignSection
    data: DataSection
    parent: ParentSection = ParentSection()
    chunks: ChunksSection = ChunksSection()
    model: TrainingSettings = TrainingSettings()
    active: ActiveSection = ActiveSection()
    site: SiteSection = SiteSection()


@dataclass(frozen=True)
class CampaignConfig:
    """A validated campaign: the file's sections, resolved paths and the structures read from them."""

    path: Path
    file: ConfigFile
    workdir: Path
    database_url: str
    target_files: tuple[Path, ...]
    initial_files: tuple[Path, ...]
    targets: tuple[Atoms, ...]
    initial: tuple[Atoms, ...]
    parent: Parent  # the parent calculator with its options checked, defaults filled in

    @property
    def name(self) -> str:
        return self.file.campaign.name

    @property
    def threshold(self) -> float:
        """Target uncertainty δ, eV/Å."""
        explicit = self.file.active.threshold
        return explicit if explicit is not None else self.parent.default_threshold

    @cached_property
    def min_separation(self) -> float:
        """Minimum distance (Å) between chunk centres picked in one iteration; by default 1.1 × the
        initial set's nearest-neighbour distance, so nearest neighbours are never carved together
        but the next shell may be (chosen on the convergence bench, bench/RESULTS.md)."""
        explicit = self.file.chunks.min_separation
        if explicit is not None:
            return explicit
        from pipeline.science.descriptors import median_nearest_neighbour_distance

        return round(MIN_SEPARATION_NEAREST_NEIGHBOURS * median_nearest_neighbour_distance(self.initial), 3)

    @property
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers the model knows: those of the initial set."""
        return tuple(sorted({int(z) for atoms in self.initial for z in atoms.numbers}))

    @property
    def site(self) -> str:
        """The `[site] name`: a shipped site name, or a path resolved against the config's folder."""
        name = self.file.site.name
        if "/" in name or name.endswith(".py"):
            return str((self.path.parent / name).resolve())
        return name

    def as_dict(self) -> dict[str, Any]:
        """The validated sections as plain data (stored with the campaign in the database), the
        database password masked: a config in a shared database must not hand it to its readers."""
        data = self.file.model_dump(mode="json")
        data["campaign"]["database"] = mask_password(data["campaign"]["database"])
        return data


def load_config(path: str | os.PathLike[str]) -> CampaignConfig:
    """Read and validate a campaign config; raises `BadInput` (one line: file and field) on any problem."""
    path = Path(path)
    label = str(path)
    raw = _read_toml(path, label)
    try:
        file = ConfigFile.model_validate(raw)
    except ValidationError as error:
        raise BadInput(f"{label}: {first_problem(error)}") from None
    here = path.resolve().parent
    parent = _parent(file.parent, label)
    workdir = (here / (file.campaign.workdir or f"runs/{file.campaign.name}")).resolve()
    _check_writable(workdir, label)
    try:
        database_url = resolve_database_url(file.campaign.database, workdir)
    except Exception as error:
        raise BadInput(f"{label}: campaign.database: not a database URL ({_one_line(error)})") from None
    try:
        check_driver(database_url)
    except DatabaseError as error:
        raise BadInput(f"{label}: campaign.database: {error}") from None
    target_files = tuple(_existing(here, name, f"data.targets[{k}]", label) for k, name in enumerate(file.data.targets))
    initial_files = tuple(_existing(here, name, f"data.initial[{k}]", label) for k, name in enumerate(file.data.initial))
    targets = tuple(atoms for k, item in enumerate(target_files) for atoms in _read_structures(item, f"data.targets[{k}]", label))
    initial = tuple(atoms for k, item in enumerate(initial_files) for atoms in _read_structures(item, f"data.initial[{k}]", label))
    known = {int(z) for atoms in initial for z in atoms.numbers}
    for k, atoms in enumerate(targets):
        missing = sorted({int(z) for z in atoms.numbers} - known)
        if missing:
            symbols = ", ".join(Atoms(numbers=missing).get_chemical_symbols())
            raise BadInput(f"{label}: data.targets: target structure {k} has element(s) {symbols} that the initial set lacks")
    return CampaignConfig(
        path=path.resolve(),
        file=file,
        workdir=workdir,
        database_url=database_url,
        target_files=target_files,
        initial_files=initial_files,
        targets=targets,
        initial=initial,
        parent=parent,
    )


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{label}: no such config file") from None
    except OSError as error:
        raise BadInput(f"{label}: cannot read ({error.strerror or error})") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"{label}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as error:
        raise BadInput(f"{label}: malformed TOML ({_one_line(error)})") from None


def _parent(section: _ParentChoice, label: str) -> Parent:
    """The `[parent]` calculator with its `[parent.NAME]` options checked; a table for another parent is an error."""
    calculator = section.calculator.lower()
    tables = section.tables()
    for name in tables:
        if name != calculator:
            raise BadInput(f"{label}: parent.{name}: options for {name}, but parent.calculator is {section.calculator!r}")
    try:
        return parent_for(section.calculator, tables.get(calculator))
    except ParentConfigError as error:
        raise BadInput(f"{label}: {error}") from None


def _check_writable(workdir: Path, label: str) -> None:
    """The workdir, or the nearest folder above it that exists, must be a folder we can write in."""
    existing = workdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"{label}: campaign.workdir: {existing} is not a directory")
    try:  # a real write probe: permission bits say nothing to root or on read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise BadInput(f"{label}: campaign.workdir: {workdir} is not writable ({error.strerror or error})") from None


def _existing(here: Path, name: str, field: str, label: str) -> Path:
    path = (here / name).resolve()
    if not path.is_file():
        raise BadInput(f"{label}: {field}: no such file: {path}")
    if not os.access(path, os.R_OK):
        raise BadInput(f"{label}: {field}: cannot read {path}")
    return path


def _read_structures(path: Path, field: str, label: str) -> list[Atoms]:
    """Every image of an ASE-readable file (labels, where present, come along as a calculator)."""
    from ase.io import read

    try:
        images = read(str(path), index=":")
    except Exception as error:
        raise BadInput(f"{label}: {field}: {path.name} is not a structure file ASE can read ({_one_line(error)})") from None
    images = images if isinstance(images, list) else [images]
    if not images:
        raise BadInput(f"{label}: {field}: {path.name} holds no structures")
    for k, atoms in enumerate(images):
        problem = structure_problem(atoms)
        if problem:
            raise BadInput(f"{label}: {field}: {path.name} image {k} {problem}")
    return images


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
