"""MkDocs hook: the CLI reference and the config reference, generated from the code at build time.

`cli.md` walks the typer app (`pipeline.cli.app`): every command with its usage, help, arguments and
options (names, type, default, help). `config.md` walks the pydantic models of the campaign config
(`pipeline.campaign.config.ConfigFile` and the sections it embeds, the parents' option classes and
the built-in sites' `Options`): every key with its type, allowed range, default, unit and
description. A description is the field's `description`, else its attribute docstring, else the
comments beside it in the source. Neither page is a file in docs/: both exist only in the built site.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

CLI_PAGE = "cli.md"
CONFIG_PAGE = "config.md"


def on_files(files: Any, config: Any) -> Any:
    """Add the two generated pages to the site (MkDocs event)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, CLI_PAGE, content=cli_reference()))
    files.append(File.generated(config, CONFIG_PAGE, content=config_reference()))
    return files


# ---------------------------------------------------------------------------------------------
# Markdown helpers.


def _escape(text: str) -> str:
    """Text for a markdown table cell: code spans kept, markup characters outside them escaped."""
    parts = re.split(r"(`[^`]*`)", " ".join(str(text).split()))
    escaped = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            escaped.append(part.replace("|", "\\|"))
        else:
            part = part.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            escaped.append(re.sub(r"([|*_\[\]])", r"\\\1", part))
    return "".join(escaped)


def _code(text: str) -> str:
    """A table-safe code span."""
    text = str(text).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# The CLI reference.


def cli_commands() -> list[tuple[str, Any, Any]]:
    """(name, click command, click context) of every `nft` subcommand, in the app's order."""
    import typer

    from pipeline.cli import app

    root = typer.main.get_command(app)
    root_context = typer.Context(root, info_name="nft")
    commands = []
    for name in root.list_commands(root_context):
        command = root.get_command(root_context, name)
        if command is None or command.hidden:
            continue
        commands.append((name, command, typer.Context(command, info_name=name, parent=root_context)))
    return commands


def _is_option(parameter: Any) -> bool:
    return bool(getattr(parameter, "opts", None)) and parameter.opts[0].startswith("-")


def cli_option_names(parameter: Any) -> list[str]:
    """Every spelling of an option (`-o`, `--output`, `--no-bootstrap`)."""
    return [*parameter.opts, *getattr(parameter, "secondary_opts", [])]


def _type_of(parameter: Any, context: Any) -> str:
    if getattr(parameter, "is_flag", False):
        return "flag"
    try:
        shown = parameter.display_type(context)
    except (AttributeError, TypeError):
        shown = getattr(getattr(parameter, "type", None), "name", "")
    shown = str(shown or "").strip("<>")
    return {"str": "text", "list[str]": "text, repeatable", "list[Path]": "paths"}.get(shown, shown)


def _cli_default(parameter: Any) -> str:
    if parameter.required:
        return "required"
    default = parameter.default
    if getattr(parameter, "is_flag", False):
        if getattr(parameter, "secondary_opts", None):
            return _code(parameter.opts[0] if default else parameter.secondary_opts[0])
        return "off" if not default else "on"
    if default is None or default == () or default == []:
        return "—"
    return _code(default)


def _plain(text: str | None) -> str:
    """Help text as `nft --help` shows it: typer renders it as rich markup (`\\[` for a bracket)."""
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(text or "").plain
    except MarkupError:
        return text or ""


def _cli_help(parameter: Any) -> str:
    return _escape(_plain(getattr(parameter, "help", None)))


