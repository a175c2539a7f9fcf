"""The local site end to end: a workdir path with spaces, quotes and non-ASCII characters, the
encrypted channel between driver, interchange and workers, and a block that cannot start."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import bulk

from pipeline.execution.apps import make_apps
from pipeline.execution.parents import EmtParent
from pipeline.execution.parsl_session import SAFE_ALIAS_PREFIX, parsl_session
from pipeline.execution.sites import load_site
from pipeline.science.structures import atoms_to_payload
from tests.plugins.campaign_fixtures import run_nft, write_campaign

pytestmark = pytest.mark.timeout(240)


def test_a_campaign_in_a_path_with_spaces_quotes_and_unicode_runs_to_its_end(tmp_path):
    campaign = tmp_path / "it's a sp dir ü 空"
    config = write_campaign(campaign, {"active": {"max_iterations": 1}})
    elsewhere, temporary = tmp_path / "cwd", tmp_path / "tmp"
    elsewhere.mkdir()
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    command = [str(Path(sys.executable).parent / "nft"), "run", str(config)]
    with subprocess.Popen(
        command, cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            raise
    assert process.returncode == 0, stdout + stderr
    summary = json.loads((campaign / "run" / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["stop_reason"] == "max_iterations"
    assert list((campaign / "run" / "runinfo").glob("*/parsl.log")), "Parsl's logs belong in the workdir"
    assert not list(elsewhere.iterdir()), "stray files in the current directory"
    assert not list(temporary.glob(f"{SAFE_ALIAS_PREFIX}*")), "the run directory's alias was left behind"


def test_the_local_site_encrypts_its_channels_and_runs_jobs(tmp_path):
    run_dir = tmp_path / "runinfo"
    config = load_site("local", run_dir, {"workers": 1})
    assert all(executor.encrypted for executor in config.executors)
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True)
    with parsl_session(config):
        result = make_apps(config).reference_app(EmtParent(), atoms_to_payload(atoms)).result(timeout=120)
    assert len(result["forces"]) == len(atoms)
    certificates = next(run_dir.glob("*/local/certificates"))
    assert stat.S_IMODE(certificates.stat().st_mode) == 0o700
    assert {"server.key", "server.key_secret", "client.key", "client.key_secret"} <= {path.name for path in certificates.iterdir()}


def test_a_block_that_cannot_start_fails_the_run_in_one_line(small_campaign):
    """Fault injected on purpose: every block's worker_init exits 3. A few fresh blocks are tried
    (a lost block is replaced), then the run fails instead of launching blocks forever."""
    config = small_campaign({"site": {"options": {"workers": 1, "worker_init": "exit 3"}}})
    result = run_nft("run", config, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("failed: training job failed:") and "EXIT CODE: 3" in lines[0], result.stderr
