"""Benchmark: the Pt260 EMT campaign end to end, with its wall time split.

    python bench/bench_campaign.py [--config examples/pt260-emt/config.toml] [--workdir DIR]

Copies the example's config and structures into a fresh folder (so the run starts from nothing),
runs `nft run` there as a subprocess, and prints a markdown table: wall time (measured outside the
process) and its split as recorded per iteration in summary.json — training, prediction, reference
jobs, overhead (selection, carving, database writes, Parsl start-up and clean-up, process start) —
then iterations, chunks, the final δ and the force MAE against EMT.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "pt260-emt" / "config.toml"


def copy_campaign(config: Path, destination: Path) -> Path:
    """The config and every structure file beside it, copied; the workdir stays relative (fresh)."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in config.parent.iterdir():
        if path.is_file() and path.suffix in {".toml", ".traj", ".xyz", ".extxyz", ".json"}:
            shutil.copy2(path, destination / path.name)
    return destination / config.name


def run(config: Path) -> tuple[float, dict, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "nft"), "run", str(config)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"nft run failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    workdir = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json,sys; from pipeline.campaign.config import load_config; print(json.dumps(str(load_config(sys.argv[1]).workdir)))",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
    )
    return wall, json.loads((Path(workdir) / "summary.json").read_text()), result.stdout


def table(wall: float, summary: dict) -> str:
    split = summary["wall_time"]
    recorded = split["training"] + split["prediction"] + split["reference"]
    overhead = wall - recorded
    mae = summary.get("force_mae_vs_parent", {})
    rows = [
        ("wall time (s)", f"{wall:.1f}"),
        ("  training (s)", f"{split['training']:.1f} ({100 * split['training'] / wall:.0f} %)"),
        ("  prediction (s)", f"{split['prediction']:.1f} ({100 * split['prediction'] / wall:.0f} %)"),
        ("  reference jobs (s)", f"{split['reference']:.1f} ({100 * split['reference'] / wall:.0f} %)"),
        ("  overhead (s)", f"{overhead:.1f} ({100 * overhead / wall:.0f} %)"),
        ("iterations", str(summary["iterations"])),
        ("converged", str(summary["converged"]).lower() + ("" if summary["converged"] else f" ({summary['stop_reason']})")),
        ("chunks", str(summary["chunks"])),
        ("reference atoms", str(summary["reference_atoms"])),
        ("final δ (eV/Å)", f"{summary['final_uncertainty']:.4f} (threshold {summary['threshold']:g})"),
        ("force MAE vs EMT (eV/Å)", ", ".join(f"{value:.4f}" for value in mae.values()) or "-"),
        ("δ history (eV/Å)", " → ".join(f"{entry['uncertainty']:.3f}" for entry in summary["history"])),
    ]
    lines = ["| Pt260 EMT campaign | |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=EXAMPLE)
    parser.add_argument("--workdir", type=Path, default=None, help="where to copy the campaign (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nft-bench-campaign-") as scratch:
        folder = args.workdir or Path(scratch)
        config = copy_campaign(args.config.resolve(), folder)
        wall, summary, _ = run(config)
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(table(wall, summary))


if __name__ == "__main__":
    main()
