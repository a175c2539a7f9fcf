"""Shared pytest set-up: fixtures live in tests/plugins/, one module per area."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = [
    module
    for module in (
        "tests.plugins.slurm_cluster",
        "tests.plugins.campaign_fixtures",
        "tests.plugins.postgresql_server",
        "tests.plugins.fault_injecting",
    )
    if os.path.exists(os.path.join(os.path.dirname(__file__), "plugins", module.split(".")[-1] + ".py"))
]
