"""Training data: the rows a fit needs, with their features and force Jacobians, computed once.

Pair sums S and their Jacobians ∂S/∂R do not depend on the weights, so they are computed once
per structure; every epoch then costs one pass through the small networks plus one sparse
product F^m = −(∂S/∂R)ᵀ ∂E^m/∂S. A chunk keeps only the rows its central atom's force needs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.science.model import EnsembleModel
from pipeline.science.structures import LabelledStructure


@dataclass
class TrainingData:
    """Concatenated (unscaled) features of the rows that matter, energy segments, force Jacobians.

    Features G(S) and ∂G/∂R = ∂G/∂S·∂S/∂R do not depend on the weights, so an epoch is only the
    networks on (M, R, F) plus one sparse product with M columns.
    """

    features: torch.Tensor  # (R, F)
    element_index: torch.Tensor  # (R,)
    energy_rows: torch.Tensor  # rows that belong to energy-labelled structures
    energy_segment: torch.Tensor  # structure slot of each energy row
    energies: torch.Tensor  # (S_E,) eV
    energy_atoms: torch.Tensor  # (S_E,) atoms per energy-labelled structure
    energy_structure: torch.Tensor  # (S_E,) index of the structure in the input list
    force_jacobian: torch.Tensor  # sparse CSR (3·F, R·n_features): ∂G/∂R for trained force rows
    force_jacobian_t: torch.Tensor  # its transpose, CSR, for the backward pass
    forces: torch.Tensor  # (F, 3) eV/Å reference
    force_structure: torch.Tensor  # (F,) index of the structure in the input list

    scaled: bool = False  # features (G − mean)/std and Jacobians ∂G_scaled/∂R, fixed for training

    def to(self, device: str | torch.device) -> "TrainingData":
        """The same data on another device (CUDA training)."""
        fields = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in vars(self).items()}
        return TrainingData(**fields)

    def scaled_by(self, model: EnsembleModel) -> "TrainingData":
        """Features and Jacobians in the model's scaled feature space, computed once for all epochs."""
        mean = model.feature_mean[self.element_index]
        std = model.feature_std[self.element_index]
        column_factor = (1.0 / std).reshape(-1)  # one per (row, feature) column of the Jacobian
        jac, jac_t = self.force_jacobian, self.force_jacobian_t
        scaled_values = jac.values() * column_factor[jac.col_indices()]
        rows_t = torch.repeat_interleave(torch.arange(jac_t.shape[0]), jac_t.crow_indices().diff())
        scaled_values_t = jac_t.values() * column_factor[rows_t]
        fields = dict(vars(self))
        fields.update(
            features=(self.features - mean) / std,
            force_jacobian=_csr_like(jac, scaled_values),
            force_jacobian_t=_csr_like(jac_t, scaled_values_t),
            scaled=True,
        )
        return TrainingData(**fields)


def prepare_training_data(structures: Sequence[LabelledStructure], descriptor, dtype: torch.dtype = torch.float64) -> TrainingData:
    """Pair sums and force Jacobians of every structure, computed once and concatenated."""
    params = descriptor.params
    width = params.n_features
    feature_jacobian = torch.func.vmap(torch.func.jacrev(descriptor.features))
    sums, elements, jac_idx, jac_val, forces, force_struct = [], [], [], [], [], []
    energy_rows, energy_segment, energies, energy_atoms, energy_struct = [], [], [], [], []
    row_offset = force_offset = 0
    for s, item in enumerate(structures):
        rows, pair_sums, force_atoms, pair_sum_jacobian = descriptor.training_terms(item, dtype)
        sums.append(descriptor.features(pair_sums))
        d_features = feature_jacobian(pair_sums).flatten(2)  # (rows, F, n_el·C)
        jacobian = torch.einsum("fxrc,rgc->fxrg", pair_sum_jacobian, d_features)
        elements.append(params.element_lookup()[item.atoms.numbers[rows]])
        if item.energy is not None:
            energy_rows.append(np.arange(row_offset, row_offset + len(rows)))
            energy_segment.append(np.full(len(rows), len(energies)))
            energies.append(float(item.energy))
            energy_atoms.append(len(item.atoms))
            energy_struct.append(s)
        if len(force_atoms):
            dense = jacobian.reshape(len(force_atoms) * 3, len(rows) * width)
            nz = dense.nonzero(as_tuple=True)
            jac_idx.append(torch.stack([nz[0] + 3 * force_offset, nz[1] + row_offset * width]))
            jac_val.append(dense[nz])
            forces.append(item.forces[force_atoms])
            force_struct.append(np.full(len(force_atoms), s))
        row_offset += len(rows)
        force_offset += len(force_atoms)
    indices = torch.cat(jac_idx, dim=1) if jac_idx else torch.zeros(2, 0, dtype=torch.int64)
    values = torch.cat(jac_val) if jac_val else torch.zeros(0, dtype=dtype)
    shape = (3 * force_offset, row_offset * width)
    jacobian = torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()
    jacobian_t = torch.sparse_coo_tensor(indices.flip(0), values, shape[::-1], check_invariants=False).coalesce()

    def cat(chunks, dtype_=torch.int64, empty_shape=(0,)):
        return torch.from_numpy(np.concatenate(chunks)).to(dtype_) if chunks else torch.zeros(empty_shape, dtype=dtype_)

    return TrainingData(
        features=torch.cat(sums) if sums else torch.zeros(0, width, dtype=dtype),
        element_index=cat(elements),
        energy_rows=cat(energy_rows),
        energy_segment=cat(energy_segment),
        energies=torch.tensor(energies, dtype=dtype),
        energy_atoms=torch.tensor(energy_atoms, dtype=dtype),
        energy_structure=torch.tensor(energy_struct, dtype=torch.int64),
        force_jacobian=_csr(jacobian),
        force_jacobian_t=_csr(jacobian_t),
        forces=torch.from_numpy(np.concatenate(forces)).to(dtype) if forces else torch.zeros(0, 3, dtype=dtype),
        force_structure=cat(force_struct),
    )


