"""Parent calculators: the reference method whose energies (eV) and forces (eV/Å) the model learns.

A registry by name. `emt` runs in-process (ASE EMT). `gpaw` runs one MPI job per structure,
`LAUNCHER gpaw python -m pipeline.execution.gpaw_runner IN.json OUT.json`, in a job directory that keeps
GPAW's text output. `compute_reference` is what a Parsl app calls; `validate_parent_params` is what
the config loader calls.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from pipeline.errors import BadInput
from pipeline.science.structures import payload_to_atoms

REPO_ROOT = Path(__file__).resolve().parents[2]
GPAW_LOG_NAME = "gpaw.txt"
LOG_TAIL_LINES = 25


class ReferenceFailed(RuntimeError):
    """A reference calculation gave no energy and forces; the message is the reason."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else ""


class ParentConfigError(BadInput):
    """A `[parent]` setting is wrong; `field` names it, e.g. ``parent.gpaw.ecut``."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.field, self.problem))


# ---------------------------------------------------------------------------------------------
# Options: name -> (default, check). A check returns the normalised value or raises ValueError.

def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"must be a positive number, got {value!r}")
    return float(value)


def _non_negative_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"must be a number >= 0, got {value!r}")
    return float(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer >= 1, got {value!r}")
    return int(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value.lower()

    return check


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _kpts(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"must be three positive integers [k1, k2, k3], got {value!r}")
    return [_positive_int(k) for k in value]


_CONVERGENCE_KEYS = {"energy", "density", "eigenstates", "forces", "bands"}


def _convergence(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a table of SCF criteria, got {value!r}")
    unknown = set(value) - _CONVERGENCE_KEYS
    if unknown:
        raise ValueError(f"unknown criterion {sorted(unknown)[0]!r} (known: {', '.join(sorted(_CONVERGENCE_KEYS))})")
    normalised: dict[str, Any] = {}
    for key, criterion in value.items():
        if key == "bands":
            if not isinstance(criterion, (int, str)) or isinstance(criterion, bool):
                raise ValueError(f"bands must be an integer or 'occupied'/'all', got {criterion!r}")
            normalised[key] = criterion
        else:
            normalised[key] = _positive_float(criterion)
    return normalised


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a table, got {value!r}")
    return dict(value)


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"must be a list of strings, got {value!r}")
    return list(value)


GPAW_OPTIONS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    # physics (the paper's defaults)
    "mode": ("pw", _one_of("pw", "lcao", "fd")),
    "ecut": (450.0, _positive_float),  # plane-wave cutoff, eV (mode pw)
    "h": (0.2, _positive_float),  # grid spacing, Å (modes fd and lcao)
    "basis": ("dzp", _string),  # LCAO basis (mode lcao)
    "xc": ("PBE", _string),
    "smearing": ("fermi-dirac", _one_of("fermi-dirac", "marzari-vanderbilt", "methfessel-paxton")),
    "smearing_width": (0.1, _non_negative_float),  # eV
    "kpt_density": (30.0, _positive_float),  # k_i = ceil(kpt_density / |a_i|) on periodic axes, Å
    "kpts": (None, _optional(_kpts)),  # explicit k-point grid, overrides kpt_density
    "convergence": ({}, _convergence),
    "maxiter": (333, _positive_int),  # SCF iterations before the job fails
    "spinpol": (False, _boolean),
    "magmom": (0.0, _number),  # initial moment per atom, μB (spinpol)
    "charge": (0.0, _number),  # total charge, e
    # execution (do not change the result)
    "ranks": (1, _positive_int),  # MPI ranks of one job
    "ranks_per_node": (None, _optional(_positive_int)),  # defaults to ranks (one node per job)
    "launcher": ("auto", _one_of("auto", "mpiexec", "srun")),
    "launcher_args": ([], _string_list),  # extra launcher arguments, e.g. ["--mpi=pmix"]
    "parallel": ({}, _table),  # GPAW's `parallel` keyword, passed through
    "timeout_s": (None, _optional(_positive_float)),
}
EXECUTION_OPTIONS = frozenset({"ranks", "ranks_per_node", "launcher", "launcher_args", "parallel", "timeout_s"})

_OPTIONS: dict[str, dict[str, tuple[Any, Callable[[Any], Any]]]] = {"emt": {}, "gpaw": GPAW_OPTIONS}


def known_calculators() -> tuple[str, ...]:
    """Names accepted as `[parent] calculator`."""
    return tuple(_OPTIONS)


def validate_parent_params(calculator: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a parent's options and return them complete (defaults filled in, JSON-able).

    Raises `ParentConfigError` naming the field: ``parent.calculator`` or ``parent.<name>.<option>``.
    """
    if not isinstance(calculator, str) or calculator.lower() not in _OPTIONS:
        raise ParentConfigError(
            "parent.calculator", f"unknown calculator {calculator!r} (known: {', '.join(known_calculators())})"
        )
    calculator = calculator.lower()
    options = _OPTIONS[calculator]
    params = dict(params or {})
    unknown = sorted(set(params) - set(options))
    if unknown:
        known = ", ".join(sorted(options)) or "none"
        raise ParentConfigError(f"parent.{calculator}.{unknown[0]}", f"unknown option (known: {known})")
    complete: dict[str, Any] = {}
    for name, (default, check) in options.items():
        try:
            complete[name] = check(params[name]) if name in params else _copy(default)
        except ValueError as error:
            raise ParentConfigError(f"parent.{calculator}.{name}", str(error)) from None
    return complete


