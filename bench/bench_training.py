"""Training benchmark: one epoch (forward + backward + Adam step), 10 members batched vs one by one.

    .venv/bin/python bench/bench_training.py            # 20 bulk EMT cells + 200 Pt260 chunks
    .venv/bin/python bench/bench_training.py --quick    # 10 bulk cells + 30 chunks, fewer epochs

Data: 20 strained/rattled bulk fcc Pt cells (2–16 atoms, energy + all forces) and chunks of 8 Å
carved around 200 atoms of the rattled Pt260 cuboctahedron (`carve_chunk`), labelled with EMT,
training only the central atom's force (force_mask, no energy) — what a campaign trains on.

Both sides use the same precomputed features and force Jacobians (`prepare_training_data`, timed
separately as the one-off preparation): the batched side is one `EnsembleModel` of 10 members and
`member_losses(...).sum().backward()`; the one-by-one side is 10 1-member models with the same
initial weights, each with its own Adam, stepped in a Python loop. Epoch times are interleaved
(batched, one-by-one, batched, …) and the best round is reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_SPEEDUP = 5.0


def training_set(n_bulk: int, n_chunks: int, seed: int = 0):
    """Labelled bulk cells (energy + forces) and central-atom-only chunks of the rattled Pt260."""
    from pipeline.science.examples import bulk_training_cells, emt_labelled, rattled_cuboctahedron

    structures = [emt_labelled(atoms) for atoms in bulk_training_cells(n_bulk, seed=seed)]
    chunks = central_force_chunks(rattled_cuboctahedron(), n_chunks, seed)
    return structures + chunks, [len(chunk.atoms) for chunk in chunks]


def central_force_chunks(parent, n_chunks: int, seed: int = 0):
    """8 Å chunks of `parent` around `n_chunks` random atoms, EMT-labelled, training only the central
    atom's force (what a campaign trains on)."""
    from pipeline.science.chunks import carve_chunk
    from pipeline.science.examples import emt_labelled

    chunks = []
    for centre in np.random.default_rng(seed).choice(len(parent), size=min(n_chunks, len(parent)), replace=False):
        chunk = carve_chunk(parent, int(centre), radius_angstrom=8.0)
        mask = np.zeros(len(chunk.atoms), dtype=bool)
        mask[chunk.center_in_chunk] = True
        chunks.append(emt_labelled(chunk.atoms, mask))
    return chunks


