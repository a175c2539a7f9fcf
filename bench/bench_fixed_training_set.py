"""Train model variants on one campaign's stored training set and score them against EMT.

    .venv/bin/python bench/bench_fixed_training_set.py CAMPAIGN_DIR [--variant JSON …] [--score FILE]
        [--all-target-atoms] [--initial FILE]

CAMPAIGN_DIR holds a campaign's config.toml and database (e.g. a case folder of
`bench_convergence.py`). Its reference results become the training set exactly as the campaign
would train them (`training_structures`); each `--variant` (a JSON object of `[model]` keys, e.g.
'{"hidden": [3, 3]}'; default: the defaults) is trained from scratch on it with one thread and
scored on `--score` (default: the campaign's first target): force MAE against EMT, max δ over the
atoms that have no chunk, median δ. `--all-target-atoms` replaces the chunks by every atom of the
target (the most a campaign could ever label) and scores on the case's transfer structure: how far
the model generalises when coverage is not the limit. `--initial FILE` (labelled) replaces the
initial set, to compare initial sets on the same chunks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from ase.io import read

import common  # noqa: F401  (puts the repository root on sys.path)
from pipeline.campaign.config import load_config
from pipeline.campaign.training_set import training_structures
from pipeline.science.examples import emt_label
from pipeline.science.settings import TrainingSettings
from pipeline.science.structures import LabelledStructure
from pipeline.science.training import train_ensemble
from pipeline.storage.store import CampaignStore


def emt_labelled(atoms, energy: bool = True) -> LabelledStructure:
    """`atoms` with EMT's energy (or none: forces only) and every force row trained."""
    labelled = emt_label(atoms)
    forces = labelled.get_forces().copy()
    value = float(labelled.get_potential_energy()) if energy else None
    labelled.calc = None
    return LabelledStructure(labelled, value, forces, np.ones(len(labelled), bool))


def stored_training_set(campaign_dir: Path) -> tuple[list[LabelledStructure], list[int], list[int]]:
    """(training structures, centres of the chunks in the first target, the model's elements)."""
    config = load_config(campaign_dir / "config.toml")
    with CampaignStore.open(config.database_url, config.name, create=False) as store:
        structures = training_structures(
            store, config.parent.name, config.parent.physics(), config.file.chunks.training_environment, config.file.model.cutoff
        )
        centres = [int(s.center_in_parent) for s in store.structures("chunk")]
    return structures, centres, list(config.elements)


def score(structures, elements, variant: dict, target, chunked: list[int]) -> dict:
    """Train `variant` on `structures`; force MAE (eV/Å) against EMT on `target` and its δ (eV/Å)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    model, _ = train_ensemble(structures, TrainingSettings.model_validate(variant), elements=elements)
    wall = time.perf_counter() - started
    reference = emt_labelled(target, energy=False)
    prediction = model.predict(target)
    free = np.ones(len(target), bool)
    free[chunked] = False
    return {
        "variant": variant,
        "training_s": round(wall, 1),
        "force_mae": round(float(np.abs(prediction.forces - reference.forces).mean()), 4),
        "max_delta_without_chunk": round(float(prediction.uncertainties[free].max()), 3),
        "median_delta": round(float(np.median(prediction.uncertainties)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("campaign_dir", type=Path)
    parser.add_argument("--variant", action="append", default=None, help="JSON object of [model] keys")
    parser.add_argument("--score", type=Path, default=None)
    parser.add_argument("--all-target-atoms", action="store_true")
    parser.add_argument("--initial", type=Path, default=None)
    args = parser.parse_args()
    structures, centres, elements = stored_training_set(args.campaign_dir)
    target_path = args.campaign_dir / "target.traj"
    score_path = args.score or target_path
    if args.initial is not None:
        structures = [s for s in structures if s.energy is None]
        structures = [emt_labelled(atoms) for atoms in read(args.initial, ":")] + structures
    if args.all_target_atoms:
        structures = [s for s in structures if s.energy is not None] + [emt_labelled(read(target_path), energy=False)]
        centres = []
        score_path = args.score or args.campaign_dir / "transfer.traj"
    target = read(score_path)
    for variant in args.variant or ["{}"]:
        row = score(structures, elements, json.loads(variant), target, centres if score_path == target_path else [])
        print(json.dumps({"scored_on": score_path.name, "training_rows": len(structures), **row}), flush=True)


if __name__ == "__main__":
    main()
