"""Names of the files a campaign writes in its workdir (kept apart from the loop, so that readers
of a campaign such as `nft status` and `nft report` need not import the Parsl-driven loop), and the
marker that gives each campaign a workdir of its own."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import BadInput
from pipeline.storage.atomic import write_text_atomically

MODEL_NAME = "model.nft"
SUMMARY_NAME = "summary.json"
REPORT_DIR_NAME = "report"
"""`nft report` writes WORKDIR/report/ unless told otherwise."""
RELAXATIONS_NAME = "relaxations.json"
"""The steps files (OUT-steps.json) of the campaign's `nft relax` runs, for `nft report`."""
LOCALITY_NAME = "locality.json"
"""The last `nft locality --config CONFIG.toml` report (what `--json` prints), for `nft report`."""
OWNER_NAME = ".nft-campaign"
"""The marker naming the campaign a workdir belongs to: one workdir per campaign name, or two
campaigns would overwrite each other's models/iteration-NNN.nft, model.nft and summary.json."""


def check_workdir_owner(workdir: Path, campaign: str) -> None:
    """BadInput (one line) when `workdir` belongs to another campaign (its `OWNER_NAME` names
    another); writes nothing, so it can run before anything else is written."""
    marker = workdir / OWNER_NAME
    try:
        owner = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"{marker}: cannot read the campaign that owns this workdir ({error})") from None
    if owner != campaign:
        raise BadInput(
            f"campaign.workdir: {workdir} belongs to campaign {owner!r} ({marker}); campaign {campaign!r} needs "
            "a workdir of its own (two campaigns in one workdir overwrite each other's models)"
        )


LEFT_BY_A_CAMPAIGN = ("models", SUMMARY_NAME, MODEL_NAME)
"""What a campaign leaves in its workdir: found with no marker, an older nft's campaign owns it."""


def claim_workdir(workdir: Path, campaign: str, *, new_campaign: bool) -> None:
    """Create `workdir` for `campaign` and mark it as the campaign's (`check_workdir_owner` first).
    An unmarked workdir that already holds a campaign's files (written before workdirs were marked)
    is adopted by a campaign resuming there, refused for a `new_campaign`."""
    check_workdir_owner(workdir, campaign)
    marker = workdir / OWNER_NAME
    left = [name for name in LEFT_BY_A_CAMPAIGN if (workdir / name).exists()]
    if new_campaign and left and not marker.is_file():
        raise BadInput(
            f"campaign.workdir: {workdir} already holds {left[0]} of another campaign; campaign {campaign!r} "
            "is new and needs a workdir of its own (two campaigns in one workdir overwrite each other's models)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_text_atomically(marker, campaign + "\n")
        check_workdir_owner(workdir, campaign)  # two first runs at once: the last rename won
