"""`python -m pipeline.cli`: the `nft` command."""

from pipeline.cli import main

main()
