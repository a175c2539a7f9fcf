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
    with subprocess.Popen(NFT + ["run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    assert process.returncode == 0, stderr[-2000:]
    summary = json.loads((config.parent / "run" / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["stop_reason"] == "max_iterations"
