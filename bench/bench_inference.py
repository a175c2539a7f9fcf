"""Inference benchmark: ensemble of 10, energy + forces + δ_i on a rattled ~10,000-atom Pt crystal.

    .venv/bin/python bench/bench_inference.py            # full run (10,192 atoms, 2 rounds)
    .venv/bin/python bench/bench_inference.py --quick    # smoke run (864 atoms, 1 round)

Cases (each in a fresh subprocess, interleaved round by round, best time of the rounds):
  - nft batched ensemble (EnsembleModel.predict), float64 / float32, a few block sizes;
  - the same 10 members one by one with plain autograd (descriptor forward + backward per member);
  - TorchANI 2.x AEVComputer (pyaev, cell list, PBC) with 20 features + one [5, 5] net, autograd;
  - ASE EMT and asap3 EMT, for scale;
  - G4 (explicit triplets) batched ensemble, when `SymmetryFunctionParams(kind="g4")` works.
Peak memory is `ru_maxrss` of the case's own process; "setup" is the RSS before the timed call
(interpreter + torch + structure + model), so peak − setup is what the evaluation itself adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
FULL_REPEAT = (14, 14, 13)  # 10,192 atoms
QUICK_REPEAT = (6, 6, 6)  # 864 atoms
# TorchANI's pyaev materialises every neighbour triple (≈3,200 per atom at 6.5 Å in bulk Pt):
# ≈1.2 MiB (float32) / 2.2 MiB (float64) per atom measured, i.e. 12 / 22 GiB at 10,192 atoms, more
# than this shared machine can spare. By default it runs on 2,048 atoms (throughput per atom does
# not depend on size for a cell-list code) beside nft on the same 2,048 atoms. G4 (explicit triplets,
# ≈20 atoms/s and ≈5 GiB peak at 864 atoms) runs on the same 2,048 atoms.
TORCHANI_REPEAT = (8, 8, 8)
TARGET_ATOMS_PER_S = 10_000
TARGET_VS_ONE_BY_ONE = 3.0

# TorchANI mapping of our 20 features (documented in bench/README.md):
#   radial: 8 terms exp(−η_k (r − Rs_k)²)·fc(r) with exactly our (Rs, η) pairs (a custom
#           _BaseRadial, since ANIRadial has one η), cosine cutoff 6.5 Å;
#   angular: ANIAngular, 1 EtaA × 1 Zeta × 3 ShfA × 4 ShfZ = 12 terms, cutoff 6.4999 Å (TorchANI
#           requires angular < radial cutoff), i.e. every neighbour pair within 6.5 Å is a triple.
ANI_ANGULAR = {"eta": 1.4, "zeta": 2.0, "shifts": (2.8, 4.0, 5.2), "sections": (0.3927, 1.1781, 1.9635, 2.7489)}


# ===== cases (run inside the subprocess) =====================================================
def _torch_dtype(name: str):
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def _save(path: str | None, energies, forces, deltas) -> None:
    if path:
        np.savez(path, energies=np.asarray(energies, float), forces=np.asarray(forces, float), deltas=np.asarray(deltas, float))


def case_batched(case: dict) -> dict:
    kind = case.get("kind", "g5-moments")
    if kind == "g4":
        reason = common.g4_status()
        if reason is not None:
            return {"skip": f"n/a ({reason})"}
    atoms = common.pt_crystal(tuple(case["repeat"]))
    model = common.make_ensemble(kind, dtype=_torch_dtype(case["dtype"]))
    model.predict(common.pt_crystal((2, 2, 2)), block_size=case["block"])  # warm-up
    setup = common.current_rss_mib()
    times, prediction = common.timed(lambda: model.predict(atoms, block_size=case["block"]))
    _save(case.get("save"), prediction.member_energies, prediction.member_forces, prediction.uncertainties)
    return {**times, "n_atoms": len(atoms), "setup_rss_mib": setup}


def one_by_one_forces(model, atoms):
    """The 10 members one by one, plain autograd: per member the descriptor forward + backward.

    Pair vectors come from one vesin neighbour list with cell shifts (computed once); per member
    r_ij = R_j − R_i + S·cell with R.requires_grad, pair basis → pair sums → 1-member network
    energy → torch.autograd.grad. Returns member energies (M,), forces (M, N, 3), δ_i (N,).
    """
    import torch
    import vesin

    from pipeline.science.uncertainty import atomic_uncertainty

    dtype = model.dtype
    n_atoms = len(atoms)
    calculator = vesin.NeighborList(cutoff=model.params.cutoff, full_list=True)
    i, j, shifts = calculator.compute(atoms.positions, atoms.cell.array, [bool(p) for p in atoms.pbc], quantities="ijS")
    i = torch.from_numpy(i.astype(np.int64))
    j = torch.from_numpy(j.astype(np.int64))
    cell = torch.tensor(atoms.cell.array, dtype=dtype)
    offsets = torch.from_numpy(np.asarray(shifts, dtype=np.float64)).to(dtype) @ cell
    element_index = torch.from_numpy(model.element_indices(atoms.numbers))
    positions = torch.tensor(atoms.positions, dtype=dtype, requires_grad=True)
    energies, forces = [], []
    for single in model._bench_members:
        vectors = positions[j] - positions[i] + offsets
        values = single.descriptor.pair_basis(vectors).values  # (P, C)
        sums = values.new_zeros(n_atoms, values.shape[-1]).index_add(0, i, values)
        energy = single.atomic_energies(sums.view(1, n_atoms, 1, -1), element_index).sum()
        (gradient,) = torch.autograd.grad(energy, positions)
        energies.append(float(energy))
        forces.append(-gradient.numpy())
    forces = np.stack(forces)
    return np.array(energies), forces, atomic_uncertainty(forces)


def case_one_by_one(case: dict) -> dict:
    atoms = common.pt_crystal(tuple(case["repeat"]))
    model = common.make_ensemble(dtype=_torch_dtype(case["dtype"]))
    model._bench_members = [common.single_member(model, m) for m in range(model.n_members)]
    one_by_one_forces(model, common.pt_crystal((2, 2, 2)))  # warm-up
    setup = common.current_rss_mib()
    times, (energies, forces, deltas) = common.timed(lambda: one_by_one_forces(model, atoms))
    _save(case.get("save"), energies, forces, deltas)
    return {**times, "n_atoms": len(atoms), "setup_rss_mib": setup}


def _torchani_model(dtype):
    import torch
    from torchani.aev import AEVComputer
    from torchani.aev._terms import ANIAngular, _BaseRadial

    from pipeline.science.descriptor_types import DEFAULT_RADIAL_CENTERS, DEFAULT_RADIAL_ETAS

    class G2Radial(_BaseRadial):
        """exp(−η_k (r − Rs_k)²)·fc(r) with one η per shift (our 8 radial G2 functions)."""

        def __init__(self, etas, shifts, cutoff):
            super().__init__(cutoff=cutoff, cutoff_fn="cosine")
            self.register_buffer("eta", torch.tensor(etas, dtype=torch.float))
            self.register_buffer("shifts", torch.tensor(shifts, dtype=torch.float))
            self.num_feats = len(shifts)

        def compute(self, distances):
            return torch.exp(-self.eta * (distances - self.shifts.view(1, -1)) ** 2)

    radial = G2Radial(DEFAULT_RADIAL_ETAS, DEFAULT_RADIAL_CENTERS, common.CUTOFF)
    angular = ANIAngular(cutoff=common.CUTOFF - 1e-4, **ANI_ANGULAR)
    aev = AEVComputer(radial, angular, num_species=1, strategy="pyaev", neighborlist="cell_list")
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(aev.out_dim, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=generator) - 0.5)
    return aev.to(dtype), net.to(dtype)


def torchani_energy_forces(aev, net, atoms, dtype):
    import torch

    species = torch.zeros(1, len(atoms), dtype=torch.long)
    coords = torch.tensor(atoms.positions, dtype=dtype).unsqueeze(0).requires_grad_(True)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)
    pbc = torch.tensor([True, True, True])
    features = aev(species, coords, cell, pbc)
    energy = net(features).sum()
    (gradient,) = torch.autograd.grad(energy, coords)
    return float(energy), -gradient[0], features.shape[-1]


def case_torchani(case: dict) -> dict:
    try:
        import torchani  # noqa: F401
    except ImportError as error:
        return {"skip": f"n/a (torchani not installed: {error})"}
    dtype = _torch_dtype(case["dtype"])
    atoms = common.pt_crystal(tuple(case["repeat"]))
    aev, net = _torchani_model(dtype)
    torchani_energy_forces(aev, net, common.pt_crystal((2, 2, 2)), dtype)  # warm-up
    setup = common.current_rss_mib()
    times, (_, _, n_features) = common.timed(lambda: torchani_energy_forces(aev, net, atoms, dtype))
    return {**times, "n_atoms": len(atoms), "setup_rss_mib": setup, "n_features": n_features}


def case_emt(case: dict) -> dict:
    if case["flavour"] == "asap3":
        try:
            from asap3 import EMT
        except ImportError as error:
            return {"skip": f"n/a (asap3 not installed: {error})"}
    else:
        from ase.calculators.emt import EMT
    atoms = common.pt_crystal(tuple(case["repeat"]))
    warm = common.pt_crystal((2, 2, 2))
    warm.calc = EMT()
    warm.get_forces()
    setup = common.current_rss_mib()

    def run():
        atoms.calc = EMT()
        atoms.get_potential_energy()
        return atoms.get_forces()

    times, _ = common.timed(run)
    return {**times, "n_atoms": len(atoms), "setup_rss_mib": setup}


CASES = {"batched": case_batched, "one_by_one": case_one_by_one, "torchani": case_torchani, "emt": case_emt}


# ===== driver (parent process) ================================================================
def build_cases(repeat, quick: bool, workdir: str, torchani_repeat=TORCHANI_REPEAT) -> list[dict]:
    r = list(repeat)
    blocks = (512, 2048) if not quick else (256, 1024)
    cases = []
    for dtype in ("float64", "float32"):
        for block in blocks:
            cases.append(
                {
                    "name": "batched",
                    "label": f"nft batched, 10 members, G5-moments, {dtype}, block {block}",
                    "dtype": dtype,
                    "block": block,
                    "repeat": r,
                    "group": "nft",
                    "save": f"{workdir}/batched_{dtype}_{block}.npz",
                }
            )
    cases.append(
        {
            "name": "one_by_one",
            "label": "same 10 members one by one, plain autograd, float64",
            "dtype": "float64",
            "repeat": r,
            "group": "one_by_one",
            "save": f"{workdir}/one_by_one.npz",
        }
    )
    cases.append(
        {
            "name": "one_by_one",
            "label": "same 10 members one by one, plain autograd, float32",
            "dtype": "float32",
            "repeat": r,
            "group": "one_by_one",
            "save": f"{workdir}/one_by_one32.npz",
        }
    )
    t = list(torchani_repeat) if not quick else r
    n_t = 4 * int(np.prod(t))
    if t != r:
        cases.append(
            {
                "name": "batched",
                "label": f"nft batched, 10 members, G5-moments, float64, block 2048, {n_t:,} atoms",
                "dtype": "float64",
                "block": 2048,
                "repeat": t,
                "group": "small",
            }
        )
    for dtype in ("float32", "float64"):
        cases.append(
            {
                "name": "torchani",
                "label": f"TorchANI AEV (pyaev, cell list) + one [5,5] net, {dtype}, {n_t:,} atoms",
                "dtype": dtype,
                "repeat": t,
                "group": "torchani",
            }
        )
    cases.append({"name": "emt", "label": "ASE EMT", "flavour": "ase", "repeat": r, "group": "emt"})
    cases.append({"name": "emt", "label": "asap3 EMT", "flavour": "asap3", "repeat": r, "group": "emt"})
    cases.append(
        {
            "name": "batched",
            "label": f"nft batched, 10 members, G4 (explicit triplets), float64, {n_t:,} atoms",
            "kind": "g4",
            "dtype": "float64",
            "block": 2048,
            "repeat": t,
            "group": "g4",
            "once": True,
        }
    )
    return cases


def force_checks(workdir: str, log) -> list[str]:
    """Max differences of forces/δ between the one-by-one peer and the batched pass (same dtype)."""
    lines = []
    path = Path(workdir)
    pairs = [("one_by_one.npz", "batched_float64_", "float64"), ("one_by_one32.npz", "batched_float32_", "float32")]
    for peer_name, prefix, dtype in pairs:
        batched_files = sorted(path.glob(prefix + "*.npz"))
        if not (path / peer_name).exists() or not batched_files:
            continue
        peer = np.load(path / peer_name)
        ref = np.load(batched_files[-1])
        df = np.abs(peer["forces"] - ref["forces"]).max()
        dd = np.abs(peer["deltas"] - ref["deltas"]).max()
        de = np.abs(peer["energies"] - ref["energies"]).max()
        scale = np.abs(ref["forces"]).max()
        lines.append(
            f"{dtype}: one-by-one autograd vs batched pass: max |ΔF| = {df:.2e} eV/Å "
            f"(max |F| {scale:.2f}), max |Δδ_i| = {dd:.2e} eV/Å, max |ΔE_member| = {de:.2e} eV"
        )
    f64 = sorted(path.glob("batched_float64_*.npz"))
    f32 = sorted(path.glob("batched_float32_*.npz"))
    if f64 and f32:
        a, b = np.load(f64[-1]), np.load(f32[-1])
        lines.append(
            f"float32 vs float64 batched: max |ΔF| = {np.abs(a['forces'] - b['forces']).max():.2e} eV/Å, "
            f"max |Δδ_i| = {np.abs(a['deltas'] - b['deltas']).max():.2e} eV/Å"
        )
    for line in lines:
        log(line)
    return lines


def report(cases, results, n_atoms) -> str:
    def rate(r):
        return r["n_atoms"] / r["seconds"]

    reference = None
    for case, runs in zip(cases, results):
        b = common.best(runs)
        if (
            case["name"] == "batched"
            and case.get("kind", "g5-moments") != "g4"
            and case["dtype"] == "float64"
            and case["group"] == "nft"
            and b
        ):
            if reference is None or rate(b) > rate(reference):
                reference = b
    headers = [
        "case",
        "atoms/s (wall)",
        "wall s",
        "CPU s",
        "atoms per CPU-s",
        "peak RSS MiB",
        "peak − setup MiB",
        "nft batched G5 f64 (same atoms) faster by (wall)",
    ]
    rows = []
    for case, runs in zip(cases, results):
        b = common.best(runs)
        if b is None:
            rows.append([case["label"], common.failure(runs), "", "", "", "", "", ""])
            continue
        same_size = [
            common.best(rs)
            for c, rs in zip(cases, results)
            if c["repeat"] == case["repeat"]
            and c["name"] == "batched"
            and c.get("kind", "g5-moments") != "g4"
            and c["dtype"] == "float64"
            and common.best(rs)
        ]
        ref = max(same_size, key=rate) if same_size else reference
        ratio = rate(ref) / rate(b) if ref else float("nan")
        rows.append(
            [
                case["label"],
                rate(b),
                b["seconds"],
                b["cpu_seconds"],
                b["n_atoms"] / b["cpu_seconds"],
                b["peak_rss_mib"],
                b["peak_rss_mib"] - b["setup_rss_mib"],
                f"{ratio:.2f}×",
            ]
        )
    return common.markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="864 atoms, one round")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 2, quick 1)")
    parser.add_argument(
        "--only", default=None, help="comma-separated groups: nft,one_by_one,small,torchani,emt,g4 (small: nft on the TorchANI/G4 size)"
    )
    parser.add_argument(
        "--torchani-repeat",
        default=",".join(map(str, TORCHANI_REPEAT)),
        help="repeat of the 4-atom cube for TorchANI (14,14,13 = the full crystal; needs ≈12 GiB float32)",
    )
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.case:
        case = json.loads(args.case)
        common.emit(CASES[case["name"]](case))
        return
    repeat = QUICK_REPEAT if args.quick else FULL_REPEAT
    repeats = args.repeats or (1 if args.quick else 2)
    n_atoms = 4 * int(np.prod(repeat))
    print(
        f"# Inference: ensemble of 10, energy + forces + δ_i, rattled fcc Pt {n_atoms} atoms (repeat {repeat},"
        f" rattle 0.05 Å), Rc 6.5 Å, 20 features, [5,5]"
    )
    print(common.machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        cases = build_cases(repeat, args.quick, workdir, tuple(int(x) for x in args.torchani_repeat.split(",")))
        if args.only:
            groups = set(args.only.split(","))
            cases = [c for c in cases if c["group"] in groups]
        start = time.perf_counter()
        results = common.interleaved(SCRIPT, cases, repeats, log=lambda s: print(s, flush=True))
        print(f"({time.perf_counter() - start:.0f} s in all, {repeats} round(s))\n")
        print(report(cases, results, n_atoms))
        print()
        force_checks(workdir, print)
    measured = [(c, b["n_atoms"] / b["seconds"]) for c, runs in zip(cases, results) if (b := common.best(runs))]
    nft = [(c, v) for c, v in measured if c["group"] == "nft"]
    if nft:
        best_case, best_rate = max(nft, key=lambda cv: cv[1])
        print(
            f"\ntarget ≥ {TARGET_ATOMS_PER_S:,} atoms/s: best nft batched {best_rate:,.0f} atoms/s "
            f"({best_case['dtype']}, block {best_case['block']}) → "
            f"{'MET' if best_rate >= TARGET_ATOMS_PER_S else 'NOT MET'}"
        )
        for dtype in ("float64", "float32"):
            peer = [v for c, v in measured if c["group"] == "one_by_one" and c["dtype"] == dtype]
            mine = [v for c, v in nft if c["dtype"] == dtype]
            if peer and mine:
                ratio = max(mine) / peer[0]
                print(
                    f"target batched ≥ {TARGET_VS_ONE_BY_ONE:.0f}× one-by-one ({dtype}): {ratio:.2f}× → "
                    f"{'MET' if ratio >= TARGET_VS_ONE_BY_ONE else 'NOT MET'}"
                )


if __name__ == "__main__":
    main()
