"""Names of the files a campaign writes in its workdir (kept apart from the loop, so that readers
of a campaign such as `nft status` and `nft report` need not import the Parsl-driven loop)."""

MODEL_NAME = "model.nft"
SUMMARY_NAME = "summary.json"
REPORT_DIR_NAME = "report"
"""`nft report` writes WORKDIR/report/ unless told otherwise."""
RELAXATIONS_NAME = "relaxations.json"
"""The steps files (OUT-steps.json) of the campaign's `nft relax` runs, for `nft report`."""
LOCALITY_NAME = "locality.json"
"""The last `nft locality --config CONFIG.toml` report (what `--json` prints), for `nft report`."""
