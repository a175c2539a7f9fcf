"""Optimiser benchmark: Adam, the batched L-BFGS and Levenberg–Marquardt on the same data and the
same wall-time budgets, from a cold start and from a warm start (issue 10, item 3).

    .venv/bin/python bench/bench_optimisers.py [--budgets 2,4,8,16] [--chunks 41] [--seed 0] [--threads N]

Data as bench_training.py: 20 EMT-labelled bulk Pt cells (energy + all forces) and 8 Å chunks of
the rattled Pt260 (central force only; 41 is the Pt260 example's last iteration). The cold start is
the default-config ensemble freshly initialised (a campaign's first training); the warm start is
that ensemble trained with the defaults on the bulk cells alone, then given the chunks (what every
later iteration does). Every optimiser gets the same start, data and budget of seconds:

- Adam: `epochs` sized to the budget from a measured epoch time, learning rate 1e-2 → 5e-4 cold,
  5e-4 warm (what `train_ensemble` uses);
- L-BFGS: cold after the default 300 Adam epochs (counted in the budget), warm alone; stopped at the
  budget;
- Levenberg–Marquardt: alone, stopped at the budget.

Each row gives the median member loss, the ensemble-mean force MAE on the training rows, and on the
whole rattled Pt260 against EMT (generalisation) with its largest δ_i. The last rows run each
second-order method to its default step count with no budget.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_training import training_set  # noqa: E402
from bench_training_step import prepared  # noqa: E402


def starts(structures, n_bulk: int):
    """(cold model, warm model, scaled data, settings) on the same scaling, as train_ensemble builds them."""
    from pipeline.science.training import train_ensemble, warm_start

    cold, data, settings = prepared(structures)
    bulk_model, _ = train_ensemble(structures[:n_bulk], settings)
    warm = copy.deepcopy(cold)
    if not warm_start(warm, bulk_model):
        raise RuntimeError("warm start did not match the bulk model")
    return cold, warm, data, settings


def scores(model, data, weights, settings, target, target_forces) -> dict:
    """Median member loss, training force MAE, and MAE / max δ on the target (eV/Å)."""
    from pipeline.science.losses import member_losses
    from pipeline.science.training_data import force_mae

    losses = member_losses(model, data, weights, settings, create_graph=False).detach()
    prediction = model.predict(target)
    return {
        "loss": float(losses.median()),
        "train MAE": force_mae(model, data, np.ones(weights.shape[1], dtype=bool)),
        "target MAE": float(np.abs(prediction.forces - target_forces).mean()),
        "target max δ": prediction.max_delta,
    }


def run_optimiser(name: str, start, data, weights, settings, warm: bool, budget_s: float | None) -> tuple[object, float]:
    """Train a copy of `start` with one optimiser for `budget_s` seconds (None: its default steps)."""
    from pipeline.science.settings import ADAM_EPOCHS_BEFORE_LBFGS
    from pipeline.science.optimisers import adam, lbfgs, levenberg_marquardt

    model = copy.deepcopy(start)
    began = time.perf_counter()
    deadline = None if budget_s is None else (lambda: time.perf_counter() - began >= budget_s)
    unlimited = 10**7
    if name == "Adam":
        epoch_s = _epoch_seconds(copy.deepcopy(start), data, weights, settings)
        epochs = max(1, int(budget_s / epoch_s))
        lr = settings.final_learning_rate if warm else settings.learning_rate
        adam(model, data, weights, None, settings.with_changes(epochs=epochs, learning_rate=lr), None)
    elif name == "L-BFGS":
        lbfgs_settings = settings.with_changes(optimizer="lbfgs", epochs=ADAM_EPOCHS_BEFORE_LBFGS)
        if not warm:
            adam(model, data, weights, None, lbfgs_settings, None)
        steps = settings.lbfgs_steps if budget_s is None else unlimited
        lbfgs(model, data, weights, lbfgs_settings.with_changes(lbfgs_steps=steps), deadline)
    else:
        steps = settings.lm_steps if budget_s is None else unlimited
        levenberg_marquardt(model, data, weights, settings, steps, deadline)
    return model, time.perf_counter() - began


def _epoch_seconds(model, data, weights, settings) -> float:
    """Seconds per Adam epoch on this data (best of a few short runs)."""
    from pipeline.science.optimisers import adam

    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        adam(model, data, weights, None, settings.with_changes(epochs=10), None)
        best = min(best, (time.perf_counter() - began) / 10)
    return best


def main() -> None:
    import torch

    from pipeline.science.examples import emt_label, rattled_cuboctahedron

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--budgets", default="2,4,8,16", help="comma-separated wall-time budgets, s")
    parser.add_argument("--chunks", type=int, default=41, help="Pt260 chunks in the data (default 41)")
    parser.add_argument("--bulk", type=int, default=20, help="bulk cells in the data (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed")
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"# Optimisers at equal wall time: {args.bulk} bulk cells + {args.chunks} Pt260 chunks, seed {args.seed}, {threads} thread(s)")
    print(common.machine_line())
    print(common.code_version())
    structures, _ = training_set(args.bulk, args.chunks, seed=args.seed)
    cold, warm, data, settings = starts(structures, args.bulk)
    settings = settings.with_changes(seed=args.seed)
    weights = torch.ones(cold.n_members, len(structures), dtype=torch.float64)
    target = rattled_cuboctahedron()
    target_forces = emt_label(target).get_forces()
    rows = []
    for start_name, start in (("cold", cold), ("warm", warm)):
        for budget in [*budgets, None]:
            for name in ("Adam", "L-BFGS", "Levenberg–Marquardt"):
                if budget is None and name == "Adam":
                    continue
                model, seconds = run_optimiser(name, start, data, weights, settings, start_name == "warm", budget)
                result = scores(model, data, weights, settings, target, target_forces)
                label = "default steps" if budget is None else f"{budget:g}"
                rows.append(
                    [
                        start_name,
                        label,
                        name,
                        f"{seconds:.1f}",
                        f"{result['loss']:.2e}",
                        f"{result['train MAE']:.4f}",
                        f"{result['target MAE']:.4f}",
                        f"{result['target max δ']:.3f}",
                    ]
                )
                print("  " + " | ".join(rows[-1]), flush=True)
    print(
        common.markdown_table(
            [
                "start",
                "budget (s)",
                "optimiser",
                "wall (s)",
                "median member loss",
                "train force MAE (eV/Å)",
                "Pt260 MAE vs EMT (eV/Å)",
                "Pt260 max δ (eV/Å)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
