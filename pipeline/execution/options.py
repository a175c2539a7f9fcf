"""Typed options: the one option system of parents (`[parent.NAME]`) and sites (`[site.options]`).

An option table is a frozen, strict pydantic model (`Options`) whose fields are the options, with
their defaults; `checked_options` validates a table and reports the first problem as `BadOption`
(the option's name and one line, "must be …, got VALUE"), which each caller turns into its own
`BadInput` line (``parent.gpaw.ecut: …``, ``site option 'workers': …``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, GetCoreSchemaHandler, ValidationError, WrapValidator
from pydantic_core import CoreSchema, PydanticCustomError

_OPTION_ERROR = "nft_option"


class Options(BaseModel):
    """An option table: the fields are the options, defaults filled in; unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


OptionsT = TypeVar("OptionsT", bound=BaseModel)


class BadOption(ValueError):
    """The first problem of an option table: `name` (None for a check of the whole table), one line
    `problem`, and for an unknown option the `known` option names."""

    def __init__(self, name: str | None, problem: str, known: tuple[str, ...] | None = None):
        super().__init__(f"{name}: {problem}" if name else problem)
        self.name = name
        self.problem = problem
        self.known = known


def checked_options(cls: type[OptionsT], options: Mapping[str, Any] | None) -> OptionsT:
    """`options` validated as `cls`; `BadOption` names the first bad one (an unknown option before a bad value)."""
    try:
        return cls.model_validate(dict(options or {}))
    except ValidationError as error:
        problems = error.errors()
        unknown = sorted(str(problem["loc"][0]) for problem in problems if problem["type"] == "extra_forbidden")
        if unknown:
            raise BadOption(unknown[0], "unknown option", tuple(sorted(cls.model_fields))) from None
        location = problems[0]["loc"]
        raise BadOption(str(location[0]) if location else None, problems[0]["msg"]) from None


# ---------------------------------------------------------------------------------------------
# Option types: each reports a bad value in one line, "must be …, got VALUE".


def rejects(template: str) -> WrapValidator:
    """Report any bad value of the annotated type as `template` with ``{value}`` its repr (a message
    from an inner option type, e.g. a list item, is kept)."""

    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as error:
            inner = error.errors()[0]
            message = inner["msg"] if inner["type"] == _OPTION_ERROR else template.replace("{value}", repr(value))
            raise PydanticCustomError(_OPTION_ERROR, message) from None

    return WrapValidator(check)


def option_error(message: str) -> PydanticCustomError:
    """A bad option value reported as `message` (for checks beyond a type, e.g. unknown keys)."""
    return PydanticCustomError(_OPTION_ERROR, message)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class OneOf:
    """``Annotated[Literal["a", "b"], OneOf()]``: a string among the literal's, case-insensitive,
    stored lower-case (a type that type checkers read as the literal)."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        choices = ", ".join(get_args(source))
        return handler.generate_schema(Annotated[source, BeforeValidator(_lower), rejects(f"must be one of {choices}; got {{value}}")])


PositiveFloat = Annotated[float, Field(gt=0), rejects("must be a positive number, got {value}")]
NonNegativeFloat = Annotated[float, Field(ge=0), rejects("must be a number >= 0, got {value}")]
Number = Annotated[float, rejects("must be a number, got {value}")]
PositiveInt = Annotated[int, Field(ge=1), rejects("must be an integer >= 1, got {value}")]
NonNegativeInt = Annotated[int, Field(ge=0), rejects("must be an integer >= 0, got {value}")]
Text = Annotated[str, Field(min_length=1), rejects("must be a non-empty string, got {value}")]
String = Annotated[str, rejects("must be a string, got {value}")]
Flag = Annotated[bool, rejects("must be true or false, got {value}")]
Table = Annotated[dict[str, Any], rejects("must be a table, got {value}")]
Grid = Annotated[
    list[PositiveInt],
    BeforeValidator(_list),
    Field(min_length=3, max_length=3),
    rejects("must be three positive integers [k1, k2, k3], got {value}"),
]