def _csr(matrix: torch.Tensor) -> torch.Tensor:
    """COO → CSR, without torch's 'beta' warning for CSR tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return matrix.to_sparse_csr()


def _csr_like(matrix: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CSR matrix with the sparsity of `matrix` and new values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(matrix.crow_indices(), matrix.col_indices(), values, matrix.shape)


def residuals_per_element(data: TrainingData, n_elements: int) -> list[int]:
    """For each element (model order), how many residuals its network's weights enter: the energies
    of structures holding it and the force components whose rows include one of its atoms. Fewer
    residuals than the network has weights leave that network's fit underdetermined."""
    counts = []
    width = data.features.shape[1]
    components = torch.repeat_interleave(torch.arange(data.force_jacobian.shape[0]), data.force_jacobian.crow_indices().diff())
    column_element = data.element_index[data.force_jacobian.col_indices() // width]
    row_element = data.element_index[data.energy_rows]
    for element in range(n_elements):
        energies = torch.unique(data.energy_segment[row_element == element]).numel()
        forces = torch.unique(components[column_element == element]).numel()
        counts.append(int(energies + forces))
    return counts


def elements_of(structures: Sequence[LabelledStructure]) -> tuple[int, ...]:
    """Sorted atomic numbers present in a data set."""
    return tuple(sorted({int(z) for item in structures for z in item.atoms.numbers}))


def predict_labels(model: EnsembleModel, data: TrainingData, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Member energies (M, S_E) eV and trained force rows (M, F, 3) eV/Å for prepared data."""
    atomic, grads = model.energies_and_feature_gradients(data.features, data.element_index, create_graph, scaled=data.scaled)
    n_members = atomic.shape[0]
    energies = atomic.new_zeros(n_members, len(data.energies))
    energies = energies.index_add(1, data.energy_segment, atomic[:, data.energy_rows])
    flat_grads = grads.reshape(n_members, -1).T  # (R·width, M)
    forces = -SparseProduct.apply(data.force_jacobian, data.force_jacobian_t, flat_grads)  # (3F, M)
    return energies, forces.T.reshape(n_members, -1, 3)


class SparseProduct(torch.autograd.Function):
    """y = J x with a precomputed CSR transpose for the backward pass (no re-sorting per epoch)."""

    @staticmethod
    def forward(ctx, matrix, matrix_t, dense):
        ctx.matrix_t = matrix_t
        return matrix @ dense

    @staticmethod
    def backward(ctx, grad_output):
        return None, None, ctx.matrix_t @ grad_output


def force_mae(model: EnsembleModel, data: TrainingData, structure_mask: np.ndarray) -> float:
    """Mean absolute error of the ensemble-mean force components over the selected structures."""
    rows = torch.from_numpy(structure_mask)[data.force_structure]
    if not rows.any():
        return float("nan")
    _, forces = predict_labels(model, data, create_graph=False)
    return float((forces.mean(0)[rows] - data.forces[rows]).abs().mean())
