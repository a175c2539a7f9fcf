"""The energy-based uncertainty δE_i (docs/campaign.md, "Force- or energy-based uncertainty") in a
real small campaign (local Parsl, SQLite, EMT): `active.selection_uncertainty = "energy"` orders the
chunk centres by δE_i among the atoms whose δ_i is above the threshold, `nft status` reports max δE_i
per iteration, and summary.json names the best and the last model. Every number is recomputed here
from the iteration's saved model through the ASE calculator."""

import json

import numpy as np
import pytest
from ase.io import read

from pipeline import load_model
from pipeline.campaign.config import load_config
from pipeline.campaign.status import campaign_status
from pipeline.storage.store import CampaignStore
from tests.plugins.campaign_fixtures import SMALL_CAMPAIGN, run_nft, write_campaign

pytestmark = pytest.mark.timeout(240)

ENERGY_SELECTION = {"active": {"max_iterations": 2, "selection_uncertainty": "energy"}}


@pytest.fixture(scope="module")
def energy_campaign(tmp_path_factory):
    config = write_campaign(tmp_path_factory.mktemp("energy") / "campaign", ENERGY_SELECTION)
    result = run_nft("run", config)
    assert result.returncode == 0, result.stderr
    return config, json.loads((config.parent / "run" / "summary.json").read_text())


def _greedy_by(ranking, delta, positions, threshold, limit, separation):
    """Brute-force selection: atoms with δ_i above the threshold, highest `ranking` first, each
    blocking those within `separation` Å (non-periodic)."""
    picked = []
    for index in np.argsort(-ranking, kind="stable"):
        if delta[index] <= threshold:
            continue
        if all(np.linalg.norm(positions[index] - positions[other]) >= separation for other in picked):
            picked.append(int(index))
    return picked[:limit]


def test_energy_selection_picks_by_the_energy_spread_and_status_reports_it(energy_campaign):
    config, summary = energy_campaign
    campaign = load_config(config)
    target = read(config.parent / "target.traj")
    with CampaignStore.open(campaign.database_url, campaign.name, create=False) as store:
        history = store.iterations()
        models = {record.iteration: record.path for record in store.models()}
        chunks = store.structures("chunk")
    atoms = target.copy()
    atoms.calc = load_model(models[1])
    atoms.get_forces()
    delta, energy_spread = atoms.calc.results["uncertainties"], atoms.calc.results["energy_uncertainties"]
    expected = _greedy_by(
        energy_spread, delta, target.positions, campaign.threshold, SMALL_CAMPAIGN["chunks"]["max_per_iteration"], campaign.min_separation
    )
    by_force = _greedy_by(
        delta, delta, target.positions, campaign.threshold, SMALL_CAMPAIGN["chunks"]["max_per_iteration"], campaign.min_separation
    )
    assert expected != by_force, "the two orders must pick differently for this test to mean anything"
    assert [chunk.center_in_parent for chunk in chunks[: history[0].chunks_added]] == expected

    status = campaign_status(campaign)
    assert status["history"][0]["energy_uncertainty"] == pytest.approx(energy_spread.max(), rel=1e-5)
    assert summary["best_model"] == models[summary["best_iteration"]]
    assert (summary["last_iteration"], summary["last_model"]) == (history[-1].iteration, models[history[-1].iteration])
    assert "δE (eV)" in run_nft("status", config).stdout
