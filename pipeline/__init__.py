"""nft: Nearsighted Force Training of machine-learned interatomic potentials."""
from __future__ import annotations

__version__ = "0.1.0"


def load_model(path, dtype=None):
    """Load a model file as an ASE calculator (energy eV, forces eV/Å, results["uncertainties"] δ_i eV/Å)."""
    import torch

    from pipeline.science.calculator import EnsembleCalculator
    from pipeline.storage.model_file import load_ensemble

    return EnsembleCalculator(load_ensemble(path, dtype=dtype or torch.float64))
