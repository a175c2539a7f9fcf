"""Any ASE calculator as a parent: its class by import path, the options its constructor gets, and the
options that define the physics (a result's identity in the database).

The class is imported and the options checked against its constructor when the config is read, so a
wrong path or option stops `nft` before any job runs. A job builds the calculator in its own process
and directory (`ase_process`): a file-based calculator (VASP, Quantum ESPRESSO, ORCA, FHI-aims)
writes its input and output there, and its `command` (with its MPI launch) comes from `options`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Annotated, Any, ClassVar

from ase import Atoms
from ase.calculators.calculator import BaseCalculator
from pydantic import Field, ValidationInfo, field_validator

from pipeline.execution.options import Table, Text, option_error, rejects
from pipeline.execution.parents.ase_process import AseProcessParent

EXECUTION_OPTIONS = ("command", "profile", "directory", "label", "txt", "log")
"""Calculator options that say how or where it runs, not what it computes: left out of the default physics."""

Names = Annotated[list[str], rejects("must be a list of option names, got {value}")]


def calculator_class(import_path: str) -> type[BaseCalculator]:
    """The ASE calculator class at ``package.module:ClassName``; ValueError with one line otherwise."""
    module_name, colon, class_name = import_path.partition(":")
    if not colon or not module_name or not class_name:
        raise ValueError(f"expected package.module:ClassName, got {import_path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module failed while importing
        raise ValueError(f"cannot import {module_name!r} ({type(error).__name__}: {error})") from None
    found = getattr(module, class_name, None)
    if found is None:
        raise ValueError(f"module {module_name!r} has no {class_name!r}")
    if not (isinstance(found, type) and issubclass(found, BaseCalculator)):
        raise ValueError(f"{import_path} is not an ASE calculator class")
    return found


def refused_options(cls: type, names: list[str]) -> list[str]:
    """The option names that `cls`'s constructor does not take: without ``**kwargs`` those that are
    not its parameters; with ``**kwargs`` (ASE's `set`) those that are neither a parameter of an
    `__init__` of its classes nor a key of its `default_parameters`, when it declares any."""
    parameters = list(inspect.signature(cls).parameters.values())
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        return [name for name in names if name not in named]
    declared = getattr(cls, "default_parameters", None) or {}
    if not declared:
        return []
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            named |= set(list(inspect.signature(vars(klass)["__init__"]).parameters)[1:])
    return [name for name in names if name not in named and name not in declared]


class AseParent(AseProcessParent):
    """Any ASE calculator, by import path: `class`, its `options`, and the `physics_options` among them."""

    name: ClassVar[str] = "ase"

    # `class` is a Python keyword: the field is declared through the class namespace
    __annotations__["class"] = Text | None
    vars()["class"] = Field(
        None,
        validate_default=True,
        description='The calculator class as "package.module:ClassName", e.g. "ase.calculators.lj:LennardJones" (required)',
    )
    options: Table = Field({}, description="Keyword arguments of the class's constructor (values as TOML gives them)")
    physics_options: Names | None = Field(
        None,
        description="The options that define the result (a job's identity in the database); default: all but "
        + ", ".join(EXECUTION_OPTIONS),
    )

    @property
    def import_path(self) -> str:
        """The calculator class as ``package.module:ClassName`` (the `class` option)."""
        return str(getattr(self, "class"))

    @field_validator("class")
    @classmethod
    def _importable(cls, import_path: str | None) -> str:
        if import_path is None:
            raise option_error('required: the calculator class as "package.module:ClassName"')
        try:
            calculator_class(import_path)
        except ValueError as error:
            raise option_error(str(error)) from None
        return import_path

    @field_validator("options")
    @classmethod
    def _taken_by_the_class(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "class" not in info.data:
            return options  # the class failed its own check
        calculator = calculator_class(info.data["class"])
        refused = refused_options(calculator, list(options))
        if refused:
            raise option_error(f"{calculator.__name__} takes no option {refused[0]!r}")
        return options

    @field_validator("physics_options")
    @classmethod
    def _among_the_options(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        options = info.data.get("options")
        missing = [name for name in names or () if options is not None and name not in options]
        if missing:
            raise option_error(f"{missing[0]!r} is not one of parent.ase.options ({', '.join(options or {}) or 'none'})")
        return names

    def physics(self) -> dict[str, Any]:
        """The class and the options that define the result, as plain JSON."""
        names = self.physics_options
        if names is None:
            names = [name for name in self.options if name not in EXECUTION_OPTIONS]
        return {"class": self.import_path, "options": {name: self.options[name] for name in sorted(names)}}

    def calculator_for(self, atoms: Atoms) -> BaseCalculator:
        """The calculator, built from its class and options in the job's directory."""
        return calculator_class(self.import_path)(**self.options)
