"""Sites: where Parsl runs the apps. A site is a small file defining `make_config(run_dir, options)`.

`load_site("local", ...)` reads `site_configs/local.py`; a path to a `.py` file reads that file.
A site file may declare `OPTIONS = {name: default}`; other option names are then an error.
`parsl_session(config)` loads Parsl for the duration of a `with` block and always cleans up.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import parsl
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel

from pipeline.errors import BadInput

REPO_ROOT = Path(__file__).resolve().parents[2]
SITE_DIR = REPO_ROOT / "site_configs"
PARSL_DIR_NAME = "runinfo"
"""Parsl's run directory inside a campaign's (or a command's) work folder."""


class SiteError(BadInput):
    """A site cannot be loaded: unknown name, missing file, bad option, or no valid `make_config`."""


def site_names() -> list[str]:
    """Names of the sites shipped in `site_configs/`."""
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
    options = dict(options or {})
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
    known = getattr(module, "OPTIONS", None)
    if known is not None:
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SiteError(f"site option {unknown[0]!r}: not known to {path.name} (known: {', '.join(sorted(known)) or 'none'})")
        options = {**known, **options}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        config = make_config(run_dir, options)
    except (ValueError, TypeError, KeyError) as error:
        raise SiteError(f"{path}: bad site options: {type(error).__name__}: {error}") from None
    if not isinstance(config, Config):
        raise SiteError(f"{path}: make_config returned {type(config).__name__}, not a parsl Config")
    return config


def worker_environment(options: Mapping[str, Any] | None = None, end_with_driver: bool = False) -> str:
    """Shell lines run before a worker starts: the project's environment, then the site's own.

    Sources `scripts/env.sh` when present, puts this interpreter's bin directory on PATH and the
    repository on PYTHONPATH, then adds `options["worker_init"]` or ``$NFT_WORKER_INIT``.
    `end_with_driver` (workers on this host only) adds `driver_watchdog`.
    """
    options = options or {}
    env_script = REPO_ROOT / "scripts" / "env.sh"
    lines = []
    if env_script.is_file():
        lines.append(f"source {shlex.quote(str(env_script))}")
    lines.append(f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH")
    lines.append(f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}")
    if end_with_driver:
        lines.append(driver_watchdog(os.getpid()))
    extra = options.get("worker_init") or os.environ.get("NFT_WORKER_INIT", "")
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
    return (f"( while kill -0 {int(driver_pid)} 2>/dev/null; do sleep {WATCHDOG_PERIOD_S}; done; "
            f"kill -KILL -- -{group} ) </dev/null >/dev/null 2>&1 &")


def option_from_environment(options: Mapping[str, Any], name: str, variable: str) -> Any:
    """`options[name]` when set, else the environment variable `variable` (None when neither)."""
    value = options.get(name)
    return value if value not in (None, "") else os.environ.get(variable) or None


def check_site(name_or_path: str | os.PathLike, options: Mapping[str, Any] | None = None) -> None:
    """Load the site once in a scratch folder: a bad site or option is `SiteError` (`BadInput`)
    before anything is written."""
    with tempfile.TemporaryDirectory(prefix="nft-site-check-") as scratch:
        load_site(name_or_path, Path(scratch) / PARSL_DIR_NAME, options)


@contextmanager
def parsl_session(config: Config) -> Iterator[DataFlowKernel]:
    """Load Parsl with `config` for a `with` block; on exit clean up its executors and clear it.

    This interpreter's bin directory goes on PATH first: Parsl starts its interchange and workers
    by command name, which fails when nft is run by absolute path without its venv on PATH.
    """
    interpreter_bin = str(Path(sys.executable).parent)
    if interpreter_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, [interpreter_bin, os.environ.get("PATH")]))
    dfk = parsl.load(config)
    try:
        yield dfk
    finally:
        try:
            dfk.cleanup()
        finally:
            parsl.clear()