def physics_params(calculator: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options that decide the result (execution options such as `ranks` removed), complete.

    Use these to identify a reference calculation: the same chunk with other ranks is the same job.
    """
    complete = validate_parent_params(calculator, params)
    return {name: value for name, value in complete.items() if name not in EXECUTION_OPTIONS}


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ---------------------------------------------------------------------------------------------
# Running a reference calculation.

def compute_reference(
    calculator: str, params: Mapping[str, Any] | None, payload: Mapping[str, Any], job_dir: str | None = None
) -> dict[str, Any]:
    """Energy (eV) and forces (eV/Å) of one structure (an `atoms_to_payload` dict) by a parent.

    Returns ``{"energy", "forces" (N×3 list), "wall_time_s", "host", "external_id", "log_file"}``;
    `external_id` is the batch job id (``SLURM_JOB_ID``) where there is one. Raises
    `ReferenceFailed` with the reason (for GPAW, the tail of its log) when no result comes.
    """
    complete = validate_parent_params(calculator, params)
    start = time.perf_counter()
    energy, forces, log_file = _RUNNERS[calculator.lower()](complete, dict(payload), job_dir)
    forces = np.asarray(forces, dtype=float)
    n_atoms = len(payload["numbers"])
    if forces.shape != (n_atoms, 3) or not np.all(np.isfinite(forces)) or not math.isfinite(energy):
        raise ReferenceFailed(f"{calculator}: no finite energy and {n_atoms}x3 forces (got forces {forces.shape})")
    return {
        "energy": float(energy),
        "forces": forces.tolist(),
        "wall_time_s": time.perf_counter() - start,
        "host": socket.gethostname(),
        "external_id": os.environ.get("SLURM_JOB_ID"),
        "log_file": log_file,
    }


def _run_emt(params: dict[str, Any], payload: dict[str, Any], job_dir: str | None):
    from ase.calculators.emt import EMT

    atoms = payload_to_atoms(payload)
    atoms.calc = EMT()
    try:
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
    except Exception as error:  # EMT lacks parameters for an element, or a degenerate geometry
        raise ReferenceFailed(f"emt: {type(error).__name__}: {error}") from None
    return energy, forces, None


def _run_gpaw(params: dict[str, Any], payload: dict[str, Any], job_dir: str | None):
    if payload_to_atoms(payload).cell.rank < 3:
        raise ReferenceFailed("gpaw: the structure needs a full cell (a box with vacuum for a chunk)")
    if job_dir is None:
        with tempfile.TemporaryDirectory(prefix="nft-gpaw-") as scratch:
            energy, forces, _ = _run_gpaw_in(params, payload, Path(scratch))
            return energy, forces, None
    return _run_gpaw_in(params, payload, Path(job_dir))


def _run_gpaw_in(params: dict[str, Any], payload: dict[str, Any], job_dir: Path):
    job_dir.mkdir(parents=True, exist_ok=True)
    input_file, result_file, log_file = job_dir / "gpaw-input.json", job_dir / "gpaw-result.json", job_dir / GPAW_LOG_NAME
    result_file.unlink(missing_ok=True)
    input_file.write_text(json.dumps({"payload": payload, "params": params, "txt": GPAW_LOG_NAME}))
    command = mpi_launch_prefix(params) + [
        gpaw_command(), "python", "-m", "pipeline.execution.gpaw_runner", input_file.name, result_file.name
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # GPAW parallelises over MPI ranks; threads would oversubscribe
    try:
        returncode, stdout, stderr = run_process_group(command, job_dir, env, params["timeout_s"])
    except OSError as error:
        raise ReferenceFailed(f"gpaw: cannot start {shlex.join(command)}: {error}") from None
    (job_dir / "launcher.log").write_text(
        f"$ {shlex.join(command)}\nexit code: {returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    )
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    if result is not None and "error" not in result:
        return result["energy"], result["forces"], str(log_file)
    if returncode is None:
        reason = f"gpaw: timed out after {params['timeout_s']} s"
    elif result is not None:
        reason = f"gpaw: {result['error']}"
    else:
        reason = f"gpaw: {shlex.join(command)} exited with code {returncode} and no result"
    raise ReferenceFailed(_with_tails(reason, log_file, stderr))


def run_process_group(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float | None
) -> tuple[int | None, str, str]:
    """Run `command` in its own process group; past `timeout_s` stop the whole group (launcher and
    ranks: SIGTERM, then SIGKILL). Returns (exit code or None on timeout, stdout, stderr)."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=5.0)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        return None, stdout or "", stderr or ""
    finally:
        _signal_group(process.pid, signal.SIGKILL)  # ranks the launcher left behind
        if process.poll() is None:
            process.wait()


def _signal_group(group_id: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group_id, sig)
    except (ProcessLookupError, PermissionError):
        pass


def gpaw_command() -> str:
    """GPAW's launcher (`gpaw python` turns on its MPI), beside this interpreter if installed there."""
    beside = Path(sys.executable).parent / "gpaw"
    return str(beside) if beside.exists() else shutil.which("gpaw") or "gpaw"


def mpi_launch_prefix(params: Mapping[str, Any]) -> list[str]:
    """The command words that start `params["ranks"]` MPI ranks of one job.

    `launcher = "auto"`: Parsl's ``$PARSL_MPI_PREFIX`` when an MPIExecutor placed the job; else
    ``srun`` inside a Slurm allocation; else ``mpiexec``; a one-rank job outside an MPIExecutor runs
    without a launcher.
    """
    ranks, launcher, extra = params["ranks"], params["launcher"], list(params["launcher_args"])
    if launcher == "auto":
        parsl_prefix = os.environ.get("PARSL_MPI_PREFIX")
        if parsl_prefix:
            return shlex.split(parsl_prefix)
        if ranks == 1:
            return []
        launcher = "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "mpiexec"
    if launcher == "srun":
        return ["srun", "--ntasks", str(ranks), *extra]
    return ["mpiexec", "-n", str(ranks), *extra]


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _with_tails(reason: str, log_file: Path, stderr: str) -> str:
    parts = [reason]
    if log_file.exists() and log_file.read_text(errors="replace").strip():
        parts.append(f"--- last lines of {log_file}:\n{_tail(log_file.read_text(errors='replace'))}")
    if stderr.strip():
        parts.append(f"--- stderr:\n{_tail(stderr)}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# GPAW set-up shared by the runner (inside the MPI job) and tests.

def gpaw_kpts(atoms: Atoms, params: Mapping[str, Any]) -> tuple[int, int, int]:
    """The k-point grid: explicit `kpts`, else ceil(kpt_density/|a_i|) on periodic axes, 1 elsewhere."""
    if params.get("kpts"):
        return tuple(int(k) for k in params["kpts"])  # type: ignore[return-value]
    lengths = atoms.cell.lengths()
    return tuple(
        max(1, math.ceil(params["kpt_density"] / length)) if periodic and length > 0 else 1
        for periodic, length in zip(atoms.pbc, lengths)
    )  # type: ignore[return-value]


def gpaw_setup(payload: Mapping[str, Any], params: Mapping[str, Any], txt: str | None = None) -> tuple[Atoms, dict]:
    """The structure and `gpaw.GPAW` keyword arguments for complete `[parent.gpaw]` options.

    k-points come from the structure as given (Γ only for a non-periodic chunk); a non-periodic box
    is then made periodic for plane waves, which need it (the vacuum keeps images apart).
    """
    atoms = payload_to_atoms(dict(payload))
    if atoms.cell.rank < 3:
        raise ReferenceFailed("gpaw: the structure needs a full cell (a box with vacuum for a chunk)")
    if params["spinpol"] and params["magmom"]:
        atoms.set_initial_magnetic_moments([params["magmom"]] * len(atoms))
    mode = params["mode"]
    kwargs: dict[str, Any] = {
        "mode": {"name": "pw", "ecut": params["ecut"]} if mode == "pw" else mode,
        "xc": params["xc"],
        "occupations": {"name": params["smearing"], "width": params["smearing_width"]},
        "kpts": {"size": gpaw_kpts(atoms, params), "gamma": True},
        "maxiter": params["maxiter"],
        "spinpol": params["spinpol"],
        "charge": params["charge"],
        "txt": txt,
    }
    if mode in ("fd", "lcao"):
        kwargs["h"] = params["h"]
    if mode == "lcao":
        kwargs["basis"] = params["basis"]
    if params["convergence"]:
        kwargs["convergence"] = dict(params["convergence"])
    if params["parallel"]:
        kwargs["parallel"] = dict(params["parallel"])
    if mode == "pw":
        atoms.pbc = True
    return atoms, kwargs


_RUNNERS: dict[str, Callable[[dict[str, Any], dict[str, Any], str | None], tuple[float, Any, str | None]]] = {
    "emt": _run_emt,
    "gpaw": _run_gpaw,
}
