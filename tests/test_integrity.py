"""A campaign's data stays its own and whole (issue 25, items 6, 7, 8 and 17): carving is atomic and a
resumed run repairs an older nft's orphans; one workdir per campaign; model files are checked
against their recorded sha256 and against corruption; a reused campaign name with another target
or initial set is refused; nothing nft writes is group- or world-writable; a copied campaign reads
its own model files. Real `nft` subprocesses on tiny EMT campaigns, real SQLite files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest
from ase.io import read, write

from pipeline.campaign.config import load_config
from pipeline.science.chunks import carve_chunk
from pipeline.science.model import EnsembleModel
from pipeline.storage.model_file import ModelFileError, load_ensemble, save_model
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import (
    NFT,
    REPO_ROOT,
    orphaned_chunks,
    rattled_cluster,
    run_nft,
    toml_text,
    merged,
    SMALL_CAMPAIGN,
    write_campaign,
)
from tests.test_resume import WORKERS_END_WITHIN_S, campaign_processes, kill_workers_of

pytestmark = pytest.mark.timeout(600)

THREE_ITERATIONS = {"active": {"threshold": 0.05, "max_iterations": 3}}
ONE_ITERATION = {"active": {"threshold": 0.05, "max_iterations": 1}}


def history(summary):
    return [(entry["iteration"], entry["uncertainty"], entry["chunks_added"]) for entry in summary["history"]]


def assert_same_history(got, want):
    assert [entry[2] for entry in history(got)] == [entry[2] for entry in history(want)]
    for mine, theirs in zip(history(got), history(want)):
        assert mine[1] == pytest.approx(theirs[1], rel=1e-6), (mine, theirs)
    assert got["chunks"] == want["chunks"] and got["stop_reason"] == want["stop_reason"]


def database_dump(path: Path) -> list[str]:
    """Every row of an SQLite file as SQL (what "nothing written" compares; the file's bytes also
    change when SQLite folds its write-ahead log in)."""
    with sqlite3.connect(path) as raw:
        return list(raw.iterdump())


def end_processes_of(workdir: Path) -> None:
    """Wait for the campaign's Parsl processes to end (bounded), then kill what is left."""
    deadline = time.monotonic() + WORKERS_END_WITHIN_S
    while campaign_processes(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_workers_of(workdir)


# ---------------------------------------------------------------------------------------------
# Item 6: carving is atomic, and a resumed run repairs what an older nft left.

KILL_AT_CHUNK_JOB_VARIABLE = "NFT_TEST_KILL_AT_CHUNK_JOB"
_KILL_WHILE_CARVING = f'''
"""Test-only fault injection: SIGKILL the driver's process group when it adds its Nth reference job
of a chunk (${KILL_AT_CHUNK_JOB_VARIABLE}): a kill in the middle of carving an iteration's chunks."""
import os

if os.environ.get("{KILL_AT_CHUNK_JOB_VARIABLE}"):
    import signal

    from pipeline.storage import store as _store

    _original_add_job = _store.CampaignStore.add_job
    _chunk_jobs = [0]

    def _add_job_then_die(self, structure_id, calculator, params=None):
        if self.structure(structure_id).kind == "chunk":
            _chunk_jobs[0] += 1
            if _chunk_jobs[0] == int(os.environ["{KILL_AT_CHUNK_JOB_VARIABLE}"]):
                os.killpg(os.getpgid(0), signal.SIGKILL)
        return _original_add_job(self, structure_id, calculator, params)

    _store.CampaignStore.add_job = _add_job_then_die
'''


def kill_while_carving_env(tmp_path: Path, at_chunk_job: int) -> dict[str, str]:
    hook = tmp_path / "kill-while-carving-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_KILL_WHILE_CARVING)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), str(REPO_ROOT), env.get("PYTHONPATH")]))
    env[KILL_AT_CHUNK_JOB_VARIABLE] = str(at_chunk_job)
    return env


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The summary of an uninterrupted three-iteration campaign (8 chunks in each of the first two)."""
    config = write_campaign(tmp_path_factory.mktemp("uninterrupted") / "campaign", THREE_ITERATIONS)
    result = run_nft("run", config, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads((config.parent / "run" / "summary.json").read_text())


def add_older_orphans(campaign) -> None:
    """What an older nft killed while carving left (each write was its own transaction then): a chunk
    of a recorded iteration whose job never joined the campaign, and two chunks carved after the
    last recorded iteration, one with its job, one without."""
    target = rattled_cluster()
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        [target_id] = [record.id for record in store.structures("target")]
        first = store.structures("chunk")[0]
        taken = {record.center_in_parent for record in store.structures("chunk")}
        free = [atom for atom in range(len(target)) if atom not in taken][:2]
        for k, centre in enumerate(free):
            chunk = carve_chunk(target, centre, campaign.file.chunks.radius, campaign.file.chunks.vacuum)
            chunk_id = store.add_structure(
                "chunk",
                chunk.atoms,
                parent_id=target_id,
                center_in_parent=centre,
                center_in_chunk=chunk.center_in_chunk,
                radius=chunk.radius,
                vacuum=chunk.vacuum,
            )
            if k == 0:
                store.add_job(chunk_id, campaign.parent.name, campaign.parent.physics())
        [job] = [job for job in store.jobs(kind="chunk") if job.structure_id == first.id]
    with sqlite3.connect(campaign.database_url.removeprefix("sqlite:///")) as raw:
        raw.execute("DELETE FROM campaign_jobs WHERE job_id = ?", (job.id,))


def test_a_kill_while_carving_leaves_no_orphan_and_the_resumed_run_repeats_the_history(uninterrupted, tmp_path):
    config = write_campaign(tmp_path / "killed", THREE_ITERATIONS)
    campaign = load_config(config)
    try:
        killed = run_nft("run", config, env=kill_while_carving_env(tmp_path, at_chunk_job=8 + 3), timeout=300)
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        end_processes_of(campaign.workdir)
        assert orphaned_chunks(campaign.database_url, campaign.name) == (0, 0)  # none of iteration 2's chunks, or all

        add_older_orphans(campaign)
        assert orphaned_chunks(campaign.database_url, campaign.name) == (2, 2)
        resumed = run_nft("run", config, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "2 chunk(s) carved by an interrupted selection" in resumed.stdout
        assert "1 chunk(s) without a reference job" in resumed.stdout
    finally:
        end_processes_of(campaign.workdir)
    summary = json.loads((campaign.workdir / "summary.json").read_text())
    assert orphaned_chunks(campaign.database_url, campaign.name) == (0, 0)
    assert_same_history(summary, uninterrupted)


# ---------------------------------------------------------------------------------------------
# Items 7 and 17: one workdir per campaign, model files checked, nothing group/world-writable,
# model paths that travel with a copied campaign.


def _umask_000() -> None:
    os.umask(0)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-iteration campaign (config path), run under umask 000 (as a careless login shell has it)."""
    config = write_campaign(tmp_path_factory.mktemp("finished") / "campaign", ONE_ITERATION)
    process = subprocess.run(
        NFT + ["run", str(config)], capture_output=True, text=True, timeout=300, preexec_fn=_umask_000, start_new_session=True
    )
    assert process.returncode == 0, process.stderr
    end_processes_of(config.parent / "run")
    return config


def copy_of(config: Path, destination: Path) -> Path:
    shutil.copytree(config.parent, destination)
    return destination / config.name


def test_nothing_nft_writes_is_group_or_world_writable_whatever_the_umask(finished):
    workdir = finished.parent / "run"
    written = [workdir, *workdir.rglob("*")]
    assert any(path.name.endswith(".sh") for path in written)  # Parsl's submit scripts, run with bash
    assert (workdir / "model.nft").is_file()
    loose = [str(path) for path in written if not path.is_symlink() and path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)]
    assert loose == []