def cli_reference() -> str:
    """The `nft` command line as markdown, from the typer app."""
    import typer

    from pipeline.cli import app

    root = typer.main.get_command(app)
    root_context = typer.Context(root, info_name="nft")
    commands = cli_commands()
    lines = [
        "# Command-line reference",
        "",
        "Generated from the `nft` command itself when this site is built (`docs/hooks/generate_reference.py`",
        "walks the typer app), so it lists every command and option of the code it was built from.",
        "`nft COMMAND --help` prints the same in a terminal.",
        "",
        "Exit codes, for every command: 0 success, 1 a failed run, 2 bad input (one line on stderr",
        "naming the file, the field or the option; nothing written), 130 interrupted (run the same",
        "command again to resume).",
        "",
        "```",
        root.get_usage(root_context).strip().removeprefix("Usage: "),
        "```",
        "",
        _escape(root.help or ""),
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    for name, command, _ in commands:
        lines.append(f"| [`nft {name}`](#nft-{name}) | {_escape(_plain(command.get_short_help_str(limit=400)))} |")
    lines.append("")
    global_options = [p for p in root.get_params(root_context) if _is_option(p) and p.name != "help"]
    if global_options:
        lines += ["Options of `nft` itself:", ""]
        rows = [[_code(", ".join(cli_option_names(p))), _cli_help(p)] for p in global_options]
        lines += _table(["option", "description"], rows)
    for name, command, context in commands:
        lines += [f"## nft {name}", "", "```", command.get_usage(context).strip().removeprefix("Usage: "), "```", ""]
        help_text = _plain(inspect.cleandoc(command.help or ""))
        lines += [_escape(paragraph) + "\n" for paragraph in help_text.split("\n\n") if paragraph.strip()]
        parameters = [
            p for p in command.get_params(context) if p.name != "help" and not getattr(p, "hidden", False)
        ]  # hidden: former names
        arguments = [p for p in parameters if not _is_option(p)]
        options = [p for p in parameters if _is_option(p)]
        if arguments:
            rows = [[_code(p.metavar or p.name.upper()), _type_of(p, context), _cli_default(p), _cli_help(p)] for p in arguments]
            lines += ["**Arguments**", ""] + _table(["argument", "type", "default", "description"], rows)
        if options:
            rows = []
            for p in options:
                names = " / ".join(", ".join(group) for group in ([p.opts, p.secondary_opts] if p.secondary_opts else [p.opts]))
                value = "" if getattr(p, "is_flag", False) else f" {p.metavar}" if p.metavar else ""
                rows.append([_code(names + value), _type_of(p, context), _cli_default(p), _cli_help(p)])
            lines += ["**Options**", ""] + _table(["option", "type", "default", "description"], rows)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The config reference.


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    origin = get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return get_args(annotation)
    return None


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """The bare type of an annotation and the constraints found in its `Annotated` layers."""
    metadata: list[Any] = []
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata += item.metadata if isinstance(item, FieldInfo) else [item]
    return annotation, metadata


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`Model`, `Model | None`, `Annotated[Model, …]`), else None."""
    annotation, _ = _unwrap(annotation)
    options = _union_args(annotation)
    if options is not None:
        models = [model_of(option) for option in options if option is not type(None)]
        return models[0] if len(models) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


_SCALARS = {str: "string", int: "integer", float: "float", bool: "boolean"}


def type_name(annotation: Any) -> str:
    """A TOML-minded name of a field's type: `float`, `list of integer`, `"a" or "b"`, `table`."""
    annotation, _ = _unwrap(annotation)
    options = _union_args(annotation)
    if options is not None:
        names = [type_name(option) for option in options if option is not type(None)]
        return " or ".join(dict.fromkeys(names))
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(json.dumps(value) for value in get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        items = [item for item in get_args(annotation) if item is not Ellipsis]
        return f"list of {type_name(items[0])}" if items else "list"
    if origin is dict or annotation is dict:
        return "table"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    if annotation is Any:
        return "any"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> str:
    """The allowed range from the field's constraints: `> 0`, `≥ 1`, `≤ 1`, `3 items`."""
    found = list(field.metadata)
    annotation = field.annotation
    options = _union_args(annotation)
    for part in options or (annotation,):
        found += _unwrap(part)[1]
        inner = _unwrap(part)[0]
        if get_origin(inner) in (list, tuple):
            for item in get_args(inner):
                found += [f"each {bound}" for bound in _bound_texts(_unwrap(item)[1])]
    return ", ".join(dict.fromkeys(_bound_texts(found) + [item for item in found if isinstance(item, str)]))


def _bound_texts(metadata: list[Any]) -> list[str]:
    texts = []
    for item in metadata:
        for attribute, symbol in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(item, attribute, None)
            if value is not None and type(item).__name__.lower() == attribute:
                texts.append(f"{symbol} {value:g}" if isinstance(value, (int, float)) else f"{symbol} {value}")
        if type(item).__name__ == "MinLen" and item.min_length > 0:
            texts.append("not empty" if item.min_length == 1 else f"at least {item.min_length} long")
        if type(item).__name__ == "MaxLen":
            texts.append(f"at most {item.max_length} long")
    for length in range(2, 10):
        if f"at least {length} long" in texts and f"at most {length} long" in texts:
            texts = [text for text in texts if not text.endswith(f" {length} long")] + [f"exactly {length} long"]
    return texts


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The values a section takes when none of its keys is given, as validated: the defaults that
    validators fill in (e.g. `model.epochs`: 0 before Levenberg–Marquardt) included; {} when the
    section has required keys."""
    try:
        instance = model()
    except Exception:
        return {}
    return {name: getattr(instance, name) for name in model.model_fields}


def default_text(field: FieldInfo, effective: dict[str, Any] | None = None, name: str = "") -> str:
    """The default as TOML would write it; `required`, or `unset` for None (the description says what unset means)."""
    if effective and name in effective:
        default = effective[name]
    elif field.default_factory is not None:
        default = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        default = field.default
    if default is None:
        return "unset"
    if isinstance(default, BaseModel):
        return "its keys' defaults"
    return _code(_toml(default))


def _source_notes(cls: type) -> dict[str, str]:
    """For each field a class declares: its attribute docstring, else its comments (inline, or the
    comment lines right above it when there is none inline)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    try:
        classdef = ast.parse(source).body[0]
    except SyntaxError:
        return {}
    comments: dict[int, tuple[str, bool]] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.string.lstrip("#").strip(), token.line.strip().startswith("#"))
    notes = {}
    body = getattr(classdef, "body", [])
    for index, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        following = body[index + 1] if index + 1 < len(body) else None
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            notes[node.target.id] = inspect.cleandoc(following.value.value)
            continue
        end = node.end_lineno or node.lineno
        inline = [comments[line][0] for line in range(node.lineno, end + 1) if line in comments and not comments[line][1]]
        inline += [comments[line][0] for line in range(node.lineno + 1, end + 1) if line in comments and comments[line][1]]
        above: list[str] = []
        line = node.lineno - 1
        while not inline and line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        if above and not source.splitlines()[line - 1].strip():
            above = []  # a block after a blank line heads a group of fields ("# physics"), not this one
        text = " ".join(above + inline)
        if text:
            notes[node.target.id] = text
    return notes


