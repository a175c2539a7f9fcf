"""Shared helpers of the nft benchmarks: structures, fresh-subprocess cases, peers, tables.

Every case that reports memory runs in its own subprocess (`python bench/<script>.py --case JSON`),
so `ru_maxrss` is that case's own peak resident set (torch allocations included, which tracemalloc
does not see). Cases of one benchmark are interleaved round by round and the best time of the
rounds is reported, because the machine (2 cores) is shared and timings are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PT_A = 3.92  # Å, fcc Pt lattice constant used by pipeline.science.examples
CUTOFF = 6.5  # Å
RESULT_PREFIX = "@@BENCH@@"


# ----- structures ---------------------------------------------------------------------------
def pt_crystal(repeat: tuple[int, int, int], rattle_angstrom: float = 0.05, seed: int = 0):
    """Rattled periodic fcc Pt, `bulk('Pt','fcc',3.92,cubic=True).repeat(repeat)` (4 atoms per cube)."""
    from ase.build import bulk

    atoms = bulk("Pt", "fcc", a=PT_A, cubic=True).repeat(repeat)
    atoms.rattle(stdev=rattle_angstrom, seed=seed)
    return atoms


def repeat_for(n_atoms: int) -> tuple[int, int, int]:
    """Near-cubic repeat of the 4-atom cube giving about `n_atoms` atoms (10,192 for 10^4)."""
    if n_atoms == 10_000:
        return (14, 14, 13)
    cubes = n_atoms / 4
    side = cubes ** (1 / 3)
    a = max(1, int(round(side)))
    b = a
    c = max(1, int(round(cubes / (a * b))))
    return (a, b, c)


# ----- threads --------------------------------------------------------------------------------
def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads (None: the NFT_BENCH_THREADS variable, else torch's default, the
    core count); children started by `run_case` inherit the choice through the environment."""
    import torch

    if n is None and os.environ.get("NFT_BENCH_THREADS"):
        n = int(os.environ["NFT_BENCH_THREADS"])
    if n:
        torch.set_num_threads(int(n))
        os.environ["NFT_BENCH_THREADS"] = str(int(n))
    return torch.get_num_threads()


def add_common_arguments(parser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default, one per core)")


# ----- measurement inside a case subprocess -------------------------------------------------
def current_rss_mib() -> float:
    """Resident set size now (MiB), from /proc/self/status."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB); Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(function: Callable[[], object]) -> tuple[dict, object]:
    """Wall seconds and process CPU seconds (all threads) of one call, and its value.

    CPU seconds are less sensitive than wall seconds to other jobs on the shared machine."""
    cpu = time.process_time()
    start = time.perf_counter()
    value = function()
    wall = time.perf_counter() - start
    return {"seconds": wall, "cpu_seconds": time.process_time() - cpu}, value


def emit(result: dict) -> None:
    """Print a case's result as one tagged JSON line for the parent process."""
    result.setdefault("peak_rss_mib", peak_rss_mib())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----- running cases in fresh subprocesses ---------------------------------------------------
def run_case(script: str, case: dict, timeout_s: float = 1800) -> dict:
    """Run `script --case JSON` in a fresh interpreter; return its result dict (or an error)."""
    command = [sys.executable, script, "--case", json.dumps(case)]
    env = dict(os.environ, TORCHANI_NO_WARN_EXTENSIONS="1", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def interleaved(
    script: str, cases: list[dict], repeats: int, timeout_s: float = 1800, log: Callable[[str], None] | None = None
) -> list[list[dict]]:
    """Run every case once per round, rounds repeated; returns results[case][round]."""
    results: list[list[dict]] = [[] for _ in cases]
    for round_ in range(repeats):
        for k, case in enumerate(cases):
            if round_ > 0 and any("error" in r or r.get("skip") for r in results[k]):
                continue  # a case that failed or is not available is not retried
            if round_ > 0 and case.get("once"):
                continue
            result = run_case(script, case, timeout_s)
            results[k].append(result)
            if log:
                label = case.get("label", case.get("name"))
                if "error" in result:
                    log(f"  round {round_ + 1} {label}: ERROR {result['error']}")
                elif result.get("skip"):
                    log(f"  round {round_ + 1} {label}: {result['skip']}")
                else:
                    log(
                        f"  round {round_ + 1} {label}: {result.get('seconds', float('nan')):.3f} s,"
                        f" peak {result.get('peak_rss_mib', float('nan')):.0f} MiB"
                    )
    return results


def best(runs: list[dict], key: str = "seconds") -> dict | None:
    """The run with the lowest `key` (best of the rounds), or None when no run succeeded."""
    ok = [r for r in runs if "error" not in r and not r.get("skip") and key in r]
    return min(ok, key=lambda r: r[key]) if ok else None


def failure(runs: list[dict]) -> str:
    for r in runs:
        if "error" in r:
            return "error: " + r["error"]
        if r.get("skip"):
            return r["skip"]
    return "no result"


# ----- tables and machine info ---------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:
                return "–"
            if abs(value) >= 100:
                return f"{value:,.0f}"
            if abs(value) >= 1:
                return f"{value:.2f}"
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · code {code_version()} · {cpu}, {os.cpu_count()} cores · "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) · Python {platform.python_version()} · "
        f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (shared machine: times are best of rounds)"
    )


