#!/usr/bin/env bash
# Install what is missing (scripts/setup.sh), then run the whole test suite, slow tests included.
# Tests that need Slurm start and stop the single-node cluster themselves (tests/plugins).
#   bash scripts/run-tests.sh [pytest options]
set -uo pipefail

NFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$NFT_ROOT"

bash scripts/setup.sh || { echo "run-tests.sh: set-up failed" >&2; exit 1; }
# shellcheck source=env.sh
. scripts/env.sh

# Lint first (pyproject.toml [tool.ruff]): an unused or undefined name fails CI in seconds.
ruff check --quiet . || { echo "run-tests.sh: ruff check failed" >&2; exit 1; }
ruff format --check --quiet . || { echo "run-tests.sh: ruff format --check failed (run: ruff format .)" >&2; exit 1; }
# Type check (pyproject.toml [tool.mypy]: pipeline/, lenient): a wrong type fails CI before the tests run.
mypy || { echo "run-tests.sh: mypy failed" >&2; exit 1; }
# The docs site (mkdocs.yml, strict: a broken link or a warning fails), its CLI and config references
# generated from the code; built into a temporary folder, nothing left in the checkout.
DOCS_SITE="$(mktemp -d)"
mkdocs build --strict -d "$DOCS_SITE" || { rm -rf "$DOCS_SITE"; echo "run-tests.sh: mkdocs build --strict failed" >&2; exit 1; }
rm -rf "$DOCS_SITE"

python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "run-tests.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
