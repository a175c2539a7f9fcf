"""Small real campaigns for tests: a rattled Pt cluster target, a few bulk Pt cells, a config writer,
and an observation hook that logs every EMT calculation (to count parent calls across processes)."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase import Atoms
from ase.cluster import Octahedron
from ase.io import write

from pipeline.science.examples import bulk_training_cells, emt_label

REPO_ROOT = Path(__file__).resolve().parents[2]
NFT = [str(Path(sys.executable).parent / "nft")]

# Fast settings: a small ensemble trained briefly (Adam, then L-BFGS); the threshold is what such a
# model reaches on a mildly rattled Pt55 in about four iterations (δ 4.8 → 1.9 → 1.7 → 0.9 eV/Å).
SMALL_CAMPAIGN: dict[str, dict[str, Any]] = {
    "campaign": {"name": "pt55-test", "workdir": "run", "database": "sqlite:///nft.db"},
    "data": {"targets": ["target.traj"], "initial": "initial.traj"},
    "parent": {"calculator": "emt"},
    "chunks": {"radius": 6.0, "vacuum": 4.0, "max_per_iteration": 8, "min_separation": 2.0},
    "model": {"cutoff": 5.0, "hidden": [5, 5], "ensemble": 4, "epochs": 100, "optimizer": "lbfgs", "lbfgs_steps": 300, "seed": 1},
    "active": {"threshold": 1.2, "max_iterations": 8},
    "site": {"options": {"workers": 2, "worker_init": "export OMP_NUM_THREADS=1"}},
}


def rattled_cluster(shells: tuple[int, int] = (5, 2), rattle_angstrom: float = 0.05, seed: int = 7) -> Atoms:
    """A rattled Pt cuboctahedron (Octahedron(5, 2) is Pt55), non-periodic, no cell."""
    cluster = Octahedron("Pt", *shells, latticeconstant=3.92)
    atoms = Atoms(numbers=cluster.numbers, positions=cluster.positions, pbc=False)
    atoms.positions += np.random.default_rng(seed).normal(0.0, rattle_angstrom, size=atoms.positions.shape)
    return atoms


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """A TOML document of tables (nested tables for dict values, e.g. [site.options])."""
    lines: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {key: value for key, value in body.items() if isinstance(value, dict)}
        for key, value in body.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
        for key, value in nested.items():
            table(f"{name}.{key}", value)

    for name, body in sections.items():
        table(name, body)
    return "\n".join(lines)


def merged(base: dict[str, dict[str, Any]], changes: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """`base` with `changes` applied per section; a value None removes the key."""
    result = copy.deepcopy(base)
    for name, body in (changes or {}).items():
        section = result.setdefault(name, {})
        for key, value in body.items():
            if value is None:
                section.pop(key, None)
            else:
                section[key] = value
    return result


def write_campaign(
    directory: Path,
    changes: dict[str, dict[str, Any]] | None = None,
    *,
    labelled_initial: bool = True,
    target: Atoms | None = None,
    n_initial: int = 6,
) -> Path:
    """Write target.traj, initial.traj (EMT-labelled or bare) and config.toml into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    write(directory / "target.traj", target if target is not None else rattled_cluster())
    cells = bulk_training_cells(count=n_initial, seed=3)
    write(directory / "initial.traj", [emt_label(cell) for cell in cells] if labelled_initial else cells)
    config = directory / "config.toml"
    config.write_text(toml_text(merged(SMALL_CAMPAIGN, changes)))
    return config


@pytest.fixture
def small_campaign(tmp_path):
    """A factory: `small_campaign(changes=None, **options)` writes a small campaign, returns its config."""

    def make(changes: dict[str, dict[str, Any]] | None = None, **options: Any) -> Path:
        return write_campaign(tmp_path / "campaign", changes, **options)

    return make


# ---------------------------------------------------------------------------------------------
# Observation hook (test-only, named as such): a sitecustomize that logs every EMT calculation.

PARENT_CALL_LOG_VARIABLE = "NFT_TEST_EMT_CALL_LOG"
EMT_DELAY_VARIABLE = "NFT_TEST_EMT_DELAY_S"
EMT_BULK_DELAY_VARIABLE = "NFT_TEST_EMT_BULK_DELAY_S"

