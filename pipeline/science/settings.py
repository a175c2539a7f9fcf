"""The model and training settings: one typed schema, the `[model]` section of a campaign config.

Defaults live here only: the campaign config embeds `TrainingSettings`, `nft train` takes its
option defaults from it, and it crosses process boundaries as `model_dump(mode="json")` /
`model_validate`. Frozen and strict: unknown keys and wrong types are errors, so a typo in a
config never trains a different model silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.science.descriptor_types import DEFAULT_CUTOFF_ANGSTROM, DescriptorKind
from pipeline.science.structures import MIN_INTERATOMIC_DISTANCE_ANGSTROM

if TYPE_CHECKING:
    from ase import Atoms

DeviceName = Literal["auto", "cpu", "cuda"]
"""Training and prediction device: "auto" (cuda when torch sees a GPU, else cpu), "cpu" or "cuda"."""
OptimizerName = Literal["lbfgs", "levenberg-marquardt"]
ElementNetworks = Literal["per-element", "shared"]
"""A network per element, or one network for every element with the centre's element as input
(`networks.ELEMENT_NETWORKS`)."""
ADAM_EPOCHS_BEFORE_LBFGS = 300
"""`epochs` left unset: L-BFGS starts from 300 Adam epochs, Levenberg–Marquardt (the default) from
the initial weights (its damped steps need no pre-fit: bench/RESULTS.md, "Optimisers at equal wall
time"; why it is the default: "Convergence bench: the optimisers over 5 seeds")."""

DEFAULT_WEIGHT_DECAY = 1e-4
"""The ridge on every network weight, in the loss's units ((eV/Å)² per squared weight), applied to a
fit in which some element's network has fewer residuals than weights (alloys: 290–700 weights per
network against a few hundred residuals) and to no other: it keeps such a fit well-posed, so the
members no longer agree on the labels only to disagree by eV/Å everywhere else (bench/RESULTS.md,
"Alloys: a well-posed fit")."""


class StrictSettings(BaseModel):
    """Base of every validated settings object: unknown keys, type coercion and NaN/inf are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _tuple(value: Any) -> Any:
    """TOML and JSON give lists; the settings hold tuples (hashable, comparable with a saved model)."""
    return tuple(value) if isinstance(value, list) else value


class DescriptorSettings(StrictSettings):
    """Symmetry-function parameters (docs/campaign.md). Unset radial keys are derived from the
    training data's nearest-neighbour distance (`descriptors.radial_shells`); other unset keys keep
    the `SymmetryFunctionParams` defaults."""

    kind: DescriptorKind = Field(
        "g5-moments", description='"g5-moments" (G5 angular terms through per-atom moments) or "g4" (the paper\'s explicit triplets).'
    )
    radial_centers: tuple[float, ...] | None = Field(
        None, description="Radial centres Rs (Å); default: shells from the training data's nearest-neighbour distance."
    )
    radial_etas: tuple[float, ...] | None = Field(
        None, description="Radial widths η (Å⁻²), one per centre; default: from the data, as the centres."
    )
    angular_etas: tuple[float, ...] | None = Field(None, description="Angular widths η (Å⁻²); default (0.005, 0.03, 0.1).")
    angular_zetas: tuple[int, ...] | None = Field(None, description="Angular exponents ζ (positive integers); default (1, 2).")
    angular_lambdas: tuple[int, ...] | None = Field(None, description="Angular signs λ (+1, −1); default (1, −1).")

    _lists = field_validator("radial_centers", "radial_etas", "angular_etas", "angular_zetas", "angular_lambdas", mode="before")(
        lambda cls, value: _tuple(value)
    )

    @model_validator(mode="after")
    def _valid_set(self) -> "DescriptorSettings":
        from pipeline.science.descriptor_types import SymmetryFunctionParams

        SymmetryFunctionParams(elements=(1,), **self.explicit())  # ValueError: e.g. one η per radial centre
        return self

    def explicit(self) -> dict[str, Any]:
        """The keys that were set (and the kind), as `SymmetryFunctionParams` arguments."""
        return {key: value for key, value in self.model_dump().items() if value is not None}

    @property
    def derives_radial_shells(self) -> bool:
        """True when neither radial key is set: the shells come from the data."""
        return self.radial_centers is None and self.radial_etas is None


class TrainingSettings(StrictSettings):
    """Everything that defines a training run (and the `[model]` section); seeds come from `seed`."""

    cutoff: float = Field(
        DEFAULT_CUTOFF_ANGSTROM, gt=0, description="The descriptor's cutoff Rc (Å): an atom's energy sees neighbours within it."
    )
    hidden: tuple[int, ...] = Field((5, 5), min_length=1, description="Neurons per hidden layer of each network.")
    ensemble: int = Field(10, ge=2, description="Members of the ensemble, whose force spread gives δ_i.")
    epochs: int = Field(
        ADAM_EPOCHS_BEFORE_LBFGS,
        ge=0,
        description="Adam epochs before the second-order fit; default 0 with Levenberg–Marquardt, 300 with L-BFGS.",
    )
    learning_rate: float = Field(1e-2, gt=0, description="Adam's first learning rate.")
    final_learning_rate: float = Field(5e-4, gt=0, description="Adam's last learning rate (and its only one in a warm start).")
    optimizer: OptimizerName = Field(
        "levenberg-marquardt", description='The second-order fit: "levenberg-marquardt" or "lbfgs" (after `epochs` of Adam).'
    )
    lbfgs_steps: int = Field(1000, ge=0, description='L-BFGS steps with optimizer "lbfgs" (set without `optimizer`, it selects "lbfgs").')
    lm_steps: int = Field(30, ge=0, description="Levenberg–Marquardt iterations, one Jacobian each.")
    element_networks: ElementNetworks = Field(
        "per-element", description='"per-element": a network per element; "shared": one network for all, the element an input.'
    )
    weight_decay: float = Field(
        DEFAULT_WEIGHT_DECAY, ge=0, description="Ridge on the weights ((eV/Å)² per squared weight), applied to underdetermined fits only."
    )
    energy_weight: float = Field(1.0, ge=0, description="Weight of the energy terms (per atom, eV²) in the loss.")
    force_weight: float = Field(1.0, ge=0, description="Weight of the force terms ((eV/Å)²) in the loss.")
    validation_fraction: float = Field(0.0, ge=0, lt=1, description="Share of structures held out for early stopping (Adam only).")
    patience_epochs: int = Field(300, ge=1, description="Adam epochs without a lower validation loss before it stops.")
    bootstrap: bool = Field(False, description="Train each member on its own bootstrap resample of the structures.")
    seed: int = Field(0, ge=0, description="Seed of the members' initial weights (member m gets seed + 1000·m) and of the splits.")
    training_processes: int | None = Field(None, ge=1, description="Processes the members are sharded over; default: the site decides.")
    warm_start: bool = Field(True, description="A campaign starts each iteration's training from the previous iteration's members.")
    device: DeviceName = Field("auto", description='Training device: "auto" (cuda when torch sees a GPU), "cpu" or "cuda".')
    descriptor: DescriptorSettings = Field(DescriptorSettings(), description="Symmetry-function parameters (`[model.descriptor]`).")

    _hidden = field_validator("hidden", mode="before")(lambda cls, value: _tuple(value))

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_optimizer(cls, data: Any) -> Any:
        """An unset `optimizer` with `lbfgs_steps` set is "lbfgs" (a config written for L-BFGS, the
        default before Levenberg–Marquardt, keeps it); an unset `epochs` is the optimizer's default."""
        if isinstance(data, dict) and "optimizer" not in data and "lbfgs_steps" in data:
            data = {**data, "optimizer": "lbfgs"}
        if isinstance(data, dict) and "epochs" not in data:
            optimizer = data.get("optimizer", cls.model_fields["optimizer"].default)
            data = {**data, "epochs": ADAM_EPOCHS_BEFORE_LBFGS if optimizer == "lbfgs" else 0}
        return data

    @field_validator("cutoff")
    @classmethod
    def _cutoff_reaches_a_neighbour(cls, value: float) -> float:
        """No structure nft accepts has atoms closer than 0.5 Å (`structure_problem`), so a cutoff at
        or below that sees no neighbour anywhere: every descriptor is zero."""
        if value <= MIN_INTERATOMIC_DISTANCE_ANGSTROM:
            raise ValueError(
                f"must be > {MIN_INTERATOMIC_DISTANCE_ANGSTROM:g} Å (got {value!r}): no structure has atoms "
                "that close, so the model would see no neighbour"
            )
        return value

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(width < 1 for width in value):
            raise ValueError("every layer width must be >= 1")
        return value

    @field_validator("device")
    @classmethod
    def _gpu_present(cls, value: str) -> str:
        if value == "cuda":
            from pipeline.science.device import missing_gpu

            if why := missing_gpu():
                raise ValueError(f"'cuda' but {why} (use 'auto': a GPU site's training nodes pick their GPUs)")
        return value

    def seeds(self) -> list[int]:
        """One initialisation seed per member."""
        return [self.seed * 1000 + m for m in range(self.ensemble)]

    def fit_problem(self) -> tuple[str, str] | None:
        """(field, why) when these settings train nothing, else None: no Adam epoch and no step of
        the second-order optimiser, or both loss weights 0 (the loss is 0). Valid for a program (a
        warm start with no steps rescales a model), refused as user input by `nft run` and `nft train`."""
        if self.epochs == 0 and self.second_order_steps == 0:
            field = "lm_steps" if self.optimizer == "levenberg-marquardt" else "lbfgs_steps"
            return field, f"0 with epochs = 0 trains nothing (give {field} >= 1 or epochs >= 1)"
        if self.energy_weight == 0 and self.force_weight == 0:
            return "force_weight", "0 with energy_weight = 0 makes the loss 0: nothing is trained"
        return None

    def cutoff_problem(self, structures: Sequence["Atoms"]) -> str | None:
        """Why `cutoff` (Å) cannot describe `structures` (the training data), or None: a sphere that
        holds absurdly many atoms (`neighbours.sphere_problem`), or a cutoff that does not reach past
        the data's median nearest-neighbour distance d (the model would see no neighbour) nor, with
        radial shells derived from the data, past the first shell (`descriptors.radial_shells`)."""
        from pipeline.science.descriptors import median_nearest_neighbour_distance, radial_shells
        from pipeline.science.neighbours import sphere_problem

        for index, atoms in enumerate(structures):
            problem = sphere_problem(atoms, self.cutoff)
            if problem:
                return f"{problem} (structure {index})"
        try:
            nearest = median_nearest_neighbour_distance(structures)
        except ValueError:
            return None  # no neighbours within 5 Å: nothing to compare with (training says why)
        if self.cutoff <= nearest:
            return (
                f"{self.cutoff:g} Å does not reach the nearest neighbours of the data ({nearest:g} Å, median): "
                "the model would see no neighbour"
            )
        if self.descriptor.derives_radial_shells:
            try:
                radial_shells(nearest, self.cutoff)
            except ValueError as error:
                return str(error)
        return None

    @property
    def second_order_steps(self) -> int:
        """Iterations of the chosen second-order optimiser (0: Adam alone)."""
        return self.lm_steps if self.optimizer == "levenberg-marquardt" else self.lbfgs_steps

    def with_changes(self, **changes: Any) -> "TrainingSettings":
        """A validated copy with some fields changed."""
        return type(self).model_validate({**self.model_dump(), **changes})