def field_notes(model: type[BaseModel]) -> dict[str, str]:
    """Every field's description: `Field(description=…)`, else the source's docstring or comments
    (the nearest class in the model's bases that declares the field)."""
    notes: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            notes.update(_source_notes(cls))
    for name, field in model.model_fields.items():
        if field.description:
            notes[name] = field.description
    return {name: " ".join(text.split()) for name, text in notes.items()}


_UNIT = re.compile(r"^(\(eV/Å\)²|Å⁻²|eV/Å|eV/atom|eV²|eV|Å|μB|s)((?: per [^,;()]+)?)(?=$|[\s,;:()])")
_TRAILING_UNIT = re.compile(r"(?:,|\bin)\s+(\(eV/Å\)²|Å⁻²|eV/Å|eV/atom|eV|Å|μB)(?=$|[\s:;.,()])")


def unit_of(name: str, note: str) -> str:
    """The unit a description states first (``Å``, ``eV/Å; …``) or after a comma or "in" (``Chunk
    radius, Å: …``, ``radius in Å``), or a name ending in `_s` (seconds); empty when none is stated."""
    match = _UNIT.match(note)
    if match:
        return (match.group(1) + match.group(2)).strip()
    match = _TRAILING_UNIT.search(note)
    if match:
        return match.group(1)
    return "s" if name.endswith("_s") else ""


TABLES_BELOW = {
    "parent.emt": "the options of the `emt` parent: `[parent.emt]` below",
    "parent.gpaw": "the options of the `gpaw` parent: `[parent.gpaw]` below",
    "site.options": "the site's options: `[site.options]` of each built-in site below",
}


def config_rows(prefix: str, model: type[BaseModel]) -> tuple[list[list[str]], list[tuple[str, type[BaseModel]]]]:
    """The table rows of one section's own keys, and its sub-sections (keys that are tables of keys)."""
    notes = field_notes(model)
    effective = _defaults(model)
    rows, subsections = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        nested = model_of(field.annotation)
        if nested is not None and nested.model_fields:
            subsections.append((key, nested))
            continue
        note = notes.get(name, "") or TABLES_BELOW.get(key, "")
        if not note and key.startswith("parent.") and type_name(field.annotation) == "table":
            note = f"the options of the `{name}` parent"
        unit = unit_of(name, note)
        rows.append(
            [
                _code(key),
                _escape(type_name(field.annotation)),
                _escape(_bounds(field)),
                default_text(field, effective, name),
                _escape(unit),
                _escape("" if note == unit else note),
            ]
        )
    return rows, subsections


