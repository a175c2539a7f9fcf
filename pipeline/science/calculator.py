"""The ensemble as an ASE calculator: energy (eV), forces (eV/Å) and per-atom δ_i (eV/Å)."""
from __future__ import annotations

from ase.calculators.calculator import Calculator, all_changes

from pipeline.science.model import EnsembleModel


class EnsembleCalculator(Calculator):
    """Ensemble-mean energy and forces; `results["uncertainties"]` holds δ_i of every atom."""

    implemented_properties = ["energy", "free_energy", "forces", "uncertainties", "energies_members"]

    def __init__(self, model: EnsembleModel, block_size: int = 2048, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.block_size = block_size

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        prediction = self.model.predict(self.atoms, block_size=self.block_size)
        self.results = {
            "energy": prediction.energy,
            "free_energy": prediction.energy,
            "forces": prediction.forces,
            "uncertainties": prediction.uncertainties,
            "energies_members": prediction.member_energies,
        }
