"""`nft run` / `nft status` / `nft export` on bad input: exit 2, one line naming the file and field,
and nothing written (no workdir, no database)."""

import pytest
from ase.build import bulk
from ase.io import write

from tests.plugins.campaign_fixtures import SMALL_CAMPAIGN, merged, run_nft, toml_text

pytestmark = pytest.mark.timeout(120)


def _write(config, sections):
    config.write_text(toml_text(sections))


def _garbage_initial(config, sections):
    (config.parent / "garbage.traj").write_bytes(b"\x00\x01 not a trajectory")
    sections["data"]["initial"] = "garbage.traj"


def _copper_target(config, sections):
    write(config.parent / "copper.traj", bulk("Cu", cubic=True))
    sections["data"]["targets"] = ["copper.traj"]


BAD_INPUT = {
    "malformed TOML": (lambda c, s: c.write_text("[campaign\nname = 1\n") or True, "malformed TOML"),
    "unknown key": (lambda c, s: s["model"].update(epoks=10), "model.epoks: unknown key"),
    "wrong type": (lambda c, s: s["active"].update(max_iterations="ten"), "active.max_iterations: must be an integer"),
    "missing structure file": (lambda c, s: s["data"].update(targets=["absent.traj"]), "data.targets[0]: no such file"),
    "unreadable structure": (_garbage_initial, "data.initial[0]"),
    "negative radius": (lambda c, s: s["chunks"].update(radius=-8.0), "chunks.radius: must be > 0"),
    "threshold zero": (lambda c, s: s["active"].update(threshold=0.0), "active.threshold: must be > 0"),
    "unknown calculator": (lambda c, s: s["parent"].update(calculator="lammps"), "parent.calculator"),
    "element the initial set lacks": (_copper_target, "data.targets: target structure 0 has element(s) Cu"),
    "workdir not writable": (lambda c, s: s["campaign"].update(workdir="/proc/nft-run"), "campaign.workdir"),
    "workdir below a file": (lambda c, s: s["campaign"].update(workdir="target.traj/run"), "campaign.workdir"),
    "unknown site option": (lambda c, s: s["site"]["options"].update(cores=3), "site option 'cores'"),
    "unknown gpaw option": (lambda c, s: s["parent"].update(calculator="gpaw", gpaw={"encut": 400}), "parent.gpaw.encut"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_nft_run_on_bad_input_exits_2_with_one_line_and_writes_nothing(case, small_campaign):
    config = small_campaign()
    sections = merged(SMALL_CAMPAIGN, None)
    change, expected = BAD_INPUT[case]
    if not change(config, sections):
        _write(config, sections)
    files_before = sorted(path.name for path in config.parent.iterdir())
    result = run_nft("run", config, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert str(config) in lines[0] or "--site" in lines[0] or "site option" in lines[0]
    assert sorted(path.name for path in config.parent.iterdir()) == files_before
    assert not (config.parent / "run").exists() and not (config.parent / "runs").exists()


def test_an_unknown_site_is_bad_input(small_campaign):
    config = small_campaign()
    result = run_nft("run", config, "--site", "nowhere", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "--site" in result.stderr and not (config.parent / "run").exists()


def test_status_of_a_campaign_never_run_is_bad_input_and_creates_nothing(small_campaign):
    config = small_campaign()
    for args in (["status", config], ["status", config, "--json"], ["export", config, "-o", config.parent / "out.xyz"]):
        result = run_nft(*args, timeout=60)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "campaign.database" in result.stderr
    assert not (config.parent / "run").exists() and not (config.parent / "out.xyz").exists()


def test_every_campaign_command_has_help():
    for command in ("run", "status", "export", "report"):
        result = run_nft(command, "--help", timeout=60)
        assert result.returncode == 0 and "CONFIG" in result.stdout
