"""Convergence benchmark: the default campaign config on the targets of the pure-metal or the alloy set.

    .venv/bin/python bench/bench_convergence.py [OUT] [--set pure|alloy] [--start cells|initial|cells,initial]
        [--cases NAME,…] [--seeds 0,1,2] [--threshold T] [--extra variant.toml] [--timeout 900] [--threads N]
        [--max-iterations N] [--label TEXT]
    .venv/bin/python bench/bench_convergence.py [OUT] --table-only [--set …] [--start …] [--label TEXT] [--cases NAME,…]

`--set pure` (the default): the ten targets of `bench/convergence_set.py`, threshold 0.1 eV/Å by
default; `--set alloy`: the targets of `bench/alloy_set.py` (issue 27), threshold 0.2 eV/Å by default
(the issue's conditions). `--start` picks the initial set (`convergence_set.STARTS`): `cells` = the
case's own cells (pure set: `bulk_cells`; alloy set: `random_cells`, 20 cells of 1–16 atoms with
random occupation), `initial` = `nft initial` for the case's elements with the EMT parent and default
settings, generated once per case and seed into OUT/<case>/nft-initial-seed-S.traj and reused.

For every case, start and seed S, writes the case's structures (`write_case(case, OUT/<case>/seed-S,
seed=S, start=…)`; the `initial` start's in OUT/<case>/initial-seed-S) and a minimal `config.toml`
beside them — only the campaign name, the files, the EMT parent, `active.threshold` (and `max_iterations` if given) and
`model.seed = S`, so the *default* config is measured; `--extra FILE` deep-merges a TOML fragment
into every config to compare a variant (e.g. `[model] lbfgs_steps = 500`). Runs `nft run` on it
in its own session (the whole process group is killed after `--timeout` seconds), then evaluates
the kept model against EMT on the target and on the larger transfer structure.

Every per-seed row is appended to OUT/results.jsonl (with the set, start, label, commit and dirty
flag), so partial sweeps can be combined; the table shows per case and start the median over seeds,
"converged" as k/n seeds and the δ history of the median-δ seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)
from alloy_set import ALLOY_CASES  # noqa: E402
from convergence_set import CASES, STARTS, Case, write_case  # noqa: E402

SETS: dict[str, tuple[Case, ...]] = {"pure": CASES, "alloy": ALLOY_CASES}
DEFAULT_THRESHOLD = {"pure": 0.1, "alloy": 0.2}
"""active.threshold (eV/Å) of each set unless --threshold: the pure bench's 0.1 since it began; the
alloys at issue 27's 0.2."""
DEFAULT_OUT = Path("/tmp/nft-bench-convergence")
RESULTS_NAME = "results.jsonl"
NFT = Path(sys.executable).parent / "nft"


