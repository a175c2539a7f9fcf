"""Sites: where Parsl runs the apps. A site is a small file, data like Parsl's own `configs/*.py`:
`class Options(SiteOptions)`, its typed options with their defaults, and `make_config(run_dir,
options)` returning a Parsl `Config`.

`load_site("local", ...)` reads the built-in `local.py`, package data in
`pipeline/execution/site_configs/` (`site_configs/` at the repository root is a link to it, for users
who give a site by path); a path to a `.py` file reads that file. The options (a campaign's
`[site.options]`) are checked against the file's `Options` (a site without one takes none): an
unknown option or a bad value is one `SiteError` line naming it. Loading Parsl for a `with` block is
`pipeline.execution.parsl_session`.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from parsl.config import Config

from pipeline.errors import BadInput
from pipeline.execution.options import BadOption, Options, checked_options

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE_DIR = Path(str(resources.files("pipeline.execution") / "site_configs"))
"""The built-in sites, installed with the package (a wheel carries them; the repository is not needed)."""
PARSL_DIR_NAME = "runinfo"
"""Parsl's run directory inside a campaign's (or a command's) work folder."""


class SiteOptions(Options):
    """A site's options, `[site.options]` of a campaign config: each site file subclasses it as `Options`."""


class SiteError(BadInput):
    """A site cannot be loaded: unknown name, missing file, bad option, or no valid `make_config`."""


def site_names() -> list[str]:
    """Names of the built-in sites (`SITE_DIR`)."""
    return sorted(path.stem for path in SITE_DIR.glob("*.py") if not path.stem.startswith("_"))


def site_file(name_or_path: str | os.PathLike) -> Path:
    """The file a `--site` value means: a shipped site by name, else a path to a `.py` file."""
    text = os.fspath(name_or_path)
    looks_like_path = os.sep in text or "/" in text or text.endswith(".py")
    if not looks_like_path:
        path = SITE_DIR / f"{text}.py"
        if not path.is_file():
            raise SiteError(f"--site: unknown site {text!r} (known: {', '.join(site_names())}; or give a path to a .py file)")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        raise SiteError(f"--site: site file {text} does not exist")
    if path.suffix != ".py":
        raise SiteError(f"--site: site file {text} is not a .py file")
    return path.resolve()


def load_site(name_or_path: str | os.PathLike, run_dir: Path, options: Mapping[str, Any] | None = None) -> Config:
    """The Parsl `Config` of a site; Parsl's run directory is `run_dir` (inside the campaign workdir)."""
    path = site_file(name_or_path)
    module_name = f"nft_site_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SiteError(f"--site: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise SiteError(f"{path}: cannot be imported: {type(error).__name__}: {error}") from None
    make_config = getattr(module, "make_config", None)
    if not callable(make_config):
        raise SiteError(f"{path}: defines no make_config(run_dir, options)")
    checked = _site_options(getattr(module, "Options", SiteOptions), options, path)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = make_config(run_dir, checked)
    except (ValueError, TypeError, KeyError) as error:
        raise SiteError(f"{path}: bad site options: {type(error).__name__}: {error}") from None
    if not isinstance(config, Config):
        raise SiteError(f"{path}: make_config returned {type(config).__name__}, not a parsl Config")
    return config


def _site_options(options_class: Any, options: Mapping[str, Any] | None, path: Path) -> SiteOptions:
    """`options` checked against the site file's `Options`; `SiteError` names the first bad one."""
    if not (isinstance(options_class, type) and issubclass(options_class, SiteOptions)):
        raise SiteError(f"{path}: Options is not a subclass of pipeline.execution.sites.SiteOptions")
    try:
        return checked_options(options_class, options)
    except BadOption as bad:
        if bad.known is not None:
            raise SiteError(f"site option {bad.name!r}: not known to {path.name} (known: {', '.join(bad.known) or 'none'})") from None
        where = f"site option {bad.name!r}" if bad.name else "site options"
        raise SiteError(f"{path}: {where}: {bad.problem}") from None


def worker_environment(worker_init: str | None = None, end_with_driver: bool = False) -> str:
    """Shell lines run before a worker starts: the project's environment, then the site's own.

    Sources `scripts/env.sh` when present, puts this interpreter's bin directory on PATH and the
    repository on PYTHONPATH, then adds `worker_init` (a site's option) or ``$NFT_WORKER_INIT``.
    `end_with_driver` (workers on this host only) adds `driver_watchdog`.
    """
    env_script = REPO_ROOT / "scripts" / "env.sh"
    lines = []
    if env_script.is_file():
        lines.append(f"source {shlex.quote(str(env_script))}")
    lines.append(f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH")
    lines.append(f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}")
    if end_with_driver:
        lines.append(driver_watchdog(os.getpid()))
    extra = option_from_environment(worker_init, "NFT_WORKER_INIT")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


WATCHDOG_PERIOD_S = 1
"""How often a local block checks that its driver is alive."""


def driver_watchdog(driver_pid: int) -> str:
    """A shell line that kills the worker block's whole process group (pool, workers, their jobs'
    children) within `WATCHDOG_PERIOD_S` of the driver's death, even by SIGKILL.

    Parsl starts local blocks in a process group of their own, so without this a killed driver
    leaves its workers computing (and writing files) until their heartbeat runs out.
    """
    group = "$(cut -d' ' -f5 /proc/$$/stat)"
    return (
        f"( while kill -0 {int(driver_pid)} 2>/dev/null; do sleep {WATCHDOG_PERIOD_S}; done; "
        f"kill -KILL -- -{group} ) </dev/null >/dev/null 2>&1 &"
    )


def option_from_environment(value: str | None, variable: str) -> str | None:
    """A site option's `value` when set, else the environment variable `variable` (None when neither)."""
    return value or os.environ.get(variable) or None


def check_site(name_or_path: str | os.PathLike, options: Mapping[str, Any] | None = None) -> None:
    """Load the site once in a scratch folder: a bad site or option is `SiteError` (`BadInput`)
    before anything is written."""
    with tempfile.TemporaryDirectory(prefix="nft-site-check-") as scratch:
        load_site(name_or_path, Path(scratch) / PARSL_DIR_NAME, options)
