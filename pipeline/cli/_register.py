"""Imports every command module so that each attaches its subcommands to `app`."""

import importlib
import pkgutil

import pipeline.cli as _cli

for _module in pkgutil.iter_modules(_cli.__path__):
    if _module.name.startswith("cmd_"):
        importlib.import_module(f"pipeline.cli.{_module.name}")
