"""What every descriptor kind shares: the parameters, the kind names and the `Descriptor` interface.

Both kinds (`descriptors.MomentDescriptor`, `g4.G4Descriptor`) import this module and neither imports
the other; `model.make_descriptor` picks one by `SymmetryFunctionParams.kind`. Torch-free at import
time (settings read the kind names here without loading torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, get_args

import numpy as np

if TYPE_CHECKING:
    import torch
    from ase import Atoms

    from pipeline.science.structures import LabelledStructure

DescriptorKind = Literal["g5-moments", "g4"]
"""G5 angular terms through per-atom moments (default), or the paper's explicit-triplet G4."""
DESCRIPTOR_KINDS: tuple[str, ...] = get_args(DescriptorKind)

TrainingTerms = tuple[np.ndarray, "torch.Tensor", np.ndarray, "torch.Tensor"]
"""(rows, pair sums (R, n_el, C), trained force atoms, ∂S/∂R (F, 3, R, n_el·C)) of one structure."""
PairSumEnergies = Callable[["torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor"]]
"""Atomic energies (M, B) eV and ∂E^m/∂S (M, B, n_el, C) from pair sums (B, n_el, C) and centre elements (B,)."""

DEFAULT_CUTOFF_ANGSTROM = 6.5
"""The descriptor's cutoff Rc (Å), the `[model] cutoff` default (`TrainingSettings` takes it from here)."""
DEFAULT_RADIAL_CENTERS = (0.0, 2.4, 3.0, 3.6, 4.2, 4.8, 5.4, 6.0)
DEFAULT_RADIAL_ETAS = (0.1, 1.4, 1.4, 1.4, 1.4, 1.4, 1.4, 1.4)
DEFAULT_ANGULAR_ETAS = (0.005, 0.03, 0.1)


@dataclass(frozen=True)
class SymmetryFunctionParams:
    """Descriptor parameters: cutoff Å, radial (Rs Å, η Å⁻²) pairs, angular η Å⁻², ζ, λ.

    Defaults give 20 features per element for one-element systems: 8 radial + 3 η × 2 ζ × 2 λ.
    """

    elements: tuple[int, ...]
    cutoff: float = DEFAULT_CUTOFF_ANGSTROM
    radial_centers: tuple[float, ...] = DEFAULT_RADIAL_CENTERS
    radial_etas: tuple[float, ...] = DEFAULT_RADIAL_ETAS
    angular_etas: tuple[float, ...] = DEFAULT_ANGULAR_ETAS
    angular_zetas: tuple[int, ...] = (1, 2)
    angular_lambdas: tuple[int, ...] = (1, -1)
    kind: DescriptorKind = "g5-moments"

    def __post_init__(self) -> None:
        if self.cutoff <= 0:
            raise ValueError(f"cutoff must be > 0 Å, got {self.cutoff}")
        if len(self.radial_centers) != len(self.radial_etas):
            raise ValueError("radial_centers and radial_etas must have the same length")
        if any(int(z) != z or z < 1 for z in self.angular_zetas):
            raise ValueError("angular_zetas must be positive integers")
        if any(lam not in (1, -1) for lam in self.angular_lambdas):
            raise ValueError("angular_lambdas must be +1 or −1")
        if self.kind not in DESCRIPTOR_KINDS:
            raise ValueError(f"descriptor kind must be {' or '.join(map(repr, DESCRIPTOR_KINDS))}, got {self.kind!r}")

    @property
    def n_elements(self) -> int:
        return len(self.elements)

    @property
    def n_features(self) -> int:
        n = self.n_elements
        radial = len(self.radial_centers) * n
        angular = len(self.angular_etas) * len(self.angular_zetas) * len(self.angular_lambdas)
        return radial + angular * n * (n + 1) // 2

    def element_lookup(self) -> np.ndarray:
        """Array mapping atomic number → element index (0 for numbers not in `elements`)."""
        lookup = np.zeros(max(self.elements) + 1, dtype=np.int64)
        lookup[list(self.elements)] = np.arange(self.n_elements)
        return lookup

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SymmetryFunctionParams":
        tuples: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**tuples)


class Descriptor(Protocol):
    """A descriptor kind as the model and the trainer see it (a `torch.nn.Module` whose constants are
    buffers registered once, so they follow the model's device and dtype).

    Per-atom 'pair sums' S (…, n_el, C) are the descriptor's linear stage; `features` maps them to
    the network inputs. Callers never ask which kind they hold.
    """

    params: SymmetryFunctionParams

    @property
    def pair_sum_shape(self) -> tuple[int, int]:
        """Per-atom pair sums: (neighbour elements, channels)."""
        ...

    def features(self, pair_sums: torch.Tensor) -> torch.Tensor:
        """Features (…, F) from pair sums (…, n_el, C); differentiable."""
        ...

    def training_terms(self, item: LabelledStructure, dtype: torch.dtype) -> TrainingTerms:
        """Rows one structure needs, their pair sums, the trained force atoms and a dense ∂S/∂R."""
        ...

    def atomic_energies_and_forces(
        self,
        atoms: Atoms,
        element_index: torch.Tensor,
        energies_and_gradients: PairSumEnergies,
        n_members: int,
        block_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (M, N) eV and forces (M, N, 3) eV/Å of every member, in blocks of centre atoms."""
        ...
