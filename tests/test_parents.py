"""Parent calculators: option validation, paper defaults, k-point density, EMT in-process, failures."""
import math

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from pipeline.errors import BadInput
from pipeline.execution.parents import (
    ParentConfigError,
    ReferenceFailed,
    compute_reference,
    gpaw_kpts,
    gpaw_setup,
    known_calculators,
    mpi_launch_prefix,
    physics_params,
    validate_parent_params,
)
from pipeline.science.structures import atoms_to_payload

pytestmark = pytest.mark.timeout(60)


def test_known_calculators_are_emt_and_gpaw():
    assert set(known_calculators()) == {"emt", "gpaw"}


def test_gpaw_defaults_are_the_papers():
    params = validate_parent_params("gpaw", {})
    assert params["mode"] == "pw" and params["ecut"] == 450.0 and params["xc"] == "PBE"
    assert params["smearing"] == "fermi-dirac" and params["smearing_width"] == 0.1
    assert params["kpt_density"] == 30.0 and params["ranks"] == 1


def test_every_gpaw_option_can_be_overridden():
    overrides = {
        "mode": "lcao", "basis": "szp(dzp)", "ecut": 300, "h": 0.25, "smearing_width": 0.05,
        "convergence": {"energy": 1e-4, "density": 1e-3}, "maxiter": 50, "spinpol": True, "magmom": 0.5,
        "ranks": 4, "launcher": "srun", "launcher_args": "--mpi=pmix", "kpts": [2, 2, 1],
    }
    params = validate_parent_params("gpaw", overrides)
    assert params["mode"] == "lcao" and params["basis"] == "szp(dzp)" and params["ecut"] == 300.0
    assert params["convergence"] == {"energy": 1e-4, "density": 1e-3} and params["maxiter"] == 50
    assert params["spinpol"] is True and params["ranks"] == 4 and params["launcher_args"] == ["--mpi=pmix"]
    assert params["kpts"] == [2, 2, 1]


@pytest.mark.parametrize(
    "calculator, params, field",
    [
        ("vasp", {}, "parent.calculator"),
        ("gpaw", {"cutoff_ev": 400}, "parent.gpaw.cutoff_ev"),
        ("gpaw", {"ecut": -1}, "parent.gpaw.ecut"),
        ("gpaw", {"mode": "tb"}, "parent.gpaw.mode"),
        ("gpaw", {"maxiter": 0}, "parent.gpaw.maxiter"),
        ("gpaw", {"ranks": 1.5}, "parent.gpaw.ranks"),
        ("gpaw", {"spinpol": "yes"}, "parent.gpaw.spinpol"),
        ("gpaw", {"convergence": {"eigenstate": 1e-8}}, "parent.gpaw.convergence"),
        ("gpaw", {"kpts": [1, 1]}, "parent.gpaw.kpts"),
        ("emt", {"asap": True}, "parent.emt.asap"),
    ],
)
def test_bad_parent_options_name_the_field(calculator, params, field):
    with pytest.raises(ParentConfigError) as raised:
        validate_parent_params(calculator, params)
    assert raised.value.field == field
    assert str(raised.value).startswith(field + ":")
    assert isinstance(raised.value, BadInput)


def test_execution_options_do_not_change_the_physics():
    assert physics_params("gpaw", {"ranks": 8, "launcher": "srun"}) == physics_params("gpaw", {})
    assert physics_params("gpaw", {"ecut": 500}) != physics_params("gpaw", {})


def test_kpoints_meet_the_density_on_periodic_axes_and_gamma_elsewhere():
    params = validate_parent_params("gpaw", {})
    cell = bulk("Pt", "fcc", a=3.92, cubic=True) * (1, 2, 3)
    assert gpaw_kpts(cell, params) == tuple(math.ceil(30.0 / length) for length in cell.cell.lengths())
    for k, length in zip(gpaw_kpts(cell, params), cell.cell.lengths()):
        assert k * length >= 30.0
    slab = cell.copy()
    slab.pbc = (True, True, False)
    assert gpaw_kpts(slab, params)[2] == 1
    chunk = molecule("H2O", vacuum=6.0)
    assert gpaw_kpts(chunk, params) == (1, 1, 1)


def test_plane_waves_get_a_periodic_box_with_gamma_only_for_a_chunk():
    chunk = molecule("H2O", vacuum=6.0)
    params = validate_parent_params("gpaw", {})
    atoms, kwargs = gpaw_setup(atoms_to_payload(chunk), params, txt="gpaw.txt")
    assert kwargs["kpts"]["size"] == (1, 1, 1)
    assert kwargs["mode"] == {"name": "pw", "ecut": 450.0}
    assert kwargs["occupations"] == {"name": "fermi-dirac", "width": 0.1}
    assert atoms.pbc.all()
    np.testing.assert_allclose(atoms.positions, chunk.positions)


def test_emt_reference_equals_direct_emt():
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 2)
    atoms.rattle(0.1, seed=3)
    result = compute_reference("emt", {}, atoms_to_payload(atoms))
    atoms.calc = EMT()
    assert result["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(result["forces"], atoms.get_forces(), atol=1e-12)
    assert result["wall_time_s"] >= 0 and result["host"]


def test_emt_failure_carries_the_reason():
    with pytest.raises(ReferenceFailed, match="No EMT-potential for Si"):
        compute_reference("emt", {}, atoms_to_payload(bulk("Si")))


def test_gpaw_structure_without_a_cell_fails_before_launch(tmp_path):
    water = molecule("H2O")
    with pytest.raises(ReferenceFailed, match="full cell"):
        compute_reference("gpaw", {}, atoms_to_payload(water), str(tmp_path))


def test_launcher_prefix_follows_parsl_then_slurm_then_mpiexec(monkeypatch):
    params = validate_parent_params("gpaw", {"ranks": 2})
    monkeypatch.delenv("PARSL_MPI_PREFIX", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert mpi_launch_prefix(params) == ["mpiexec", "-n", "2"]
    assert mpi_launch_prefix(validate_parent_params("gpaw", {"ranks": 1})) == []
    monkeypatch.setenv("PARSL_MPI_PREFIX", "srun --ntasks 2 --nodelist n1 --mpi=pmix")
    assert mpi_launch_prefix(params) == ["srun", "--ntasks", "2", "--nodelist", "n1", "--mpi=pmix"]
    explicit = validate_parent_params("gpaw", {"ranks": 3, "launcher": "srun", "launcher_args": ["--mpi=pmix"]})
    assert mpi_launch_prefix(explicit) == ["srun", "--ntasks", "3", "--mpi=pmix"]