CONFIG_HEADER = ["key", "type", "allowed", "default", "unit", "description"]


def _section(prefix: str, model: type[BaseModel], intro: str = "") -> Iterator[str]:
    rows, subsections = config_rows(prefix, model)
    yield f"## `[{prefix}]`"
    yield ""
    doc = intro or (inspect.cleandoc(model.__doc__) if model.__doc__ and model.__module__.startswith("pipeline") else "")
    if doc and not doc.startswith(("Usage docs", "A base class")):
        yield _escape(doc)
        yield ""
    if rows:
        yield from _table(CONFIG_HEADER, rows)
    for sub_prefix, sub_model in subsections:
        yield from _section(sub_prefix, sub_model)


def built_in_sites() -> dict[str, tuple[type[BaseModel], str]]:
    """The `Options` class and the docstring of every site shipped with the package, by name."""
    from pipeline.execution.sites import SITE_DIR, SiteOptions, site_names

    sites = {}
    for name in site_names():
        spec = importlib.util.spec_from_file_location(f"nft_docs_site_{name}", SITE_DIR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # so that `inspect` finds the site's source (its comments)
        spec.loader.exec_module(module)
        sites[name] = (getattr(module, "Options", SiteOptions), inspect.cleandoc(module.__doc__ or ""))
    return sites


def config_sections() -> list[tuple[str, type[BaseModel], str]]:
    """(prefix, model, intro) of every table of the config file, in the file's order; the
    `[parent.NAME]` and `[site.options]` tables come from the parents and the built-in sites."""
    from pipeline.campaign.config import ConfigFile
    from pipeline.execution.parents import PARENTS

    sections: list[tuple[str, type[BaseModel], str]] = []
    for name, field in ConfigFile.model_fields.items():
        model = model_of(field.annotation)
        assert model is not None, name
        sections.append((name, model, ""))
        if name == "parent":
            for parent_name, parent in PARENTS.items():
                physics = ", ".join(f"`{key}`" for key in parent.physics_fields) or "none"
                intro = (
                    f"{inspect.cleandoc(parent.__doc__ or '')} Options of `calculator = \"{parent_name}\"`. "
                    f"The ones that define the physics, and so the identity of a stored result: {physics}."
                )
                sections.append((f"parent.{parent_name}", parent, intro))
        if name == "site":
            for site_name, (options, doc) in built_in_sites().items():
                first = doc.split("\n\n")[0] if doc else ""
                intro = f"Options of the built-in site `{site_name}` (`[site] name = \"{site_name}\"` or `--site {site_name}`). {first}"
                sections.append((f"site.options ({site_name})", options, intro))
    return sections


def config_reference() -> str:
    """The campaign config file as markdown, from the pydantic models."""
    lines = [
        "# Config reference",
        "",
        "Generated from the code when this site is built (`docs/hooks/generate_reference.py` walks the",
        "pydantic models of `pipeline/campaign/config.py`, `pipeline/science/settings.py`,",
        "`pipeline/science/initial_sets.py`, the parents in `pipeline/execution/parents/` and the",
        "built-in sites), so every key the code accepts is here with its type, allowed range and",
        "default. Units are those the code states for the key (Å, eV/Å, eV, s); a key without a unit is",
        "a count, a name or a switch.",
        "",
        "A campaign config is one TOML file; paths in it are relative to the file. Unknown keys, wrong",
        "types and values out of range are refused before anything runs, in one line naming the dotted",
        "key (`config.toml: chunks.radius: …`). `unset` means the key has no value unless given: its",
        "description says what the code does then. The [campaign guide](campaign.md#the-config-file)",
        "shows the same keys as an annotated file; `nft check CONFIG.toml` prints a config's resolved",
        "values.",
        "",
    ]
    for prefix, model, intro in config_sections():
        if " (" in prefix:  # a built-in site's options
            key_prefix, _, site = prefix.partition(" (")
            rows, _ = config_rows(key_prefix, model)
            lines += [f"## `[site.options]` of `{site.rstrip(')')}`", "", _escape(intro), ""]
            lines += _table(CONFIG_HEADER, rows) if rows else ["This site takes no options.", ""]
            continue
        lines += list(_section(prefix, model, intro))
    return "\n".join(lines)
