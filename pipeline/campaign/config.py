"""The campaign config (SPEC §2): one TOML file, validated once, before anything is written.

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
from typing import TYPE_CHECKING, Any, Literal

from ase import Atoms
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from pipeline.campaign.training_set import TrainingEnvironment
from pipeline.errors import BadInput
from pipeline.execution.parents import PARENTS, Parent, ParentConfigError, parent_for
from pipeline.storage.database import resolve_database_url

if TYPE_CHECKING:
    from pipeline.science.training import TrainingSettings

MIN_SEPARATION_NEAREST_NEIGHBOURS = 1.1
"""Default `chunks.min_separation`, in units of the initial set's nearest-neighbour distance."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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


class DescriptorSection(_Section):
    """Symmetry-function parameters (SPEC §1); unset keys keep the 20-feature defaults."""

    kind: str | None = None  # "g5-moments" (default) or "g4"
    radial_centers: list[float] | None = None  # Å
    radial_etas: list[float] | None = None  # Å⁻², one per centre
    angular_etas: list[float] | None = None  # Å⁻²
    angular_zetas: list[int] | None = None
    angular_lambdas: list[int] | None = None

    def as_settings(self) -> dict[str, Any]:
        """The keys that were set, as `SymmetryFunctionParams` arguments."""
        return {key: tuple(value) if isinstance(value, list) else value for key, value in self.model_dump().items() if value is not None}


class ModelSection(_Section):
    cutoff: float = Field(6.5, gt=0)  # Å
    hidden: list[int] = Field([5, 5], min_length=1)
    ensemble: int = Field(10, ge=2)
    epochs: int = Field(300, ge=0)
    learning_rate: float = Field(1e-2, gt=0)
    final_learning_rate: float = Field(5e-4, gt=0)
    lbfgs_steps: int = Field(1000, ge=0)
    energy_weight: float = Field(1.0, ge=0)
    force_weight: float = Field(1.0, ge=0)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    patience_epochs: int = Field(300, ge=1)
    bootstrap: bool = False
    seed: int = Field(0, ge=0)
    training_processes: int | None = Field(None, ge=1)  # members sharded over processes; default: the site decides
    warm_start: bool = True  # start each iteration from the previous iteration's members (see docs/campaign.md)
    # training and prediction device: "auto" (the site's, else cuda when torch sees a GPU, else cpu)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    descriptor: DescriptorSection = DescriptorSection()

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError("every layer width must be >= 1")
        return value

    @field_validator("device")
    @classmethod
    def _gpu_present(cls, value: str) -> str:
        if value == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"'cuda' but torch {torch.__version__} sees no CUDA GPU on this machine "
                                 "(use 'auto': a GPU site's training nodes pick their GPUs)")
        return value


class ActiveSection(_Section):
    threshold: float | None = Field(None, gt=0)  # eV/Å; default by parent
    max_iterations: int = Field(20, ge=1)
    patience: int | None = Field(None, ge=1)
    select_fraction: float | None = Field(None, gt=0, le=1)


class SiteSection(_Section):
    name: str = Field("local", min_length=1)  # a file in site_configs/ or a path (relative to the config)
    options: dict[str, Any] = {}


class ConfigFile(_Section):
    """The TOML file, section by section (SPEC §2)."""

    campaign: CampaignSection
    data: DataSection
    parent: ParentSection = ParentSection()
    chunks: ChunksSection = ChunksSection()
    model: ModelSection = ModelSection()
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
        but the next shell may be (measured on the bench set: fewer iterations than the cutoff)."""
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

    def training_settings(self) -> "TrainingSettings":
        from pipeline.science.training import TrainingSettings

        model = self.file.model
        return TrainingSettings(
            ensemble=model.ensemble,
            hidden=tuple(model.hidden),
            cutoff=model.cutoff,
            epochs=model.epochs,
            learning_rate=model.learning_rate,
            final_learning_rate=model.final_learning_rate,
            lbfgs_steps=model.lbfgs_steps,
            energy_weight=model.energy_weight,
            force_weight=model.force_weight,
            validation_fraction=model.validation_fraction,
            patience_epochs=model.patience_epochs,
            bootstrap=model.bootstrap,
            seed=model.seed,
            elements=self.elements,
            descriptor=model.descriptor.as_settings(),
            device=model.device,
        )

    def as_dict(self) -> dict[str, Any]:
        """The validated sections as plain data (stored with the campaign in the database)."""
        return self.file.model_dump(mode="json")


def load_config(path: str | os.PathLike[str]) -> CampaignConfig:
    """Read and validate a campaign config; raises `BadInput` (one line: file and field) on any problem."""
    path = Path(path)
    label = str(path)
    raw = _read_toml(path, label)
    try:
        file = ConfigFile.model_validate(raw)
    except ValidationError as error:
        raise BadInput(f"{label}: {_first_problem(error)}") from None
    here = path.resolve().parent
    parent = _parent(file.parent, label)
    _check_descriptor(file.model, label)
    workdir = (here / (file.campaign.workdir or f"runs/{file.campaign.name}")).resolve()
    _check_writable(workdir, label)
    try:
        database_url = resolve_database_url(file.campaign.database, workdir)
    except Exception as error:
        raise BadInput(f"{label}: campaign.database: not a database URL ({_one_line(error)})") from None
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


def _check_descriptor(model: ModelSection, label: str) -> None:
    """The descriptor keys must make a valid symmetry-function set (e.g. one η per radial centre)."""
    from pipeline.science.descriptors import SymmetryFunctionParams

    try:
        SymmetryFunctionParams(elements=(1,), cutoff=model.cutoff, **model.descriptor.as_settings())
    except ValueError as error:
        raise BadInput(f"{label}: model.descriptor: {_one_line(error)}") from None


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


def _first_problem(error: ValidationError) -> str:
    """One line for the first pydantic error: the dotted field and what is wrong with it."""
    problem = error.errors()[0]
    field = ".".join(str(part) for part in problem["loc"] if not str(part).startswith("function-"))
    kind, context = problem["type"], problem.get("ctx") or {}
    value = problem.get("input")
    if kind == "extra_forbidden":
        return f"{field}: unknown key"
    if kind == "missing":
        return f"{field}: required"
    bounds = {
        "greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(context.values()))
        return f"{field}: must be {bounds[kind]} {limit:g} (got {value!r})"
    if kind in ("too_short", "string_too_short"):
        return f"{field}: must not be empty"
    types = {
        "float_type": "a number", "int_type": "an integer", "bool_type": "true or false",
        "string_type": "a string", "list_type": "a list", "dict_type": "a table", "model_type": "a table",
    }
    if kind in types:
        return f"{field}: must be {types[kind]} (got {value!r})"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{field}: {message[:1].lower()}{message[1:]}"


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
        if len(atoms) == 0:
            raise BadInput(f"{label}: {field}: {path.name} image {k} has no atoms")
    return images


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
