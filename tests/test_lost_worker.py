"""A lost worker pool (a node gone) does not end the run: its training or prediction job is
submitted again, runs on the fresh block Parsl starts in its place, and the campaign goes on.

Fault injected on purpose: the test SIGKILLs the worker pool of a real `nft run` while it trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.campaign.config import load_config
from tests.plugins.campaign_fixtures import NFT
from tests.test_resume import campaign_processes, kill_workers_of

pytestmark = pytest.mark.timeout(240)


def a_worker_runs_a_task(workdir: Path) -> bool:
    """Whether a Parsl worker of the campaign has received a task it has not completed (its log says so)."""
    for log in (workdir / "runinfo").glob("*/*/block-*/*/worker_*.log"):
        text = log.read_text(errors="replace")
        if text.count("Received executor task") > text.count("Completed executor task"):
            return True
    return False


def test_a_worker_pool_lost_during_training_is_replaced_and_the_run_goes_on(small_campaign):
    config = small_campaign({"active": {"max_iterations": 1}})
    workdir = load_config(config).workdir
    process = subprocess.Popen(
        NFT + ["run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "training" in line:
                break
        deadline = time.monotonic() + 120
        while not a_worker_runs_a_task(workdir):
            assert process.poll() is None and time.monotonic() < deadline, "no worker took the training job"
            time.sleep(0.1)
        pool = campaign_processes(workdir)
        assert pool, "no worker pool running: nothing to lose\n" + "".join(lines)
        for pid in pool:  # the pool and its workers at once, as when their node is lost
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        kill_workers_of(workdir)
    stdout = "".join(lines) + stdout
    assert process.returncode == 0, stdout + stderr
    assert "training job lost its worker" in stdout and "submitting it again (retry 1 of" in stdout, stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["stop_reason"] == "max_iterations"
    assert (workdir / "models" / "iteration-001.nft").is_file()
