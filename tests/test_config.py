"""The campaign config loader: defaults, path resolution, and one-line errors naming file and field."""

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.io import write
from ase.neighborlist import neighbor_list

from pipeline.campaign.config import load_config
from pipeline.errors import BadInput
from tests.plugins.campaign_fixtures import SMALL_CAMPAIGN, merged, toml_text

pytestmark = pytest.mark.timeout(60)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pt260-emt" / "config.toml"


def test_the_example_config_loads_with_spec_defaults():
    config = load_config(EXAMPLE)
    assert config.name == "pt260-emt"
    assert config.workdir == EXAMPLE.parent / "runs" / "pt260-emt"
    assert config.database_url == f"sqlite:///{config.workdir / 'nft.db'}"
    assert len(config.targets) == 1 and len(config.targets[0]) == 260
    assert len(config.initial) == 20
    assert config.parent.name == "emt" and config.threshold == 0.1
    assert config.file.chunks.radius == 8.0 and config.file.chunks.vacuum == 6.0
    assert config.file.model.cutoff == 6.5 and config.file.model.hidden == (5, 5) and config.file.model.ensemble == 10


def test_defaults_fill_everything_but_name_and_data(small_campaign, tmp_path):
    config_path = small_campaign()
    config_path.write_text('[campaign]\nname = "minimal"\n[data]\ntargets = "target.traj"\ninitial = ["initial.traj"]\n')
    config = load_config(config_path)
    assert config.workdir == config_path.parent / "runs" / "minimal"
    assert config.file.model.ensemble == 10 and config.file.model.hidden == (5, 5)
    assert config.file.active.max_iterations == 20 and config.file.active.patience is None
    assert config.threshold == 0.1  # EMT parent
    # 1.1 × the median nearest-neighbour distance of the initial cells (ASE's own neighbour list here)
    nearest = []
    for atoms in config.initial:
        first, distance = neighbor_list("id", atoms, 5.0)
        nearest.extend(
            np.minimum.reduceat(distance[np.argsort(first, kind="stable")], np.searchsorted(np.sort(first), np.arange(len(atoms))))
        )
    assert 2.4 < np.median(nearest) < 2.8  # rattled Pt: 3.92/√2 = 2.77 Å unrattled
    assert config.min_separation == pytest.approx(1.1 * np.median(nearest), abs=0.01)
    assert config.file.chunks.radius == 8.0 and config.file.chunks.max_per_iteration == 20
    assert config.file.chunks.training_environment == "target"
    settings = config.file.model
    assert config.elements == (78,) and settings.cutoff == 6.5
    assert (settings.optimizer, settings.epochs, settings.lm_steps) == ("levenberg-marquardt", 0, 30)
    assert settings.with_changes(optimizer="lbfgs").lbfgs_steps == 1000
    assert settings.descriptor.derives_radial_shells and settings.warm_start is True
    assert not config.workdir.exists()  # loading writes nothing


def test_descriptor_keys_reach_the_training_settings(small_campaign):
    config_path = small_campaign()
    config_path.write_text(
        '[campaign]\nname = "d"\n[data]\ntargets = "target.traj"\ninitial = "initial.traj"\n'
        '[model.descriptor]\nradial_centers = [0, 2.5, 3.5]\nradial_etas = [0.1, 3, 3]\nangular_zetas = [1]\n'
    )
    keys = load_config(config_path).file.model.descriptor.explicit()
    assert keys == {"kind": "g5-moments", "radial_centers": (0.0, 2.5, 3.5), "radial_etas": (0.1, 3.0, 3.0), "angular_zetas": (1,)}
    from pipeline.science.descriptors import SymmetryFunctionParams

    assert SymmetryFunctionParams(elements=(78,), **keys).n_features == 3 + 3 * 1 * 2


def test_absolute_database_paths_and_other_urls_are_kept(small_campaign, tmp_path):
    database = tmp_path / "elsewhere" / "shared.db"
    config = load_config(small_campaign({"campaign": {"database": f"sqlite:///{database}"}}))
    assert config.database_url == f"sqlite:///{database}"


def test_a_gpaw_parent_gets_complete_options_and_the_dft_threshold(small_campaign):
    config = load_config(
        small_campaign({"parent": {"calculator": "gpaw", "gpaw": {"ecut": 350.0, "ranks": 2}}, "active": {"threshold": None}})
    )
    assert config.parent.name == "gpaw" and config.parent.ecut == 350.0 and config.parent.xc == "PBE"
    assert config.parent.ranks == 2 and "ranks" not in config.parent.physics()  # execution options do not identify a job
    assert config.threshold == 0.3


def _bad(tmp_path, small_campaign, change):
    config_path = small_campaign()
    sections = merged(SMALL_CAMPAIGN, None)
    text = change(config_path, sections)
    config_path.write_text(text if isinstance(text, str) else toml_text(sections))
    return config_path