# ----- config files ---------------------------------------------------------------------------
def base_config(case: Case, seed: int, threshold: float, max_iterations: int | None) -> dict[str, Any]:
    """The minimal campaign config of one case and seed (everything else at its default)."""
    active: dict[str, Any] = {"threshold": threshold}
    if max_iterations is not None:
        active["max_iterations"] = max_iterations
    return {
        "campaign": {"name": f"{case.name}-seed{seed}", "workdir": "run", "database": "sqlite:///nft.db"},
        "data": {"targets": ["target.traj"], "initial": "initial.traj"},
        "parent": {"calculator": "emt"},
        "active": active,
        "model": {"seed": seed},
    }


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in: tables merge key by key, any other value of `extra` wins."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def toml_value(value: Any) -> str:
    """One TOML value: string, bool, int, float or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def toml_text(table: dict[str, Any], prefix: str = "") -> str:
    """Nested tables of scalars and lists as TOML text (`[a]`, then `[a.b]` for sub-tables)."""
    scalars = [f"{key} = {toml_value(value)}" for key, value in table.items() if not isinstance(value, dict)]
    parts = []
    if prefix and scalars:
        parts.append(f"[{prefix}]\n" + "\n".join(scalars) + "\n")
    elif scalars:
        parts.append("\n".join(scalars) + "\n")
    elif prefix and not any(isinstance(value, dict) for value in table.values()):
        parts.append(f"[{prefix}]\n")
    for key, value in table.items():
        if isinstance(value, dict):
            parts.append(toml_text(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(parts)


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    """Write `config` as folder/config.toml and check that it reads back unchanged."""
    path = folder / "config.toml"
    text = toml_text(config)
    if tomllib.loads(text) != config:
        raise ValueError(f"the TOML writer does not round-trip this config:\n{text}")
    path.write_text(text)
    return path


# ----- running one campaign -------------------------------------------------------------------
def run_campaign(config: Path, timeout_s: float, threads: int | None) -> tuple[str, float, str]:
    """Run `nft run config` in its own session; (status "ok" | "failed" | "timeout", wall s, output tail)."""
    env = dict(os.environ, TORCHANI_NO_WARN_EXTENSIONS="1", PYTHONWARNINGS="ignore")
    env["PATH"] = f"{NFT.parent}{os.pathsep}{env.get('PATH', '')}"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = config.parent / "nft-run.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [str(NFT), "run", str(config)], cwd=config.parent, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            status = "timeout"
    wall = time.perf_counter() - started
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    return status, wall, tail


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc` (its own session) so nft stops Parsl cleanly, then after
    the leader has exited (or 20 s) SIGKILL whatever of the group is left (workers, interchange)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def campaign_status(config: Path) -> dict[str, Any] | None:
    """`nft status --json` of the campaign (what its database says), or None if it cannot be read."""
    proc = subprocess.run([str(NFT), "status", str(config), "--json"], capture_output=True, text=True, cwd=config.parent, timeout=120)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None


# ----- evaluation -----------------------------------------------------------------------------
def force_mae_vs_emt(model_path: Path, structure: Path) -> float:
    """Force MAE (eV/Å, mean over all components) of the model against EMT on one structure."""
    from ase.calculators.emt import EMT
    from ase.io import read

    from pipeline import load_model

    atoms = read(structure)
    atoms.calc = EMT()
    reference = atoms.get_forces()
    atoms.calc = load_model(str(model_path))
    return float(np.mean(np.abs(atoms.get_forces() - reference)))


def resolve_model(value: str | None, workdir: Path) -> Path | None:
    """The kept model file: summary's path (relative ones inside workdir), else workdir/model.nft."""
    for candidate in ([Path(value)] if value else []) + [workdir / "model.nft"]:
        path = candidate if candidate.is_absolute() else workdir / candidate
        if path.is_file():
            return path
    return None


def measure(case: Case, folder: Path, config: Path, status: str, wall_s: float, tail: str) -> dict[str, Any]:
    """One per-seed row: the campaign's numbers from summary.json (nft status after a timeout) and the MAEs."""
    from ase.io import read

    workdir = folder / "run"
    n_atoms = len(read(folder / "target.traj"))
    row: dict[str, Any] = {"status": status, "atoms": n_atoms, "wall_s": wall_s}
    summary_path = workdir / "summary.json"
    if status == "ok" and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        row.update(
            converged=bool(summary["converged"]),
            stop_reason=summary.get("stop_reason"),
            iterations=summary["iterations"],
            chunks=summary["chunks"],
            final_uncertainty=summary["final_uncertainty"],
            history=[entry["uncertainty"] for entry in summary["history"]],
            chunks_added=[entry["chunks_added"] for entry in summary["history"]],
            train_force_mae=[entry["train_force_mae"] for entry in summary["history"]],
            campaign_wall_s=summary.get("wall_time", {}).get("total"),
        )
        model_value = summary.get("model")
    else:
        state = campaign_status(config) or {}
        history = state.get("history") or []
        row.update(
            converged=False,
            stop_reason=status,
            iterations=len(history),
            chunks=state.get("chunks"),
            final_uncertainty=state.get("best_uncertainty"),
            history=[entry.get("uncertainty") for entry in history],
            error=tail if status == "failed" else None,
        )
        model_value = state.get("model")
    if row.get("chunks") is not None:
        row["chunk_fraction"] = row["chunks"] / n_atoms
    model = resolve_model(model_value, workdir)
    if model is not None:
        row["mae_target"] = force_mae_vs_emt(model, folder / "target.traj")
        row["mae_transfer"] = force_mae_vs_emt(model, folder / "transfer.traj")
    return row


