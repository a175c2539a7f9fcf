"""nft: Nearsighted Force Training of machine-learned interatomic potentials."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "nft"
"""The distribution's name in pyproject.toml, under which the installed package's metadata is found."""

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"


def load_model(path, dtype=None):
    """Load a model file as an ASE calculator (energy eV, forces eV/Å, results["uncertainties"] δ_i eV/Å).

    Predicts in the fast default precision (float32, `calculator.PREDICTION_DTYPE`) unless `dtype`
    (e.g. torch.float64) is given."""
    from pipeline.science.calculator import PREDICTION_DTYPE, EnsembleCalculator
    from pipeline.storage.model_file import load_ensemble

    chosen = dtype or PREDICTION_DTYPE
    return EnsembleCalculator(load_ensemble(path, dtype=chosen), dtype=chosen)
