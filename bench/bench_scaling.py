"""Scaling benchmark: ensemble-10 energy + forces + δ_i on rattled fcc Pt of 10^3, 10^4, 10^5 atoms.

    .venv/bin/python bench/bench_scaling.py            # 1,008 / 10,192 / 100,920 atoms
    .venv/bin/python bench/bench_scaling.py --quick    # 1,008 / 4,000 atoms, one round

Each size runs in a fresh subprocess, so its peak RSS (`ru_maxrss`) is its own. Targets: the
log-log slope of time against atoms is 1.0 ± 0.1, and the peak RSS at 10^5 atoms is ≤ 2 GiB.
Sizes are interleaved round by round; the largest runs once unless --repeats-large is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
TARGET_SLOPE = (0.9, 1.1)
TARGET_PEAK_MIB = 2048.0


def case_predict(case: dict) -> dict:
    import torch

    dtype = {"float64": torch.float64, "float32": torch.float32}[case["dtype"]]
    atoms = common.pt_crystal(tuple(case["repeat"]))
    model = common.make_ensemble(dtype=dtype)
    model.predict(common.pt_crystal((2, 2, 2)), block_size=case["block"])  # warm-up
    setup = common.current_rss_mib()
    times, prediction = common.timed(lambda: model.predict(atoms, block_size=case["block"]))
    return {**times, "n_atoms": len(atoms), "setup_rss_mib": setup, "max_delta": float(prediction.max_delta)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="rounds for the smaller sizes (default 2)")
    parser.add_argument("--repeats-large", type=int, default=1, help="rounds for the largest size")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--block", type=int, default=2048, help="block size of centre atoms")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.case:
        common.emit(case_predict(json.loads(args.case)))
        return
    sizes = (1_000, 4_000) if args.quick else (1_000, 10_000, 100_000)
    repeats = args.repeats or (1 if args.quick else 2)
    print(f"# Scaling: ensemble of 10, energy + forces + δ_i, rattled fcc Pt, {args.dtype}, block {args.block}")
    print(common.machine_line(), flush=True)
    cases = [
        {"name": "predict", "label": f"{n:,} atoms", "repeat": list(common.repeat_for(n)), "dtype": args.dtype, "block": args.block}
        for n in sizes
    ]
    start = time.perf_counter()
    results = [[] for _ in cases]
    for round_ in range(max(repeats, args.repeats_large)):
        for k, case in enumerate(cases):
            wanted = args.repeats_large if k == len(cases) - 1 and not args.quick else repeats
            if round_ >= wanted:
                continue
            result = common.run_case(SCRIPT, case, timeout_s=3600)
            results[k].append(result)
            shown = (
                f"ERROR {result['error']}" if "error" in result else (f"{result['seconds']:.2f} s, peak {result['peak_rss_mib']:.0f} MiB")
            )
            print(f"  round {round_ + 1} {case['label']}: {shown}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s in all)\n")

    rows, xs, ys, ycpu = [], [], [], []
    for case, runs in zip(cases, results):
        b = common.best(runs)
        if b is None:
            rows.append([case["label"], common.failure(runs), "", "", "", "", ""])
            continue
        xs.append(b["n_atoms"])
        ys.append(b["seconds"])
        ycpu.append(min(r["cpu_seconds"] for r in runs if "cpu_seconds" in r))
        rows.append(
            [
                f"{b['n_atoms']:,}",
                b["seconds"],
                ycpu[-1],
                b["n_atoms"] / b["seconds"],
                b["peak_rss_mib"],
                b["peak_rss_mib"] - b["setup_rss_mib"],
                len(runs),
            ]
        )
    print(common.markdown_table(["atoms", "best wall s", "best CPU s", "atoms/s", "peak RSS MiB", "peak − setup MiB", "rounds"], rows))
    if len(xs) >= 2:
        slope = np.polyfit(np.log(xs), np.log(ys), 1)[0]
        slope_cpu = np.polyfit(np.log(xs), np.log(ycpu), 1)[0]
        ok = TARGET_SLOPE[0] <= slope <= TARGET_SLOPE[1]
        print(
            f"\nlog-log slope of time vs atoms: {slope:.3f} (wall), {slope_cpu:.3f} (CPU); target 1.0 ± 0.1 → {'MET' if ok else 'NOT MET'}"
        )
    if not args.quick:
        largest = common.best(results[-1])
        if largest:
            ok = largest["peak_rss_mib"] <= TARGET_PEAK_MIB
            print(
                f"peak RSS at {largest['n_atoms']:,} atoms: {largest['peak_rss_mib']:.0f} MiB; target ≤ 2 GiB → "
                f"{'MET' if ok else 'NOT MET'}"
            )


if __name__ == "__main__":
    main()
