"""Where the time of the batched ensemble goes: cProfile by function and torch profiler by operator.

    .venv/bin/python bench/profile_inference.py [--repeat 14,14,13] [--block 2048] [--dtype float64]
    .venv/bin/python bench/profile_inference.py --training     # one batched training epoch instead

Prints (1) the pipeline functions by cumulative time (cProfile), (2) torch operators by self CPU
time, and (3) the same grouped by input shape, which names the tensors that cost the most.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", default="14,14,13")
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--kind", default="g5-moments")
    parser.add_argument("--training", action="store_true", help="profile one batched training epoch")
    parser.add_argument("--rows", type=int, default=15)
    common.add_common_arguments(parser)
    args = parser.parse_args()
    common.set_threads(args.threads)
    import torch
    from torch.profiler import ProfilerActivity, profile

    print(common.machine_line())
    if args.training:
        from bench_training import training_set

        from pipeline.science.model import EnsembleModel
        from pipeline.science.settings import TrainingSettings
        from pipeline.science.losses import member_losses
        from pipeline.science.training import fit_scaling
        from pipeline.science.training_data import prepare_training_data

        structures, _ = training_set(20, 200)
        model = EnsembleModel(common.make_params(args.kind), hidden=(5, 5), member_seeds=list(range(10)))
        data = prepare_training_data(structures, model.descriptor)
        fit_scaling(model, data, structures)
        if hasattr(data, "scaled_by"):  # as train_ensemble does
            data = data.scaled_by(model)
        weights = torch.ones(10, len(structures), dtype=torch.float64)
        settings = TrainingSettings()
        optimizer = torch.optim.Adam(model.networks.parameters(), lr=1e-2)

        def work():
            optimizer.zero_grad()
            member_losses(model, data, weights, settings).sum().backward()
            optimizer.step()

        work()
        what = "one batched training epoch (20 bulk cells + 200 chunks)"
    else:
        atoms = common.pt_crystal(tuple(int(x) for x in args.repeat.split(",")))
        model = common.make_ensemble(args.kind, dtype={"float64": torch.float64, "float32": torch.float32}[args.dtype])
        model.predict(common.pt_crystal((2, 2, 2)), block_size=args.block)

        def work():
            return model.predict(atoms, block_size=args.block)

        what = f"predict, {len(atoms)} atoms, {args.dtype}, block {args.block}, {args.kind}"
    print(f"# profile: {what}\n")
    times, _ = common.timed(work)
    print(f"unprofiled: {times['seconds']:.3f} s wall, {times['cpu_seconds']:.3f} s CPU\n")

    profiler = cProfile.Profile()
    profiler.enable()
    work()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(r"pipeline|einsum", args.rows)
    print("## cProfile, pipeline functions by cumulative time")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-4000:])

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        work()
        wall = time.perf_counter() - start
    print(f"\n## torch profiler ({wall:.3f} s wall with profiling): operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print("## … grouped by input shape")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