BAD_CONFIGS = {
    "malformed TOML": (lambda path, s: "[campaign\nname = 'x'\n", "malformed TOML"),
    "unknown key": (lambda path, s: s["chunks"].update(radious=8.0), "chunks.radious: unknown key"),
    "unknown section": (lambda path, s: s.update(extra={"a": 1}), "extra: unknown key"),
    "wrong type": (lambda path, s: s["chunks"].update(radius="8"), "chunks.radius: must be a number"),
    "wrong list item type": (lambda path, s: s["model"].update(hidden=[5, "5"]), "model.hidden.1: must be an integer"),
    "missing section": (lambda path, s: s.pop("data"), "data: required"),
    "missing structure file": (lambda path, s: s["data"].update(targets=["nowhere.traj"]), "data.targets[0]: no such file"),
    "unreadable structure": (
        lambda path, s: ((path.parent / "garbage.traj").write_bytes(b"not a trajectory"), s["data"].update(initial="garbage.traj")),
        "data.initial[0]",
    ),
    "negative radius": (lambda path, s: s["chunks"].update(radius=-1.0), "chunks.radius: must be > 0"),
    "zero threshold": (lambda path, s: s["active"].update(threshold=0.0), "active.threshold: must be > 0"),
    "negative threshold": (lambda path, s: s["active"].update(threshold=-0.1), "active.threshold: must be > 0"),
    "unknown calculator": (lambda path, s: s["parent"].update(calculator="vasp"), "parent.calculator: unknown calculator"),
    "bad parent option": (lambda path, s: s["parent"].update(calculator="gpaw", gpaw={"ecut": -5.0}), "parent.gpaw.ecut"),
    "options for another parent": (
        lambda path, s: s["parent"].update(calculator="emt", gpaw={"ecut": 400.0}),
        "parent.gpaw: options for gpaw, but parent.calculator is 'emt'",
    ),
    "parent options not a table": (lambda path, s: s["parent"].update(calculator="gpaw", gpaw=5), "parent.gpaw: must be a table (got 5)"),
    "element the initial set lacks": (
        lambda path, s: (write(path.parent / "copper.traj", bulk("Cu", cubic=True)), s["data"].update(targets=["copper.traj"])),
        "data.targets: target structure 0 has element(s) Cu",
    ),
    "workdir not writable": (lambda path, s: s["campaign"].update(workdir="target.traj/run"), "campaign.workdir"),
    "ensemble of one": (lambda path, s: s["model"].update(ensemble=1), "model.ensemble: must be >= 2"),
    "select_fraction above one": (lambda path, s: s["active"].update(select_fraction=1.5), "active.select_fraction"),
    "unknown selection uncertainty": (lambda path, s: s["active"].update(selection_uncertainty="spin"), "active.selection_uncertainty"),
    "unknown selection rule": (lambda path, s: s["active"].update(selection_rule="random"), "active.selection_rule"),
    "descriptor centres without etas": (
        lambda path, s: s["model"].update(descriptor={"radial_centers": [0.0, 3.0], "radial_etas": [1.0]}),
        "model.descriptor: radial_centers and radial_etas must have the same length",
    ),
    "unknown descriptor key": (lambda path, s: s["model"].update(descriptor={"zeta": [1]}), "model.descriptor.zeta: unknown key"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_naming_file_and_field(case, small_campaign, tmp_path):
    change, expected = BAD_CONFIGS[case]
    config_path = _bad(tmp_path, small_campaign, change)
    with pytest.raises(BadInput) as raised:
        load_config(config_path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{config_path}: ")
    assert expected in message
    assert not (config_path.parent / "run").exists()


def test_a_read_only_workdir_is_refused(small_campaign, tmp_path):
    config_path = small_campaign({"campaign": {"workdir": "/proc/nft-campaign"}})
    with pytest.raises(BadInput, match=r"campaign\.workdir: .* not writable"):
        load_config(config_path)


def test_a_missing_config_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_lbfgs_steps_without_an_optimizer_keeps_a_config_written_for_lbfgs():
    """Before Levenberg–Marquardt became the default, `lbfgs_steps` alone meant L-BFGS; it still does,
    with L-BFGS's Adam epochs; an explicit optimizer wins, and a dumped settings object round-trips."""
    from pipeline.science.settings import TrainingSettings

    written_for_lbfgs = TrainingSettings.model_validate({"lbfgs_steps": 200})
    assert (written_for_lbfgs.optimizer, written_for_lbfgs.epochs, written_for_lbfgs.second_order_steps) == ("lbfgs", 300, 200)
    explicit = TrainingSettings.model_validate({"lbfgs_steps": 200, "optimizer": "levenberg-marquardt"})
    assert (explicit.optimizer, explicit.epochs, explicit.second_order_steps) == ("levenberg-marquardt", 0, 30)
    for settings in (written_for_lbfgs, explicit, TrainingSettings()):
        assert TrainingSettings.model_validate(settings.model_dump(mode="json")) == settings
