"""The docs site builds with warnings as errors, and its references come from the code: every command
and option of the `nft` app is on the CLI page, every key of the campaign config on the config page.
The expected names are read from the app and the models here, so an option or a key added to the code
and missing from the built site fails this test. Also: the README is short and its links resolve."""

from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built as CI builds it: `mkdocs build --strict` into a temporary folder."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    return out


def page_text(path: Path) -> str:
    """The visible text of a built page's content, whitespace collapsed."""
    page = path.read_text(encoding="utf-8")
    page = page[page.index('<div role="main"') :] if '<div role="main"' in page else page
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    return " ".join(text.split())


def sections(path: Path, level: str = "h2") -> dict[str, str]:
    """The visible text under each heading of a built page, by the heading's id."""
    page = path.read_text(encoding="utf-8")
    marks = list(re.finditer(rf'<{level} id="([^"]+)"', page))
    found = {}
    for mark, following in zip(marks, [*marks[1:], None]):
        chunk = page[mark.start() : following.start() if following else len(page)]
        found[mark.group(1)] = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", chunk)).split())
    return found


def _words(text: str | None) -> str:
    """Help text as `nft --help` shows it (typer's rich markup rendered), whitespace collapsed."""
    from rich.text import Text

    return " ".join(Text.from_markup(text or "").plain.replace("`", "").split())


def test_no_generated_reference_is_committed_in_docs() -> None:
    # the hook writes them at build time; a file in docs/ would go stale
    assert not (ROOT / "docs" / "cli.md").exists()
    assert not (ROOT / "docs" / "config.md").exists()


def test_the_cli_reference_lists_every_command_option_and_argument_of_the_app(site: Path) -> None:
    import typer

    from pipeline.cli import app

    root = typer.main.get_command(app)
    context = typer.Context(root, info_name="nft")
    built = sections(site / "cli.html")
    whole = page_text(site / "cli.html")
    commands = root.list_commands(context)
    assert {"run", "status", "train", "evaluate", "relax"} <= set(commands)
    for option in root.get_params(context):
        if option.name != "help":
            assert all(name in whole for name in option.opts), f"nft {option.opts} missing from the CLI reference"
    for name in commands:
        command = root.get_command(context, name)
        assert command is not None
        assert f"nft-{name}" in built, f"nft {name} has no section in the CLI reference"
        text = built[f"nft-{name}"]
        assert " ".join(_words(command.help).split()[:6]) in text, f"nft {name}: its help is missing"
        for parameter in command.get_params(typer.Context(command, info_name=name, parent=context)):
            if parameter.name == "help" or getattr(parameter, "hidden", False):  # a former name, kept working but not documented
                continue
            spellings = [*parameter.opts, *getattr(parameter, "secondary_opts", [])]
            if spellings[0].startswith("-"):
                for spelling in spellings:
                    assert re.search(rf"(?<![\w-]){re.escape(spelling)}(?![\w-])", text), f"nft {name} {spelling} missing"
            else:
                assert (parameter.metavar or parameter.name.upper()) in text, f"nft {name}: argument {parameter.name} missing"
            help_start = " ".join(_words(parameter.help).split()[:6])
            assert help_start in text, f"nft {name} {spellings[0]}: its help is missing ({help_start!r})"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (`Model`, `Model | None`, `Annotated[Model, …]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [model for option in get_args(annotation) for model in _models_in(option)]
    return []


def config_keys(prefix: str, model: type[BaseModel]) -> list[str]:
    """Every dotted key a config section accepts, nested tables of keys included."""
    keys = []
    for name, field in model.model_fields.items():
        nested = [inner for inner in _models_in(field.annotation) if inner.model_fields]
        keys += config_keys(f"{prefix}.{name}", nested[0]) if nested else [f"{prefix}.{name}"]
    return keys


def site_option_classes() -> dict[str, type[BaseModel]]:
    from pipeline.execution.sites import SITE_DIR, SiteOptions, site_names

    classes = {}
    for name in site_names():
        spec = importlib.util.spec_from_file_location(f"nft_test_site_{name}", SITE_DIR / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes[name] = getattr(module, "Options", SiteOptions)
    return classes


def test_the_config_reference_lists_every_key_of_the_config_models(site: Path) -> None:
    from pipeline.campaign.config import ConfigFile
    from pipeline.execution.parents import PARENTS

    expected = config_keys("", ConfigFile)
    expected = [key.lstrip(".") for key in expected]
    for name, parent in PARENTS.items():
        expected += config_keys(f"parent.{name}", parent)
    sites = site_option_classes()
    assert {"local", "slurm"} <= set(sites)
    for options in sites.values():
        expected += config_keys("site.options", options)
    text = page_text(site / "config.html")
    missing = [key for key in expected if not re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text)]
    assert not missing, f"config keys missing from the config reference: {missing}"
    # every section of the file has its heading, the parents' and sites' tables too
    for table in (
        "campaign",
        "data",
        "data.initial_generate",
        "parent",
        "parent.gpaw",
        "chunks",
        "model",
        "model.descriptor",
        "active",
        "site",
    ):
        assert f"[{table}]" in text


def test_the_config_reference_gives_each_key_its_default_and_unit(site: Path) -> None:
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", (site / "config.html").read_text(encoding="utf-8"), flags=re.S):
        cells = [" ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split()) for cell in re.findall(r"<td>(.*?)</td>", row, flags=re.S)]
        if cells:
            rows.setdefault(cells[0], cells)
    # key, type, allowed, default, unit, description
    assert rows["chunks.radius"][1:5] == ["float", "> 0", "8", "Å"]
    assert rows["active.threshold"][3:5] == ["unset", "eV/Å"]
    assert rows["model.lm_steps"][3] == "30"
    assert rows["model.epochs"][3] == "0"  # the default validators fill in: none before Levenberg–Marquardt
    assert rows["model.hidden"][3] == "[5, 5]"
    assert rows["parent.gpaw.ecut"][3:5] == ["450", "eV"]
    assert rows["parent.gpaw.walltime_s"][4] == "s"
    assert rows["campaign.name"][3] == "required"


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
