"""Reliability of `nft run` on a user's machine: it runs however it is started, and nothing of a
campaign outlives its driver (the kill test is in test_resume.py)."""

import json
import os
import signal
import subprocess

import pytest

from tests.plugins.campaign_fixtures import NFT

pytestmark = pytest.mark.timeout(300)


def test_nft_by_absolute_path_runs_without_its_venv_on_path(small_campaign):
    """Parsl starts its interchange and workers by command name; the venv's bin may not be on PATH."""
    config = small_campaign({"active": {"max_iterations": 1}})
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    with subprocess.Popen(
        NFT + ["run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, stderr[-2000:]
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["stop_reason"] == "max_iterations"


def test_a_campaign_stopped_by_max_iterations_goes_on_when_the_limit_is_raised(small_campaign):
    """The docs promise it: raise active.max_iterations and run again."""
    from tests.plugins.campaign_fixtures import run_nft, write_campaign

    config = small_campaign({"active": {"threshold": 0.05, "max_iterations": 1}})
    first = run_nft("run", config)
    assert first.returncode == 0, first.stderr
    config.write_text(config.read_text().replace("max_iterations = 1", "max_iterations = 2"))
    second = run_nft("run", config)
    assert second.returncode == 0, second.stderr
    assert "nothing to run" not in second.stdout
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["stop_reason"] == "max_iterations"
    assert summary["history"][0]["chunks_added"] > 0, "iteration 1 must carve once the campaign goes on"
    straight = write_campaign(config.parent.parent / "straight", {"active": {"threshold": 0.05, "max_iterations": 2}})
    assert run_nft("run", straight).returncode == 0
    expected = json.loads((straight.parent / "run" / "summary.json").read_text())
    assert [(e["chunks_added"], round(e["uncertainty"], 9)) for e in summary["history"]] == [
        (e["chunks_added"], round(e["uncertainty"], 9)) for e in expected["history"]
    ], "stopping and going on must give the history of a campaign that never stopped"


def test_a_parent_job_dies_with_the_worker_that_started_it(tmp_path):
    """A GPAW job runs in a process group of its own; when its worker is SIGKILLed (its driver
    died), the job's launcher and ranks must not go on computing."""
    import sys
    import textwrap
    import time

    marker = tmp_path / "job.pid"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        from pathlib import Path
        from pipeline.execution.process_group import run_process_group
        run_process_group(["bash", "-c", "echo $$ > {marker}; exec sleep 120"], Path("{tmp_path}"), {{"PATH": "/usr/bin:/bin"}}, None)
    """),
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        job = int(marker.read_text())
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{job}") and "Z" not in open(f"/proc/{job}/stat").read().split()[2]:
            time.sleep(0.2)
        alive = os.path.exists(f"/proc/{job}") and "Z" not in open(f"/proc/{job}/stat").read().split()[2]
        assert not alive, "the job outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
        try:
            os.killpg(job, signal.SIGKILL)
        except (ProcessLookupError, NameError, UnboundLocalError):
            pass