class PlainAutogradMember:
    """Peer: one member trained with plain autograd, descriptors recomputed every epoch.

    What a straightforward BP code does (double backward through the pair basis for the force
    loss). Neighbour lists and the rows that matter (a chunk: the centre and the atoms within the
    cutoff of it) are prepared once, outside the timing, as nft does; per epoch and member:
    R.requires_grad → r_ij → pair basis → pair sums → energies → forces by autograd (create_graph)
    → the loss → backward → Adam step.
    """

    def __init__(self, structures, cutoff: float):
        import torch
        import vesin

        positions, centres, neighbours, offsets, rows, row_structure = [], [], [], [], [], []
        energy_structures, force_atoms, force_structure = [], [], []
        base = 0
        for s, item in enumerate(structures):
            atoms = item.atoms
            box = atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3))
            i, j, shifts = vesin.NeighborList(cutoff=cutoff, full_list=True).compute(
                atoms.positions, box, [bool(p) for p in atoms.pbc], quantities="ijS"
            )
            trained = np.flatnonzero(item.force_mask)
            needed = np.arange(len(atoms)) if item.energy is not None else np.union1d(trained, i[np.isin(j, trained)])
            keep = np.isin(i, needed)
            positions.append(atoms.positions)
            centres.append(i[keep] + base)
            neighbours.append(j[keep] + base)
            offsets.append(np.asarray(shifts[keep], dtype=float) @ np.asarray(atoms.cell.array, dtype=float))
            rows.append(needed + base)
            row_structure.append(np.full(len(needed), s))
            if item.energy is not None:
                energy_structures.append(s)
            force_atoms.append(trained + base)
            force_structure.append(np.full(len(trained), s))
            base += len(atoms)
        t = torch.from_numpy
        self.positions = t(np.concatenate(positions))
        self.i, self.j = t(np.concatenate(centres).astype(np.int64)), t(np.concatenate(neighbours).astype(np.int64))
        self.offsets = t(np.concatenate(offsets))
        self.rows = t(np.concatenate(rows).astype(np.int64))
        self.row_structure = t(np.concatenate(row_structure).astype(np.int64))
        self.force_atoms = t(np.concatenate(force_atoms).astype(np.int64))
        self.force_structure = t(np.concatenate(force_structure).astype(np.int64))
        self.energy_structures = t(np.array(energy_structures, dtype=np.int64))
        self.energies = torch.tensor([structures[k].energy for k in energy_structures], dtype=torch.float64)
        self.energy_atoms = torch.tensor([len(structures[k].atoms) for k in energy_structures], dtype=torch.float64)
        self.forces = t(np.concatenate([item.forces[item.force_mask] for item in structures]))
        self.n_structures = len(structures)

    def loss(self, single, settings):
        import torch

        positions = self.positions.clone().requires_grad_(True)
        vectors = positions[self.j] - positions[self.i] + self.offsets
        values = single.descriptor.pair_basis(vectors).values
        sums = values.new_zeros(len(positions), values.shape[-1]).index_add(0, self.i, values)[self.rows]
        element = torch.zeros(len(self.rows), dtype=torch.int64)
        atomic = single.atomic_energies(sums.view(1, len(self.rows), 1, -1), element)[0]
        (gradient,) = torch.autograd.grad(atomic.sum(), positions, create_graph=True)
        forces = -gradient[self.force_atoms]
        energies = atomic.new_zeros(self.n_structures).index_add(0, self.row_structure, atomic)[self.energy_structures]
        loss = settings.energy_weight * (((energies - self.energies) / self.energy_atoms) ** 2).sum()
        return loss + settings.force_weight * ((forces - self.forces) ** 2).sum(-1).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per round and side (default 5, quick 2)")
    parser.add_argument("--no-plain-autograd", action="store_true", help="skip the plain-autograd peer")
    parser.add_argument("--plain-rounds", type=int, default=1, help="epochs of the plain-autograd peer (slow: ~30 CPU-s)")
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)

    import torch

    from pipeline.science.model import EnsembleModel
    from pipeline.science.settings import TrainingSettings
    from pipeline.science.losses import member_losses
    from pipeline.science.training import fit_scaling
    from pipeline.science.training_data import prepare_training_data

    n_bulk, n_chunks = (10, 30) if args.quick else (20, 200)
    rounds = args.rounds or (2 if args.quick else 5)
    epochs = args.epochs or (2 if args.quick else 5)
    members = 10

    t0 = time.perf_counter()
    structures, chunk_sizes = training_set(n_bulk, n_chunks)
    label_s = time.perf_counter() - t0
    print(
        f"# Training epoch: {n_bulk} bulk EMT cells + {len(chunk_sizes)} Pt260 chunks (8 Å, "
        f"{min(chunk_sizes)}–{max(chunk_sizes)} atoms, central force only); 10 members, [5,5], 20 features"
    )
    print(common.machine_line())
    print(f"(data carved and EMT-labelled in {label_s:.1f} s, not part of any timing)", flush=True)

    params = common.make_params()
    model = EnsembleModel(params, hidden=(5, 5), member_seeds=list(range(members)))

    prep_times = []
    data = None
    for _ in range(2 if not args.quick else 1):
        times, data = common.timed(lambda: prepare_training_data(structures, model.descriptor))
        prep_times.append(times)
    prep = min(prep_times, key=lambda t: t["seconds"])
    n_rows = int(data.features.shape[0])
    n_force_rows = int(data.forces.shape[0])
    nnz = int(data.force_jacobian.values().numel())
    fit_scaling(model, data, structures)
    scale_times, data = common.timed(lambda: data.scaled_by(model))  # as train_ensemble does: scaled once
    prep = {k: prep[k] + scale_times[k] for k in prep}

    settings = TrainingSettings()
    weights = torch.ones(members, len(structures), dtype=torch.float64)
    singles = [common.single_member(model, m) for m in range(members)]
    single_weights = torch.ones(1, len(structures), dtype=torch.float64)

    # same losses before any step: the one-by-one models are the batched members
    batched_losses = member_losses(model, data, weights, settings, create_graph=False).detach()
    single_losses = torch.cat([member_losses(s, data, single_weights, settings, create_graph=False).detach() for s in singles])
    loss_diff = float((batched_losses - single_losses).abs().max() / batched_losses.abs().max())

    optimizer = torch.optim.Adam(model.networks.parameters(), lr=settings.learning_rate)
    single_optimizers = [torch.optim.Adam(s.networks.parameters(), lr=settings.learning_rate) for s in singles]

    def batched_epoch():
        optimizer.zero_grad()
        member_losses(model, data, weights, settings).sum().backward()
        optimizer.step()

    def one_by_one_epoch():
        for single, opt in zip(singles, single_optimizers):
            opt.zero_grad()
            member_losses(single, data, single_weights, settings).sum().backward()
            opt.step()

    def run(epoch_fn):
        for _ in range(epochs):
            epoch_fn()

    batched_epoch()  # warm-up (both sides take the same first step)
    one_by_one_epoch()
    batched, single = [], []
    for _ in range(rounds):
        times, _ = common.timed(lambda: run(batched_epoch))
        batched.append({k: v / epochs for k, v in times.items()})
        times, _ = common.timed(lambda: run(one_by_one_epoch))
        single.append({k: v / epochs for k, v in times.items()})
    # after identical steps the members must still agree
    after_b = member_losses(model, data, weights, settings, create_graph=False).detach()
    after_s = torch.cat([member_losses(s, data, single_weights, settings, create_graph=False).detach() for s in singles])
    after_diff = float((after_b - after_s).abs().max() / after_b.abs().max())

    naive_rows, naive_note = [], ""
    if not args.no_plain_autograd:
        try:
            plain = PlainAutogradMember(structures, params.cutoff)
            n_model = EnsembleModel(params, hidden=(5, 5), member_seeds=list(range(members)))
            n_model.load_state_dict(model.state_dict())
            n_singles = [common.single_member(n_model, m) for m in range(members)]
            reference = member_losses(n_model, data, weights, settings, create_graph=False).detach()
            check = max(
                abs(float(plain.loss(x, settings)) - float(reference[m])) / float(reference.abs().max()) for m, x in enumerate(n_singles)
            )
            n_opts = [torch.optim.Adam(x.networks.parameters(), lr=settings.learning_rate) for x in n_singles]

            def plain_epoch():
                for single, opt in zip(n_singles, n_opts):
                    opt.zero_grad()
                    plain.loss(single, settings).backward()
                    opt.step()

            plain_runs = []
            for _ in range(args.plain_rounds):
                times, _ = common.timed(plain_epoch)
                plain_runs.append(times)
            nb = min(plain_runs, key=lambda t: t["seconds"])
            bb = min(batched, key=lambda t: t["seconds"])
            naive_rows = [
                [
                    "one epoch, 10 members one by one, plain autograd through the descriptors (no precomputation)",
                    nb["seconds"] * 1e3,
                    min(t["cpu_seconds"] for t in plain_runs) * 1e3,
                    np.median([t["seconds"] for t in plain_runs]) * 1e3,
                    f"{nb['seconds'] / bb['seconds']:.2f}×",
                ]
            ]
            naive_note = (
                f"plain-autograd peer: {len(plain.i):,} pairs per member-epoch; its losses equal nft's to "
                f"{check:.1e} (relative); {args.plain_rounds} epoch(s), interleaved after the nft rounds"
            )
        except Exception as error:  # noqa: BLE001
            naive_note = f"plain-autograd peer failed: {type(error).__name__}: {error}"

    b = min(batched, key=lambda t: t["seconds"])
    s = min(single, key=lambda t: t["seconds"])
    b_cpu = min(t["cpu_seconds"] for t in batched)
    s_cpu = min(t["cpu_seconds"] for t in single)
    rows = [
        [
            "one epoch, 10 members batched (one EnsembleModel)",
            b["seconds"] * 1e3,
            b_cpu * 1e3,
            np.median([t["seconds"] for t in batched]) * 1e3,
            "1.00×",
        ],
        [
            "one epoch, 10 members one by one (1-member models, 10 Adams)",
            s["seconds"] * 1e3,
            s_cpu * 1e3,
            np.median([t["seconds"] for t in single]) * 1e3,
            f"{s['seconds'] / b['seconds']:.2f}×",
        ],
    ]
    print()
    print(
        common.markdown_table(
            ["case", "best wall ms/epoch", "best CPU ms/epoch", "median wall ms/epoch", "batched faster by"], rows + naive_rows
        )
    )
    print()
    print(
        common.markdown_table(
            ["one-off preparation (descriptors + Jacobians)", "wall s", "CPU s", "rows", "trained force rows", "Jacobian non-zeros"],
            [[f"{len(structures)} structures", prep["seconds"], prep["cpu_seconds"], n_rows, n_force_rows, nnz]],
        )
    )
    print()
    ratio = s["seconds"] / b["seconds"]
    print(f"{rounds} rounds × {epochs} epochs per side, interleaved; best round reported.")
    print(
        f"batched vs one-by-one member losses: max relative difference {loss_diff:.1e} before training, "
        f"{after_diff:.1e} after {1 + rounds * epochs} identical Adam steps"
    )
    print(
        f"target batched ≥ {TARGET_SPEEDUP:.0f}× one-by-one: {ratio:.2f}× (wall, best), "
        f"{s_cpu / b_cpu:.2f}× (CPU) → {'MET' if ratio >= TARGET_SPEEDUP else 'NOT MET'}"
    )
    if naive_note:
        print(naive_note)


if __name__ == "__main__":
    main()
