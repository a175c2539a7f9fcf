"""What makes a campaign the one stored under its name: its targets, its parent's physics and its
initial set. A config that changes any of these under a name the database already holds would
attach new work to the old campaign (a new target evaluated with the old model, results of two
physics mixed), so it is refused; what only steers the loop (threshold, max_iterations, patience,
chunks per iteration, training settings, the site) may change when a campaign is resumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ase import Atoms

from pipeline.campaign.config import CampaignConfig
from pipeline.errors import BadInput
from pipeline.storage.engine import NoDatabaseYet
from pipeline.storage.hashing import atoms_geometry_hash
from pipeline.storage.store import CampaignStore, UnknownCampaign


def check_stored_campaign(config: CampaignConfig) -> bool:
    """Before anything is written: when the database already holds the campaign, refuse a config
    that defines another one (`check_same_campaign`); returns whether it holds it (reads only)."""
    try:
        store = CampaignStore.open(config.database_url, config.name, create=False, files_root=config.workdir)
    except (UnknownCampaign, NoDatabaseYet):  # a new campaign; an unreachable or foreign database is BadInput now
        return False
    with store:
        check_same_campaign(store, config)
    return True


def check_same_campaign(store: CampaignStore, config: CampaignConfig) -> None:
    """BadInput (one line naming the field) when the campaign `store` was opened for computes
    something else than `config` asks: other targets, another parent or its physics, another
    initial set. Structures registered by a run killed during set-up may be fewer than the
    config's, never others."""
    label = f"{config.path.name}: campaign {config.name!r} in {store.name}"
    started = bool(store.iterations())
    _check_structures(label, "data.targets", store, "target", config.targets, started)
    _check_parent(label, store, config)
    if config.initial_generate is not None:
        stored = ((store.campaign_config(config.name) or {}).get("data") or {}).get("initial_generate")
        ours = config.as_dict()["data"]["initial_generate"]
        if stored is not None and stored != ours:
            raise BadInput(
                f"{label}: data.initial_generate.{_first_difference(stored, ours)} differs from the campaign's "
                "(the initial set defines the campaign: use another campaign.name)"
            )
    if config.initial:
        _check_structures(label, "data.initial", store, "initial", config.initial, started)


def _check_structures(label: str, field: str, store: CampaignStore, kind: str, atoms: Sequence[Atoms], started: bool) -> None:
    """BadInput when the campaign's structures of `kind` are not those of `atoms` (by geometry);
    before its first iteration a subset is fine (a set-up cut short)."""
    stored = {record.geometry_hash for record in store.structures(kind)}
    ours = {atoms_geometry_hash(item) for item in atoms}
    if not stored or stored == ours or (not started and stored <= ours):
        return
    extra, missing = len(ours - stored), len(stored - ours)
    raise BadInput(
        f"{label}: {field} differs from the campaign's ({extra} structure(s) it does not have, {missing} of its own "
        f"missing): the {field.split('.')[-1]} define the campaign; use another campaign.name"
    )


def _check_parent(label: str, store: CampaignStore, config: CampaignConfig) -> None:
    """BadInput when the campaign's reference jobs were computed by another parent or other physics."""
    calculator, physics = config.parent.name, config.parent.physics()
    for job in store.jobs():
        if job.calculator != calculator:
            raise BadInput(
                f"{label}: parent.calculator is {calculator!r}, the campaign's is {job.calculator!r} "
                "(the parent defines the campaign: use another campaign.name)"
            )
        if job.params != physics:
            raise BadInput(
                f"{label}: parent.{calculator}.{_first_difference(job.params, physics)} differs from the "
                "campaign's (the parent's physics defines the campaign: use another campaign.name)"
            )


def _first_difference(stored: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    """The dotted key of the first value that differs between two plain-JSON tables."""
    for key in sorted(set(stored) | set(ours)):
        mine, theirs = ours.get(key), stored.get(key)
        if mine != theirs:
            if isinstance(mine, Mapping) and isinstance(theirs, Mapping):
                return f"{key}.{_first_difference(theirs, mine)}"
            return str(key)
    return "?"
