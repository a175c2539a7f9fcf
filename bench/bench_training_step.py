"""Training step benchmark: one loss + gradient evaluation (what every L-BFGS step and Adam epoch
costs), the hand-written chain rule that training uses against autograd, on the same data.

    .venv/bin/python bench/bench_training_step.py              # 20 bulk cells + 41 and 200 Pt260 chunks
    .venv/bin/python bench/bench_training_step.py --quick      # 10 bulk cells + 20 chunks

Data as bench_training.py (EMT-labelled bulk fcc Pt cells and 8 Å chunks of the rattled Pt260,
central force only); 41 chunks is the Pt260 example campaign's last iteration. Both sides start
from the same default-config model (10 members, [5, 5], the data's radial shells) and the same
scaled `TrainingData`: autograd is `member_losses(...).sum().backward()`, the hand-written side
`member_losses_with_gradients` (what `train_ensemble` calls). Evaluations are interleaved, best
of the rounds; the table also gives the largest relative difference of the gradients.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_training import training_set  # noqa: E402


def prepared(structures):
    """A default-config ensemble and its scaled training data, as train_ensemble builds them."""
    from pipeline.science.model import EnsembleModel
    from pipeline.science.settings import TrainingSettings
    from pipeline.science.training import descriptor_params

    try:
        from pipeline.science.training import fit_scaling
        from pipeline.science.training_data import elements_of, prepare_training_data
    except ImportError:  # a commit before the trainer's split (bench_lm_jacobian measures old commits)
        from pipeline.science.training import _fit_scaling as fit_scaling, elements_of, prepare_training_data

    settings = TrainingSettings()
    params = descriptor_params(structures, elements_of(structures), settings)
    model = EnsembleModel(params, hidden=settings.hidden, member_seeds=list(settings.seeds()))
    data = prepare_training_data(structures, model.descriptor)
    fit_scaling(model, data, structures)
    return model, data.scaled_by(model), settings


def measure(structures, rounds: int, evaluations: int) -> dict:
    """Milliseconds per evaluation for both sides, and how far their gradients differ."""
    import torch

    from pipeline.science.losses import member_losses, member_losses_with_gradients

    model, data, settings = prepared(structures)
    weights = torch.ones(model.n_members, len(structures), dtype=torch.float64)
    parameters = list(model.networks.parameters())

    def autograd_step():
        for p in parameters:
            p.grad = None
        member_losses(model, data, weights, settings).sum().backward()
        return [p.grad.clone() for p in parameters]

    def hand_step():
        for p in parameters:
            p.grad = None
        member_losses_with_gradients(model, data, weights, settings)
        return [p.grad.clone() for p in parameters]

    reference, hand = autograd_step(), hand_step()
    difference = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-300)) for a, b in zip(reference, hand))
    best = {"autograd": float("inf"), "hand": float("inf")}
    for _ in range(rounds):
        for name, step in (("autograd", autograd_step), ("hand", hand_step)):
            start = time.perf_counter()
            for _ in range(evaluations):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / evaluations * 1e3)
    return {
        "rows": int(data.features.shape[0]),
        "force rows": int(data.forces.shape[0]),
        "nnz": int(data.force_jacobian.values().numel()),
        "difference": difference,
        **best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="10 bulk cells and 20 chunks, fewer rounds")
    args = parser.parse_args()
    common.set_threads(args.threads)
    cases = [(10, 20)] if args.quick else [(20, 41), (20, 200)]
    rounds, evaluations = (2, 5) if args.quick else (5, 20)
    print("# Training step: one loss + gradient, hand-written chain rule vs autograd (same data, same model)")
    print(common.machine_line())
    rows = []
    for n_bulk, n_chunks in cases:
        structures, _ = training_set(n_bulk, n_chunks)
        result = measure(structures, rounds, evaluations)
        rows.append(
            [
                f"{n_bulk} bulk + {n_chunks} chunks",
                result["rows"],
                result["force rows"],
                result["nnz"],
                f"{result['autograd']:.1f}",
                f"{result['hand']:.1f}",
                f"{result['autograd'] / result['hand']:.2f}",
                f"{result['difference']:.1e}",
            ]
        )
    print(
        common.markdown_table(
            [
                "data",
                "feature rows",
                "force rows",
                "Jacobian nnz",
                "autograd (ms)",
                "hand-written (ms)",
                "speed-up",
                "max rel. gradient difference",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
