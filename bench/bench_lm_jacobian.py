"""Levenberg–Marquardt Jacobian benchmark: one residual Jacobian and one cold LM fit, this checkout
against another commit's code on the same data (issue 10, item 3: LM on two elements).

    .venv/bin/python bench/bench_lm_jacobian.py [--against REV] [--chunks 120] [--rounds 3] [--threads N]

Data per case: the bench set's initial set of the case's elements (bench/convergence_set.py: 20 bulk
cells of 2–16 atoms, or 8 random-alloy cells of 32 atoms) with energies and all forces, plus
`--chunks` 8 Å chunks of its rattled target (central force only). `--against` exports REV's
`pipeline/` with `git archive` and measures it in a subprocess on the same data (default: fc5ada1^,
the per-pair Jacobian). Times are the best of `--rounds`; each side's Jacobian is checked against
the other's (max relative difference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CASES = ("Pt-decahedron-383", "PtAu-alloy-cuboctahedron-309")


def data_set(case_name: str, n_chunks: int):
    """Initial set + central-atom chunks of the case's target."""
    from bench_training import central_force_chunks
    from convergence_set import CASES as BENCH_CASES, bulk_cells, rattle_to_force
    from pipeline.science.structures import LabelledStructure

    case = {c.name: c for c in BENCH_CASES}[case_name]
    structures = [LabelledStructure(a, a.get_potential_energy(), a.get_forces()) for a in bulk_cells(case.elements, 20, seed=0)]
    return structures + central_force_chunks(rattle_to_force(case.target(), seed=1000), n_chunks)


def measure(case_name: str, n_chunks: int, rounds: int, jacobian_file: str) -> dict:
    """Best-of-rounds seconds of one Jacobian and of a cold `train_ensemble`; saves the Jacobian."""
    import torch

    from bench_training_step import prepared
    from pipeline.science import training as T

    try:
        from pipeline.science.losses import jacobian_terms, member_residual_jacobians
    except ImportError:  # a commit before the trainer's split
        jacobian_terms, member_residual_jacobians = T._jacobian_terms, T._member_residual_jacobians

    structures = data_set(case_name, n_chunks)
    model, data, settings = prepared(structures)
    # LM named, not taken as the default: the reference commit's default may be another optimiser
    settings = settings.with_changes(optimizer="levenberg-marquardt", epochs=0)
    weights = torch.ones(model.n_members, len(structures), dtype=data.features.dtype)
    terms = jacobian_terms(data)
    jacobian_s = []
    for _ in range(rounds):
        start = time.perf_counter()
        jacobian = member_residual_jacobians(model, data, weights, settings, terms)
        jacobian_s.append(time.perf_counter() - start)
    torch.save(jacobian, jacobian_file)
    fit_s, report = [], None
    for _ in range(max(1, rounds // 2)):
        start = time.perf_counter()
        _, report = T.train_ensemble(structures, settings)
        fit_s.append(time.perf_counter() - start)
    return {
        "pipeline": T.__file__,
        "jacobian_s": min(jacobian_s),
        "fit_s": min(fit_s),
        "shape": list(jacobian.shape),
        "final_loss": report.final_loss,
        "train_mae": report.train_force_mae,
    }


def exported(rev: str, folder: Path) -> str:
    """REV's pipeline/ written under `folder`; returns REV's short hash."""
    short = subprocess.run(
        ["git", "-C", str(common.ROOT), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = folder / "tree.tar"
    subprocess.run(["git", "-C", str(common.ROOT), "archive", "-o", str(archive), rev, "pipeline"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return short


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="fc5ada1^", help="the reference commit (default: the per-pair Jacobian)")
    parser.add_argument("--chunks", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # JSON: one measurement in this process
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.case:
        case = json.loads(args.case)
        sys.path.insert(0, case["pipeline_root"])  # before anything imports pipeline
        common.emit(measure(case["name"], case["chunks"], case["rounds"], case["jacobian_file"]))
        return
    import torch

    print(common.machine_line())
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        reference_root = Path(scratch) / "reference"
        reference_root.mkdir()
        reference = exported(args.against, reference_root)
        for name in CASES:
            results = {}
            for side, root in (("this", common.ROOT), ("reference", reference_root)):
                case = {
                    "name": name,
                    "chunks": args.chunks,
                    "rounds": args.rounds,
                    "pipeline_root": str(root),
                    "jacobian_file": str(Path(scratch) / f"{side}.pt"),
                }
                command = [sys.executable, __file__, "--case", json.dumps(case)]
                proc = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=3600)
                lines = [line for line in proc.stdout.splitlines() if line.startswith(common.RESULT_PREFIX)]
                if not lines:
                    raise SystemExit(f"{side} {name}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
                results[side] = json.loads(lines[-1][len(common.RESULT_PREFIX) :])
            ours, theirs = (torch.load(Path(scratch) / f"{side}.pt") for side in ("this", "reference"))
            difference = float((ours - theirs).abs().max() / theirs.abs().max())
            this, ref = results["this"], results["reference"]
            rows.append(
                [
                    name,
                    "×".join(map(str, this["shape"])),
                    f"{ref['jacobian_s']:.3f}",
                    f"{this['jacobian_s']:.3f}",
                    f"{ref['jacobian_s'] / this['jacobian_s']:.2f}",
                    f"{ref['fit_s']:.1f}",
                    f"{this['fit_s']:.1f}",
                    f"{ref['fit_s'] / this['fit_s']:.2f}",
                    f"{difference:.1e}",
                    f"{ref['final_loss']:.4e} / {this['final_loss']:.4e}",
                ]
            )
            print(f"  {name}: this {this['pipeline']}, reference {ref['pipeline']}", flush=True)
    print(f"\nreference: {reference} (--against {args.against}); this: {common.code_version()}; {args.chunks} chunks\n")
    print(
        common.markdown_table(
            [
                "case",
                "Jacobian (M×N×P)",
                f"Jacobian {reference} (s)",
                "Jacobian this (s)",
                "speed-up",
                f"cold LM fit {reference} (s)",
                "cold LM fit this (s)",
                "speed-up",
                "max rel. Jacobian difference",
                "final loss reference / this",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