def test_a_second_campaign_in_the_same_workdir_is_refused_before_anything_is_written(finished, tmp_path):
    config = copy_of(finished, tmp_path / "copy")
    workdir = config.parent / "run"
    before = {path: path.stat().st_mtime_ns for path in workdir.rglob("*")}
    other = config.parent / "other.toml"
    other.write_text(toml_text(merged(SMALL_CAMPAIGN, {**ONE_ITERATION, "campaign": {"name": "other"}})))
    result = run_nft("run", other, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and str(workdir) in line and "'pt55-test'" in line and "campaign.workdir" in line
    assert {path: path.stat().st_mtime_ns for path in workdir.rglob("*")} == before
    with CampaignStore(f"sqlite:///{workdir / 'nft.db'}", create=False) as store:
        assert store.campaigns() == ["pt55-test"]


def test_a_model_file_another_campaign_overwrote_is_refused_by_report_relax_and_run(finished, tmp_path):
    config = copy_of(finished, tmp_path / "copy")
    models = config.parent / "run" / "models"
    stranger = load_ensemble(models / "iteration-001.nft")
    save_model(stranger, models / "iteration-001.nft", extra={"campaign": "someone else's"})  # valid, other bytes
    for command in (["report", config], ["relax", config, config.parent / "target.traj", "-o", tmp_path / "out.traj"], ["run", config]):
        result = run_nft(*command, timeout=120)
        assert result.returncode == 2, (command, result.stdout + result.stderr)
        line = result.stderr.strip()
        assert "\n" not in line and "iteration-001.nft" in line and "not the model campaign 'pt55-test' recorded" in line
    assert not (config.parent / "run" / "report").exists() and not (tmp_path / "out.traj").exists()


def test_a_copied_campaign_reads_its_own_model_files(finished, tmp_path):
    copy = copy_of(finished, tmp_path / "copy")
    with sqlite3.connect(copy.parent / "run" / "nft.db") as raw:
        assert [row[0] for row in raw.execute("SELECT path FROM models")] == ["models/iteration-001.nft"]
    own = copy.parent / "run" / "models" / "iteration-001.nft"
    own.unlink()  # the copy's own file gone: it must say so, not quietly read the original's
    result = run_nft("report", copy, "-o", tmp_path / "report", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"model file {own} is missing" in report
    assert (finished.parent / "run" / "models" / "iteration-001.nft").is_file()  # while the original's is there


def test_a_model_file_with_one_flipped_byte_is_refused_naming_the_file(finished, tmp_path):
    model = tmp_path / "flipped.nft"
    shutil.copyfile(finished.parent / "run" / "model.nft", model)
    load_ensemble(model)  # intact: loads
    data = bytearray(model.read_bytes())
    position = len(data) - 100  # inside the last tensor's float64 values
    data[position] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt nft model file") as refused:
        load_ensemble(model)
    assert str(model) in str(refused.value) and "\n" not in str(refused.value)
    result = run_nft("evaluate", model, finished.parent / "target.traj", "--parent", "emt", timeout=120)
    assert result.returncode == 2 and "corrupt nft model file" in result.stderr and str(model) in result.stderr


def test_a_crafted_one_member_ensemble_is_refused_on_load_not_by_a_crash_later(finished, tmp_path):
    kept = load_ensemble(finished.parent / "run" / "model.nft")
    single = EnsembleModel(kept.params, hidden=tuple(kept.networks.hidden), member_seeds=kept.member_seeds[:1])
    model = save_model(single, tmp_path / "one-member.nft")
    with pytest.raises(ModelFileError, match="ensemble of 2") as refused:
        load_ensemble(model)
    assert str(model) in str(refused.value)
    result = run_nft("evaluate", model, finished.parent / "target.traj", "--parent", "emt", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "ensemble of 2" in result.stderr and str(model) in result.stderr


# ---------------------------------------------------------------------------------------------
# Item 8: a campaign name already in the database with another target or initial set is refused.


def test_a_reused_campaign_name_with_another_target_is_refused_and_nothing_is_written(finished, tmp_path):
    original = copy_of(finished, tmp_path / "shared")
    database = original.parent / "run" / "nft.db"
    other = tmp_path / "other"
    other.mkdir()
    write(other / "target.traj", rattled_cluster(seed=11))  # another target, same campaign name, same database
    shutil.copyfile(original.parent / "initial.traj", other / "initial.traj")
    changes = {**ONE_ITERATION, "campaign": {"name": "pt55-test", "workdir": "run", "database": f"sqlite:///{database}"}}
    (other / "config.toml").write_text(toml_text(merged(SMALL_CAMPAIGN, changes)))
    before = database_dump(database)
    result = run_nft("run", other / "config.toml", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "data.targets" in line and "'pt55-test'" in line
    assert not (other / "run").exists() and database_dump(database) == before

    write(other / "target.traj", rattled_cluster())  # the campaign's own target, another initial set
    write(other / "initial.traj", read(original.parent / "initial.traj", ":")[:3])
    result = run_nft("run", other / "config.toml", timeout=120)
    assert result.returncode == 2 and "data.initial" in result.stderr and not (other / "run").exists()


def test_what_steers_the_loop_may_change_on_resume(finished, tmp_path):
    """A raised max_iterations and another threshold or chunk count are the same campaign: it goes on."""
    config = copy_of(finished, tmp_path / "resumed")
    changes = {"active": {"threshold": 0.04, "max_iterations": 2}, "chunks": {"max_per_iteration": 4}}
    config.write_text(toml_text(merged(SMALL_CAMPAIGN, changes)))
    result = run_nft("run", config, timeout=300)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        summary = json.loads((config.parent / "run" / "summary.json").read_text())
        assert summary["iterations"] == 2
    finally:
        end_processes_of(config.parent / "run")


def test_a_reused_campaign_name_with_other_parent_physics_is_refused_naming_the_field(finished, tmp_path):
    config = copy_of(finished, tmp_path / "physics")
    database = config.parent / "run" / "nft.db"
    with sqlite3.connect(database) as raw:  # the campaign as if computed with other EMT physics (a test-only edit)
        raw.execute("""UPDATE reference_jobs SET params = '{"cutoff_scale": 1.1}'""")
    before = database_dump(database)
    result = run_nft("run", config, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "parent.emt.cutoff_scale" in line and "'pt55-test'" in line
    assert database_dump(database) == before