def case_folder(out: Path, case: Case, start: str, seed: int) -> Path:
    """OUT/<case>/seed-S for the `cells` start (as before there were starts), else OUT/<case>/<start>-seed-S."""
    return out / case.name / (f"seed-{seed}" if start == "cells" else f"{start}-seed-{seed}")


def bench_one(case: Case, start: str, seed: int, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Write, run and measure one case, start and seed from a fresh folder (`case_folder`); a
    generated initial set is kept in OUT/<case> and reused."""
    folder = case_folder(args.out, case, start, seed)
    if folder.exists():
        shutil.rmtree(folder)  # a campaign that finished would only rewrite its summary: start afresh
    write_case(case, folder, seed=seed, start=start, cache=args.out / case.name)
    config = write_config(folder, deep_merge(base_config(case, seed, args.threshold, args.max_iterations), extra))
    status, wall_s, tail = run_campaign(config, args.timeout, args.threads)
    return measure(case, folder, config, status, wall_s, tail)


# ----- results file and table -----------------------------------------------------------------
def git_state() -> tuple[str, bool]:
    """Short commit of HEAD and whether tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(common.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(common.ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(dirty)


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one row to the JSON-lines results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def row_start(row: dict[str, Any]) -> str:
    """The row's start (rows from before there were starts: `cells`)."""
    return row.get("start") or "cells"


def read_results(path: Path, label: str | None, cases: list[str], starts: list[str]) -> list[dict[str, Any]]:
    """Rows of the results file with this label (any if None) of these cases and starts, the latest
    row per (label, case, start, seed)."""
    if not path.is_file():
        return []
    latest: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if (label is None or row.get("label") == label) and row["case"] in cases and row_start(row) in starts:
            latest[(row.get("label"), row["case"], row_start(row), row["seed"])] = row
    return list(latest.values())


def median(rows: list[dict[str, Any]], key: str) -> float | int:
    """Median of `key` over the rows that have it (nan if none; an int when it is a whole count)."""
    values = [row[key] for row in rows if row.get(key) is not None]
    if not values:
        return float("nan")
    value = statistics.median(values)
    return int(value) if all(isinstance(v, int) for v in values) and float(value).is_integer() else float(value)


def median_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed whose final δ is the (lower) median of the seeds."""
    ranked = sorted(rows, key=lambda row: (row.get("final_uncertainty") is None, row.get("final_uncertainty") or 0.0))
    return ranked[(len(ranked) - 1) // 2]


def table(rows: list[dict[str, Any]], case_order: list[str], set_name: str) -> str:
    """One markdown row per case and start (and label, if rows of several labels are shown): medians
    over its seeds, converged k/n and the median seed's δ history."""
    headers = [
        "case",
        "set",
        "start",
        "atoms",
        "iterations",
        "chunks",
        "chunks/atoms",
        "final δ (eV/Å)",
        "MAE target (eV/Å)",
        "MAE transfer (eV/Å)",
        "wall time (s)",
        "converged",
        "δ history of the median seed (eV/Å)",
    ]
    labels = sorted({row.get("label") or "" for row in rows})
    lines = []
    starts = [start for start in STARTS if any(row_start(row) == start for row in rows)]
    for name, start, label in [(name, start, label) for name in case_order for start in starts for label in labels]:
        mine = [row for row in rows if row["case"] == name and row_start(row) == start and (row.get("label") or "") == label]
        if not mine:
            continue
        converged = sum(bool(row.get("converged")) for row in mine)
        timeouts = sum(row.get("status") == "timeout" for row in mine)
        failed = sum(row.get("status") == "failed" for row in mine)
        notes = (f", {timeouts} timeout" if timeouts else "") + (f", {failed} failed" if failed else "")
        middle = median_run(mine)
        history = " ".join(f"{value:.2f}" for value in middle.get("history") or [] if value is not None)
        lines.append(
            [
                f"{name} [{label}]" if len(labels) > 1 else name,
                mine[0].get("set") or set_name,
                start,
                median(mine, "atoms"),
                median(mine, "iterations"),
                median(mine, "chunks"),
                median(mine, "chunk_fraction"),
                median(mine, "final_uncertainty"),
                median(mine, "mae_target"),
                median(mine, "mae_transfer"),
                median(mine, "wall_s"),
                f"{converged}/{len(mine)}{notes}",
                f"seed {middle['seed']}: {history}" if history else f"seed {middle['seed']}: –",
            ]
        )
    return common.markdown_table(headers, lines)


def header(args: argparse.Namespace) -> str:
    """Commit, date and the options of this invocation."""
    commit, dirty = git_state()
    options = " ".join(sys.argv[1:]) or "(defaults)"
    threads = args.threads or os.environ.get("OMP_NUM_THREADS") or "default"
    return (
        f"convergence bench · commit {commit}{' (dirty tree)' if dirty else ''} · "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} cores · OMP threads {threads} · "
        f"set {args.set} · start {','.join(args.start_list)} · threshold {args.threshold} eV/Å · options: {options}"
    )


# ----- command line ---------------------------------------------------------------------------
def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--set",
        choices=sorted(SETS),
        default="pure",
        help="pure: the pure-metal targets (and the PtAu alloy); alloy: bench/alloy_set.py (default pure)",
    )
    parser.add_argument("--start", default="cells", help=f"initial set(s), comma-separated among {', '.join(STARTS)} (default cells)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all of the set)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="active.threshold, eV/Å (default: 0.1 for the pure set, 0.2 for the alloys)"
    )
    parser.add_argument("--max-iterations", type=int, default=None, help="active.max_iterations (default: the config's default)")
    parser.add_argument("--extra", type=Path, default=None, help="TOML fragment deep-merged into every config")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per campaign before its process group is killed (default 900)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for nft run (default: as is)")
    parser.add_argument("--label", default=None, help="tag stored with every row; --table-only filters by it")
    parser.add_argument("--table-only", action="store_true", help="print the table from OUT/results.jsonl, run nothing")
    args = parser.parse_args()
    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLD[args.set]
    args.start_list = [start.strip() for start in args.start.split(",") if start.strip()]
    if not args.start_list or any(start not in STARTS for start in args.start_list):
        parser.error(f"--start {args.start!r}: give one or more of {', '.join(STARTS)}")
    args.cases_of_set = SETS[args.set]
    names = [case.name for case in args.cases_of_set]
    args.case_names = args.cases.split(",") if args.cases else names
    unknown = [name for name in args.case_names if name not in names]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(names)}")
    args.seed_list = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    args.out = args.out.resolve()
    return args


