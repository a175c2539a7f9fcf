"""Accuracy benchmark: G5-moment vs G4 descriptors on the same data.

    .venv/bin/python bench/bench_accuracy.py            # 30 train / 10 test bulk EMT cells, 1500 epochs
    .venv/bin/python bench/bench_accuracy.py --quick    # 300 epochs

Train an ensemble of 10 ([5, 5], 20 features, Rc 6.5 Å) on 30 strained, rattled bulk fcc Pt cells
(2–16 atoms, EMT energies + forces; `bulk_training_cells(30, seed=1)`), test on 10 other cells
(`bulk_training_cells(10, seed=2)`) and on the rattled Pt260 cuboctahedron (transfer to a
surface-rich cluster that is not in the training set). Same settings and seeds for both kinds.
G4 rows print "n/a" until `SymmetryFunctionParams(kind="g4")` computes real G4 features.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def errors(model, items) -> dict:
    """Force MAE / max error (eV/Å) over all atoms, energy RMSE per atom (eV), max δ (eV/Å)."""
    diffs, energy_errors, deltas = [], [], []
    for item in items:
        prediction = model.predict(item.atoms)
        diffs.append((prediction.forces - item.forces).ravel())
        energy_errors.append((prediction.energy - item.energy) / len(item.atoms))
        deltas.append(prediction.max_delta)
    diffs = np.concatenate(diffs)
    return {
        "force_mae": float(np.abs(diffs).mean()),
        "force_max": float(np.abs(diffs).max()),
        "energy_rmse": float(np.sqrt(np.mean(np.square(energy_errors)))),
        "max_delta": float(max(deltas)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None, help="Adam epochs (default 1500, quick 300)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; one row per kind and seed, plus the mean over seeds")
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)

    from pipeline.science.examples import bulk_training_cells, emt_labelled, rattled_cuboctahedron
    from pipeline.science.settings import TrainingSettings
    from pipeline.science.training import train_ensemble

    epochs = args.epochs or (300 if args.quick else 1500)
    train = [emt_labelled(atoms) for atoms in bulk_training_cells(30, seed=1)]
    test = [emt_labelled(atoms) for atoms in bulk_training_cells(10, seed=2)]
    pt260 = [emt_labelled(rattled_cuboctahedron())]
    print(
        f"# Accuracy: G5-moments vs G4, ensemble of 10, [5,5], 20 features, Rc 6.5 Å, {epochs} Adam epochs;"
        f" train 30 bulk EMT cells ({sum(len(i.atoms) for i in train)} atoms), test 10 others "
        f"({sum(len(i.atoms) for i in test)} atoms) + rattled Pt260"
    )
    print(common.machine_line(), flush=True)
    g4 = common.g4_status()
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = []
    for kind in ("g5-moments", "g4"):
        if kind == "g4" and g4 is not None:
            rows.append([kind, "", f"n/a ({g4})", "", "", "", "", "", ""])
            continue
        measured = []
        for seed in seeds:
            settings = TrainingSettings(epochs=epochs, seed=seed, descriptor={"kind": kind})
            try:
                start = time.perf_counter()
                model, report = train_ensemble(train, settings)
                seconds = time.perf_counter() - start
                held_out = errors(model, test)
                transfer = errors(model, pt260)
            except Exception as error:  # noqa: BLE001 - report, don't crash the table
                rows.append([kind, seed, f"error: {type(error).__name__}: {error}", "", "", "", "", "", ""])
                continue
            values = [
                report.train_force_mae,
                held_out["force_mae"],
                held_out["force_max"],
                held_out["energy_rmse"] * 1e3,
                held_out["max_delta"],
                transfer["force_mae"],
                seconds,
            ]
            measured.append(values)
            rows.append([kind, seed, *values])
            print(f"  {kind}, seed {seed}: trained in {seconds:.1f} s", flush=True)
        if len(measured) > 1:
            rows.append([f"**{kind} mean**", f"{len(measured)} seeds", *np.mean(measured, axis=0)])
    print()
    print(
        common.markdown_table(
            [
                "descriptor",
                "seed",
                "train force MAE eV/Å",
                "test force MAE eV/Å",
                "test max force error eV/Å",
                "test energy RMSE meV/atom",
                "test max δ eV/Å",
                "Pt260 force MAE eV/Å",
                "training s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
