"""Two campaigns run at the same time against one database — a SQLite file, and a real PostgreSQL
server — as two `nft run` processes: each trains on its own chunks only (its δ history is the one
it has alone), `nft status` counts each its own, a reference geometry both need is computed once
(the EMT call log of campaign_fixtures counts every calculation) and reused by the other, and a
second driver on a running campaign refuses in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from pipeline.campaign.config import load_config
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import (
    EMT_DELAY_VARIABLE,
    NFT,
    logged_emt_calls,
    merged,
    positions_digest,
    rattled_cluster,
    run_nft,
    write_campaign,
)

pytestmark = pytest.mark.timeout(900)

# Both campaigns share the target and the (unlabelled) initial set, so the initial jobs and any chunk
# both select are the same geometry and physics; their model seeds differ, so their δ and chunks do.
TWO_ITERATIONS = {"active": {"threshold": 0.01, "max_iterations": 2}, "chunks": {"max_per_iteration": 6}}
SEEDS = {"a": 1, "b": 2}


def campaign(directory: Path, name: str, database: str) -> Path:
    """Campaign `name` in directory/name (its own workdir) on database URL `database`."""
    changes = merged(TWO_ITERATIONS, {"campaign": {"name": name, "database": database}, "model": {"seed": SEEDS[name]}})
    return write_campaign(directory / name, changes, labelled_initial=False)


def history(config: Path) -> list[tuple[int, float, int, float]]:
    """Per iteration: number, δ (eV/Å), chunks added, training force MAE (eV/Å)."""
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    return [(e["iteration"], e["uncertainty"], e["chunks_added"], e["train_force_mae"]) for e in summary["history"]]


def status(config: Path, env: dict[str, str]) -> dict:
    result = run_nft("status", "--json", config, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict[str, tuple[list, dict]]:
    """Each campaign run alone in a database of its own: its δ history and its summary."""
    directory = tmp_path_factory.mktemp("alone")
    runs = {}
    for name in SEEDS:
        config = campaign(directory, name, "sqlite:///nft.db")
        result = run_nft("run", config, timeout=400)
        assert result.returncode == 0, result.stderr
        runs[name] = (history(config), json.loads((config.parent / "run" / "summary.json").read_text()))
    return runs


def lease_owner(url: str, name: str) -> str | None:
    try:
        with CampaignStore(url, create=False) as store, store.engine.connect() as connection:
            return connection.execute(text("SELECT lease_owner FROM campaigns WHERE name = :n"), {"n": name}).scalar()
    except Exception:  # not created yet
        return None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_campaigns_at_once_on_one_database(backend, tmp_path, request, emt_call_log, alone):
    url = f"sqlite:///{tmp_path / 'shared.db'}" if backend == "sqlite" else request.getfixturevalue("postgresql_url")
    env, call_log = emt_call_log
    env[EMT_DELAY_VARIABLE] = "0.2"  # chunks take a moment: the drivers overlap for sure
    configs = {name: campaign(tmp_path, name, url) for name in SEEDS}
    logs = {name: (tmp_path / f"{name}.out").open("w") for name in SEEDS}
    processes = {
        name: subprocess.Popen(
            NFT + ["run", str(config)], env=env, stdout=logs[name], stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        for name, config in configs.items()
    }
    started = time.monotonic()
    try:
        while lease_owner(url, "a") is None:
            assert processes["a"].poll() is None, (tmp_path / "a.out").read_text()
            assert time.monotonic() - started < 120, "campaign a never took its lease"
            time.sleep(0.2)
        second = run_nft("run", configs["a"], env=env, timeout=120)
        assert processes["a"].poll() is None, "the first driver should still run (raise the EMT delay if not)"
        for process in processes.values():
            process.wait(timeout=600)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs.values():
            log.close()
    for name, process in processes.items():
        assert process.returncode == 0, (tmp_path / f"{name}.out").read_text()

    # A second driver on a running campaign: exit 2, one line naming the driver that holds it.
    assert second.returncode == 2, second.stdout + second.stderr
    line = second.stderr.strip()
    assert "\n" not in line and "is being run by" in line and f":{processes['a'].pid} since " in line, line

    # Each trained on its own chunks only: the δ history it has alone.
    for name, config in configs.items():
        expected = alone[name][0]
        got = history(config)
        assert [entry[2] for entry in got] == [entry[2] for entry in expected]
        for (number, delta, _, mae), (_, delta_alone, _, mae_alone) in zip(got, expected):
            assert delta == pytest.approx(delta_alone, rel=1e-9), (name, number)
            assert mae == pytest.approx(mae_alone, rel=1e-9), (name, number)

    # Status counts each its own: the counts it has alone, and how many of its results it reused.
    reports = {name: status(config, env) for name, config in configs.items()}
    for name, report in reports.items():
        summary = alone[name][1]
        assert (report["chunks"], report["reference_atoms"], report["jobs"]) == (
            summary["chunks"],
            summary["reference_atoms"],
            summary["jobs"],
        ), name

    # Every reference geometry computed once, the other campaign reusing it (targets aside: the
    # final force MAE of each campaign computes its target with EMT in the driver).
    target = positions_digest(load_config(configs["a"]).targets[0])
    assert target == positions_digest(rattled_cluster())
    calls = Counter(digest for _, _, digest in logged_emt_calls(call_log) if digest != target)
    assert max(calls.values()) == 1, [digest for digest, count in calls.items() if count > 1]
    needed = sum(report["jobs"]["done"] for report in reports.values())
    reused = sum(report["reused_jobs"] for report in reports.values())
    assert reused == needed - len(calls) and reused >= 6, (needed, len(calls), reused)  # at least the initial set
