"""Block size and precision of ensemble prediction: which default is fastest, and is δ still right?

Ensemble of 10 trained members (16 EMT-labelled bulk Pt cells, Adam + L-BFGS: speed does not
depend on the weights, δ's round-off does), energy + forces + δ_i of a 10,192-atom rattled fcc Pt
crystal (σ 0.05 Å), blocks 256 / 512 / 1024 / 2048, float32 / float64, at 1 and 2 threads. Each
thread count runs in a fresh process (``OMP_NUM_THREADS`` and `torch.set_num_threads` both set);
inside it the cases are interleaved round by round and the best of the rounds is reported.

"vs old default" is the case's rate over float64 block 2048's (the shipped default before this
benchmark), measured in the same process. "δ vs old" is |max δ − max δ_old| / max δ_old (the
campaign's convergence test uses max δ), max |δ_i − δ_i,old| in eV/Å and its largest ratio to δ_i.

    .venv/bin/python bench/bench_block_size.py            # ~2 min on a quiet machine, ~10 at load 5
    .venv/bin/python bench/bench_block_size.py --quick    # 864 atoms, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common

SCRIPT = str(Path(__file__).resolve())
BLOCKS = (256, 512, 1024, 2048)
DTYPES = ("float64", "float32")
OLD_DEFAULT = ("float64", 2048)


def train_model(path: str, epochs: int) -> None:
    """10 members on 16 EMT-labelled bulk cells (Adam, then 300 L-BFGS steps), written to `path`."""
    from pipeline.science.examples import bulk_training_cells, emt_labelled
    from pipeline.science.settings import TrainingSettings
    from pipeline.science.training import train_ensemble
    from pipeline.storage.model_file import save_model

    structures = [emt_labelled(atoms) for atoms in bulk_training_cells(16, seed=1)]
    model, _ = train_ensemble(structures, TrainingSettings(ensemble=10, epochs=epochs, optimizer="lbfgs", lbfgs_steps=300))
    save_model(model, path)


def run_threads(case: dict) -> dict:
    """All (dtype, block) cases at one thread count, interleaved; best wall of the rounds."""
    import torch

    from pipeline.storage.model_file import load_ensemble

    torch.set_num_threads(case["threads"])
    atoms = common.pt_crystal(tuple(case["repeat"]))
    models = {name: load_ensemble(case["model"], dtype=getattr(torch, name)) for name in DTYPES}
    for model in models.values():
        model.predict(common.pt_crystal((2, 2, 2)), block_size=512)  # warm-up
    keys = [(name, block) for name in DTYPES for block in BLOCKS]
    times: dict[str, list[dict]] = {f"{n} {b}": [] for n, b in keys}
    deltas: dict[str, np.ndarray] = {}
    for _ in range(case["rounds"]):
        for name, block in keys:
            timing, prediction = common.timed(lambda: models[name].predict(atoms, block_size=block))
            times[f"{name} {block}"].append(timing)
            deltas[f"{name} {block}"] = prediction.uncertainties
    old = deltas[f"{OLD_DEFAULT[0]} {OLD_DEFAULT[1]}"]
    rows = {}
    for key, runs in times.items():
        fastest = min(runs, key=lambda r: r["seconds"])
        rows[key] = {
            **fastest,
            "delta_max_rel": float(abs(deltas[key].max() - old.max()) / old.max()),
            "delta_i_max_abs": float(np.abs(deltas[key] - old).max()),
            "delta_i_max_rel": float((np.abs(deltas[key] - old) / old).max()),
        }
    return {
        "threads": torch.get_num_threads(),
        "n_atoms": len(atoms),
        "max_delta": float(old.max()),
        "min_delta": float(old.min()),
        "rows": rows,
    }


def table(results: list[dict]) -> str:
    headers = [
        "threads",
        "precision",
        "block",
        "atoms/s (wall)",
        "wall s",
        "CPU s",
        "vs old default (f64, 2048)",
        "max δ vs old (rel.)",
        "max |Δδ_i| eV/Å",
        "max |Δδ_i|/δ_i",
    ]
    lines = []
    for result in results:
        n_atoms = result["n_atoms"]
        old = result["rows"][f"{OLD_DEFAULT[0]} {OLD_DEFAULT[1]}"]["seconds"]
        for name in DTYPES:
            for block in BLOCKS:
                row = result["rows"][f"{name} {block}"]
                lines.append(
                    [
                        result["threads"],
                        name,
                        block,
                        n_atoms / row["seconds"],
                        row["seconds"],
                        row["cpu_seconds"],
                        f"{old / row['seconds']:.2f}×",
                        f"{row['delta_max_rel']:.1e}",
                        f"{row['delta_i_max_abs']:.1e}",
                        f"{row['delta_i_max_rel']:.1e}",
                    ]
                )
    return common.markdown_table(headers, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="864 atoms, 1 round, 100 training epochs")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="Adam epochs of the model (default 300)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        common.emit(run_threads(json.loads(args.case)))
        return
    repeat = (6, 6, 6) if args.quick else (14, 14, 13)
    rounds = args.rounds or (1 if args.quick else 3)
    threads = [int(t) for t in args.threads.split(",")]
    print(
        f"# Prediction block size and precision: 10 trained members, E + F + δ_i, rattled fcc Pt "
        f"{4 * int(np.prod(repeat)):,} atoms, best of {rounds} interleaved rounds"
    )
    print(common.machine_line(), flush=True)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="nft-block-") as scratch:
        model_path = str(Path(scratch) / "model.nft")
        train_model(model_path, args.epochs or (100 if args.quick else 300))
        for n in threads:
            case = {"threads": n, "repeat": repeat, "rounds": rounds, "model": model_path}
            env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "NFT_BENCH_THREADS": str(n)}
            proc = subprocess.run(
                [sys.executable, SCRIPT, "--case", json.dumps(case)], capture_output=True, text=True, env=env, cwd=common.ROOT
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith(common.RESULT_PREFIX)]
            if not lines:
                sys.exit(f"{n} thread(s): exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
            results.append(json.loads(lines[-1][len(common.RESULT_PREFIX) :]))
            print(f"  {n} thread(s) done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(
        f"({time.perf_counter() - start:.0f} s in all; old-default max δ {results[0]['max_delta']:.3f} eV/Å, "
        f"min δ_i {results[0]['min_delta']:.3f} eV/Å)\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
