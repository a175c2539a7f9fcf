"""nft: Nearsighted Force Training of machine-learned interatomic potentials."""

from __future__ import annotations

DISTRIBUTION = "nearsighted-force-training"
"""The distribution's name in pyproject.toml, under which the installed package's metadata is found."""


def __getattr__(name: str) -> str:
    """`pipeline.__version__`, read from the installed metadata when asked: importing
    importlib.metadata at package import would delay `nft`'s signal handlers by tens of ms (a Ctrl-C
    in that window ended it with a traceback instead of exit 130)."""
    if name != "__version__":
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def load_model(path, dtype=None):
    """Load a model file as an ASE calculator (energy eV, forces eV/Å, results["uncertainties"] δ_i eV/Å).

    Predicts in the fast default precision (float32, `calculator.PREDICTION_DTYPE`) unless `dtype`
    (e.g. torch.float64) is given."""
    from pipeline.science.calculator import PREDICTION_DTYPE, EnsembleCalculator
    from pipeline.storage.model_file import load_ensemble

    chosen = dtype or PREDICTION_DTYPE
    return EnsembleCalculator(load_ensemble(path, dtype=chosen), dtype=chosen)
