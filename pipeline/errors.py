"""Exceptions that the CLI turns into exit codes: bad input exits 2, a failed run exits 1."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from pydantic import ValidationError


class BadInput(Exception):
    """User input (a file, a field, an argument) is wrong; the message is one line naming it."""


class RunFailed(Exception):
    """A run could not complete for reasons other than bad input."""


def error_text(error: BaseException) -> str:
    """ "Type: message" of an exception (its type alone when it has no message), as a job's failure
    reason is stored and shown."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def first_problem(error: "ValidationError", field_names: Mapping[str, str] | None = None) -> str:
    """One line for the first pydantic error: the dotted field and what is wrong with it.

    `field_names` renames fields for the reader (e.g. a settings field to its CLI option)."""
    problem = error.errors()[0]
    field = _renamed(".".join(str(part) for part in problem["loc"] if not str(part).startswith("function-")), field_names or {})
    kind, context = problem["type"], problem.get("ctx") or {}
    value = problem.get("input")
    if kind == "extra_forbidden":
        return f"{field}: unknown key"
    if kind == "missing":
        return f"{field}: required"
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(context.values()))
        return f"{field}: must be {bounds[kind]} {limit:g} (got {value!r})"
    if kind in ("too_short", "string_too_short"):
        return f"{field}: must not be empty"
    types = {
        "float_type": "a number",
        "int_type": "an integer",
        "bool_type": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "tuple_type": "a list",
        "dict_type": "a table",
        "model_type": "a table",
    }
    if kind == "finite_number":
        return f"{field}: must be a finite number (got {value!r})"
    if kind in types:
        return f"{field}: must be {types[kind]} (got {value!r})"
    if kind == "literal_error":
        return f"{field}: must be one of {context.get('expected')} (got {value!r})"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{field}: {message[:1].lower()}{message[1:]}"


def _renamed(field: str, field_names: Mapping[str, str]) -> str:
    """`field` by its name for the reader: the name of the field itself or, for an item of a list
    (``space_groups.1``), of the list it is in."""
    parts = field.split(".")
    for end in range(len(parts), 0, -1):
        name = field_names.get(".".join(parts[:end]))
        if name is not None:
            return name
    return field
