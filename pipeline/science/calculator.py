"""The ensemble as an ASE calculator: energy (eV), forces (eV/Å) and per-atom δ_i (eV/Å)."""

from __future__ import annotations

import copy

import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from pipeline.science.model import PREDICTION_BLOCK_SIZE, EnsembleModel
from pipeline.science.device import resolve_device

PREDICTION_DTYPE = torch.float32
"""Precision of a prediction: faster than float64, with δ as float64's within round-off (bench/RESULTS.md,
"Prediction defaults"); model files store float64, training stays float64."""


def prediction_model(model: EnsembleModel, dtype: torch.dtype | None = PREDICTION_DTYPE, device: str = "auto") -> EnsembleModel:
    """`model` in `dtype` (None: its own) on `device` ("auto", "cpu", "cuda"): `model` itself when it
    is so already, else a copy in eval mode, so the caller's model is left as it was."""
    target = resolve_device(device)
    dtype = dtype or model.dtype
    current = model.feature_mean.device
    if model.dtype == dtype and current.type == target.type:
        return model
    return copy.deepcopy(model).to(device=target, dtype=dtype).eval()


class EnsembleCalculator(Calculator):
    """Ensemble-mean energy and forces; `results["uncertainties"]` holds δ_i of every atom (eV/Å),
    `results["energy_uncertainties"]` the energy-based δE_i (eV).

    By default it predicts in `PREDICTION_DTYPE` with blocks of `PREDICTION_BLOCK_SIZE` atoms, on
    the GPU when torch sees one; `dtype=None` keeps the model's own precision.
    """

    implemented_properties = ["energy", "free_energy", "forces", "uncertainties", "energy_uncertainties", "energies_members"]

    def __init__(
        self,
        model: EnsembleModel,
        block_size: int = PREDICTION_BLOCK_SIZE,
        dtype: torch.dtype | None = PREDICTION_DTYPE,
        device: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model = prediction_model(model, dtype, device)
        self.block_size = block_size

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        prediction = self.model.predict(self.atoms, block_size=self.block_size)
        self.results = {
            "energy": prediction.energy,
            "free_energy": prediction.energy,
            "forces": prediction.forces,
            "uncertainties": prediction.uncertainties,
            "energy_uncertainties": prediction.energy_uncertainties,
            "energies_members": prediction.member_energies,
        }

    def calculate_properties(self, atoms, properties):
        """`atoms.get_properties(names)`: the results by name, for any of `implemented_properties`.
        ASE's own accepts only the properties ASE defines, so it refused δ_i ("uncertainties") and
        every other name of ours, and any request at all once `results` held one of them."""
        unknown = [name for name in properties if name not in self.implemented_properties]
        if unknown:
            raise PropertyNotImplementedError(
                f"{', '.join(unknown)}: not computed by {type(self).__name__} ({', '.join(self.implemented_properties)})"
            )
        self.calculate(atoms, properties, all_changes)
        return dict(self.results)
