#!/usr/bin/env bash
# Install what is missing (scripts/setup.sh), then run the main job: the Pt260 campaign with the
# EMT parent (it prints its evaluation at the end).
#   bash scripts/run-main.sh [nft run options, e.g. --site local]
set -euo pipefail

NFT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$NFT_ROOT"

bash scripts/setup.sh
# shellcheck source=env.sh
. scripts/env.sh

exec nft run examples/pt260-emt/config.toml "$@"