def code_version() -> str:
    """The commit the measured `pipeline` comes from (NFT_BENCH_COMMIT for an exported tree),
    flagged when pipeline/ has uncommitted changes."""
    if os.environ.get("NFT_BENCH_COMMIT"):
        return os.environ["NFT_BENCH_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "pipeline"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted pipeline/ changes" if dirty else "")


# ----- models ---------------------------------------------------------------------------------
def make_params(kind: str = "g5-moments"):
    from pipeline.science.descriptors import SymmetryFunctionParams

    return SymmetryFunctionParams(elements=(78,), cutoff=CUTOFF, kind=kind)


def make_ensemble(kind: str = "g5-moments", members: int = 10, dtype=None, scaled: bool = True):
    """An untrained ensemble of `members` [5, 5] nets; with `scaled`, feature scaling is fitted on a
    small bulk cell so that the nets see O(1) inputs (as a trained model does)."""

    from pipeline.science.model import EnsembleModel

    model = EnsembleModel(make_params(kind), hidden=(5, 5), member_seeds=list(range(members)))
    if scaled:
        fit_scaling_on(model, pt_crystal((2, 2, 2), rattle_angstrom=0.1, seed=7))
    if dtype is not None:
        model = model.to(dtype)
    return model


def fit_scaling_on(model, atoms) -> None:
    """Feature mean/std of `model` from one structure (through the public training path)."""

    from pipeline.science.structures import LabelledStructure
    from pipeline.science.training import fit_scaling
    from pipeline.science.training_data import prepare_training_data

    item = LabelledStructure(atoms=atoms, energy=0.0, forces=np.zeros((len(atoms), 3)))
    data = prepare_training_data([item], model.descriptor)
    fit_scaling(model, data, [item])
    model.energy_offset.zero_()
    model.energy_scale.fill_(1.0)


def single_member(model, member: int):
    """A 1-member EnsembleModel carrying member `member`'s weights and the ensemble's scaling."""

    from pipeline.science.model import EnsembleModel

    single = EnsembleModel(model.params, hidden=model.networks.hidden, member_seeds=[model.member_seeds[member]])
    state = model.state_dict()
    own = single.state_dict()
    for name, tensor in own.items():
        source = state[name]
        if name.startswith("networks.") and source.shape[0] == model.n_members and tensor.shape[0] == 1:
            own[name] = source[member : member + 1].clone()
        else:
            own[name] = source.clone()
    single.load_state_dict(own)
    return single.to(model.dtype)


def g4_status() -> str | None:
    """None when `kind="g4"` really computes G4; otherwise why not (n/a reason).

    The check is API-agnostic: same weights, same small structure, G4 and G5-moment energies must
    differ (G4's r_jk term changes the features); an exception or equal energies mean no G4 yet.
    """
    try:
        g4 = make_ensemble("g4", members=2, scaled=False)
        g5 = make_ensemble("g5-moments", members=2, scaled=False)
        atoms = pt_crystal((1, 1, 1), rattle_angstrom=0.1, seed=3)
        e4 = g4.predict(atoms).member_energies
        e5 = g5.predict(atoms).member_energies
    except Exception as error:  # noqa: BLE001 - any failure means "not available"
        return f"G4 not available ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    if e4.shape == e5.shape and np.allclose(e4, e5, rtol=0, atol=1e-10):
        return "G4 not available (kind='g4' gives the G5-moment result)"
    return None