def main() -> None:
    args = parse_arguments()
    print(header(args), flush=True)
    results = args.out / RESULTS_NAME
    if args.table_only:
        rows = read_results(results, args.label, args.case_names, args.start_list)
    else:
        rows = []
        extra = tomllib.loads(args.extra.read_text()) if args.extra else {}
        commit, dirty = git_state()
        for case, start in [(case, start) for case in args.cases_of_set if case.name in args.case_names for start in args.start_list]:
            for seed in args.seed_list:
                row = {
                    "case": case.name,
                    "set": args.set,
                    "start": start,
                    "seed": seed,
                    "label": args.label,
                    "commit": commit,
                    "dirty": dirty,
                    "threshold": args.threshold,
                    "max_iterations": args.max_iterations,
                    "extra": args.extra.read_text() if args.extra else None,
                    "threads": args.threads,
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                row.update(bench_one(case, start, seed, args, extra))
                append_result(results, row)
                rows.append(row)
                print(
                    f"  {case.name} start {start} seed {seed}: {row['status']}, {row.get('iterations')} iterations, "
                    f"δ {row.get('final_uncertainty')}, {row['wall_s']:.0f} s",
                    flush=True,
                )
    print(table(rows, args.case_names, args.set))


if __name__ == "__main__":
    main()