_COUNTING_SITECUSTOMIZE = f'''
"""Test-only hooks: log one line per EMT calculation when ${PARENT_CALL_LOG_VARIABLE} is set; fault
injection: make every EMT calculation of a non-periodic structure (a chunk) take ${EMT_DELAY_VARIABLE} s longer,
and of a periodic one (a bulk cell) ${EMT_BULK_DELAY_VARIABLE} s."""
import os

if os.environ.get("{PARENT_CALL_LOG_VARIABLE}"):
    import hashlib
    import time

    import numpy as np
    from ase.calculators import emt

    _original_calculate = emt.EMT.calculate

    def _logged_calculate(self, atoms=None, *args, **kwargs):
        if atoms is not None:
            delay = "{EMT_BULK_DELAY_VARIABLE}" if atoms.pbc.any() else "{EMT_DELAY_VARIABLE}"
            time.sleep(float(os.environ.get(delay) or 0))
        result = _original_calculate(self, atoms, *args, **kwargs)
        digest = hashlib.sha256(np.ascontiguousarray(self.atoms.positions, dtype=float).tobytes()).hexdigest()
        with open(os.environ["{PARENT_CALL_LOG_VARIABLE}"], "a") as log:
            log.write(f"{{os.getpid()}} {{len(self.atoms)}} {{digest}}\\n")
        return result

    emt.EMT.calculate = _logged_calculate
'''


def positions_digest(atoms: Atoms) -> str:
    """The digest the observation hook logs for a structure."""
    return hashlib.sha256(np.ascontiguousarray(atoms.positions, dtype=float).tobytes()).hexdigest()


@pytest.fixture
def emt_call_log(tmp_path):
    """(environment for a subprocess, log path): every EMT calculation in it, workers included, is logged."""
    hook_dir = tmp_path / "emt-call-hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_COUNTING_SITECUSTOMIZE)
    log = tmp_path / "emt-calls.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), str(REPO_ROOT), env.get("PYTHONPATH")]))
    env[PARENT_CALL_LOG_VARIABLE] = str(log)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env, log


def logged_emt_calls(log: Path) -> list[tuple[int, int, str]]:
    """(pid, atoms, positions digest) per logged EMT calculation."""
    if not log.exists():
        return []
    calls = []
    for line in log.read_text().splitlines():
        pid, n_atoms, digest = line.split()
        calls.append((int(pid), int(n_atoms), digest))
    return calls


def run_nft(*args: Any, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`nft ARGS…` in a subprocess (real exit codes and stderr), in a process group of its own so
    that a timeout also kills what it started (Parsl's interchange and workers)."""
    environment = dict(env or os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    command = NFT + [str(arg) for arg in args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def processes_using(directory: Path) -> set[int]:
    """Pids of the processes with a file under `directory` open: Parsl's interchange (its log), whose
    command line names no path, as well as worker pools and workers writing their logs there."""
    prefix = str(Path(directory).resolve()) + os.sep
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            descriptors = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(prefix) for fd in descriptors):
                found.add(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def orphaned_chunks(database_url: str, campaign: str) -> tuple[int, int]:
    """(chunks without a reference job, chunks of no recorded iteration) of a campaign: both 0 in a
    consistent database (every iteration records the chunks it carved, and each has its job)."""
    from pipeline.storage.store import CampaignStore

    with CampaignStore.open(database_url, campaign, create=False) as store:
        chunks = store.structures("chunk")
        with_job = {job.structure_id for job in store.jobs(kind="chunk")}
        counted = sum(record.chunks_added for record in store.iterations())
    return sum(chunk.id not in with_job for chunk in chunks), len(chunks) - counted


def default_stop_signals() -> None:
    """`preexec_fn` for an `nft` the test signals: SIGINT, SIGTERM and SIGHUP at their defaults. A
    background job of a non-interactive shell (a CI runner's) inherits SIGINT ignored, and nft keeps a
    signal its caller ignores, as `nohup` relies on; the tests send the signals a terminal would."""
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, signal.SIG_DFL)
