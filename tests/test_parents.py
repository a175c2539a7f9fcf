"""Parent calculators: option validation, paper defaults, k-point density, EMT in-process, failures."""

import json
import math
import signal
import time

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from pipeline.errors import BadInput
from pipeline.execution.apps import within_walltime
from pipeline.execution.parents import (
    MAX_FORCE,
    PARENTS,
    EmtParent,
    GpawParent,
    ParentConfigError,
    ReferenceFailed,
    WalltimeExceeded,
    parent_for,
    result_problem,
)
from pipeline.science.structures import atoms_to_payload

pytestmark = pytest.mark.timeout(60)


def test_known_calculators_are_emt_gpaw_cp2k_and_any_ase_calculator():
    assert set(PARENTS) == {"emt", "gpaw", "cp2k", "ase"}
    assert isinstance(parent_for("GPAW"), GpawParent) and isinstance(parent_for("emt"), EmtParent)


def test_each_parent_says_what_it_needs():
    emt, gpaw = parent_for("emt"), parent_for("gpaw")
    assert (emt.default_threshold, gpaw.default_threshold) == (0.1, 0.3)  # eV/Å: the paper's DFT threshold, a tighter one for EMT
    assert not emt.needs_job_dir and gpaw.needs_job_dir
    assert emt.evaluates_targets and not gpaw.evaluates_targets
    assert set(gpaw.physics_fields) < set(GpawParent.model_fields)


def test_gpaw_defaults_are_the_papers():
    params = parent_for("gpaw")
    assert params.mode == "pw" and params.ecut == 450.0 and params.xc == "PBE"
    assert params.smearing == "fermi-dirac" and params.smearing_width == 0.1
    assert params.kpt_density == 30.0 and params.ranks == 1


def test_every_gpaw_option_can_be_overridden():
    overrides = {
        "mode": "lcao",
        "basis": "szp(dzp)",
        "ecut": 300,
        "h": 0.25,
        "smearing_width": 0.05,
        "convergence": {"energy": 1e-4, "density": 1e-3},
        "maxiter": 50,
        "spinpol": True,
        "magmom": 0.5,
        "ranks": 4,
        "launcher": "srun",
        "launcher_args": "--mpi=pmix",
        "kpts": [2, 2, 1],
        "setups": {"Pt": "10"},
    }
    params = parent_for("gpaw", overrides).model_dump()
    assert params["mode"] == "lcao" and params["basis"] == "szp(dzp)" and params["ecut"] == 300.0
    assert params["convergence"] == {"energy": 1e-4, "density": 1e-3} and params["maxiter"] == 50
    assert params["spinpol"] is True and params["ranks"] == 4 and params["launcher_args"] == ["--mpi=pmix"]
    assert params["kpts"] == [2, 2, 1] and params["setups"] == {"Pt": "10"}
    assert parent_for("gpaw", params) == parent_for("gpaw", overrides)  # the dump is what a Parsl app receives


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
        ("gpaw", {"setups": {"Pt": 10}}, "parent.gpaw.setups"),
        ("gpaw", {"setups": ""}, "parent.gpaw.setups"),
        ("emt", {"asap": True}, "parent.emt.asap"),
        ("emt", {"retries": -1}, "parent.emt.retries"),
        ("emt", {"retries": 1.5}, "parent.emt.retries"),
        ("gpaw", {"walltime_s": 0}, "parent.gpaw.walltime_s"),
        ("emt", {"max_force": -5.0}, "parent.emt.max_force"),
        ("gpaw", {"timeout_s": 60, "walltime_s": 60}, "parent.gpaw"),
    ],
)
def test_bad_parent_options_name_the_field(calculator, params, field):
    with pytest.raises(ParentConfigError) as raised:
        parent_for(calculator, params)
    assert raised.value.field == field
    assert str(raised.value).startswith(field + ":")
    assert isinstance(raised.value, BadInput)


def test_bad_values_read_as_before():
    with pytest.raises(ParentConfigError, match=r"^parent.gpaw.ecut: must be a positive number, got -1$"):
        parent_for("gpaw", {"ecut": -1})
    with pytest.raises(ParentConfigError, match=r"^parent.gpaw.mode: must be one of pw, lcao, fd; got 'tb'$"):
        parent_for("gpaw", {"mode": "tb"})
    with pytest.raises(ParentConfigError, match=r"^parent.gpaw.kpts: must be an integer >= 1, got 1.5$"):
        parent_for("gpaw", {"kpts": [1, 1.5, 1]})
    with pytest.raises(ParentConfigError, match=r"^parent.gpaw.convergence: unknown criterion 'eigenstate' \(known: bands, "):
        parent_for("gpaw", {"convergence": {"eigenstate": 1e-8}})


def test_execution_options_do_not_change_the_physics():
    assert parent_for("gpaw", {"ranks": 8, "launcher": "srun"}).physics() == parent_for("gpaw").physics()
    assert parent_for("gpaw", {"ecut": 500}).physics() != parent_for("gpaw").physics()
    assert parent_for("emt").physics() == {}
    retried = {"retries": 5, "walltime_s": 60.0, "max_force": 10.0}
    assert parent_for("emt", retried).physics() == {}  # job hashes stay as they were
    assert parent_for("gpaw", retried).physics() == parent_for("gpaw").physics()


def test_every_parent_has_the_retry_options_with_their_defaults():
    required = {"ase": {"class": "ase.calculators.lj:LennardJones"}}  # the generic parent needs its class
    for name in PARENTS:
        parent = parent_for(name, required.get(name))
        assert (parent.retries, parent.walltime_s, parent.max_force) == (2, None, MAX_FORCE) == (2, None, 50.0)
    assert parent_for("emt", {"retries": 0, "walltime_s": 1, "max_force": 100}).walltime_s == 1.0


def test_gpaw_timeout_s_is_read_as_walltime_s():
    assert parent_for("gpaw", {"timeout_s": 10800}) == parent_for("gpaw", {"walltime_s": 10800.0})
    assert "timeout_s" not in parent_for("gpaw").model_dump()


@pytest.mark.parametrize(
    "energy, forces, problem",
    [
        (-1.0, [[0.0, 0.0, 1.0]] * 2, None),
        (-1.0, [[0.0, 0.0, 49.9]] * 2, None),
        (math.nan, [[0.0, 0.0, 1.0]] * 2, "non-finite energy nan"),
        (-1.0, [[0.0, math.inf, 1.0], [0.0, 0.0, 0.0]], "non-finite forces on 1 of 2 atoms"),
        (-1.0, [[0.0, math.nan, 1.0]] * 2, "non-finite forces on 2 of 2 atoms"),
        (-1.0, [[30.0, 30.0, 30.0], [0.0, 0.0, 0.0]], "|F| = 52 eV/Å on atom 0 exceeds max_force = 50 eV/Å"),
        (-1.0, [[0.0, 0.0, 1.0]], "forces of shape (1, 3), expected (2, 3)"),
    ],
)
def test_a_result_is_checked_for_finite_and_sane_values(energy, forces, problem):
    assert result_problem(energy, forces, 2, MAX_FORCE) == problem


def test_a_result_beyond_max_force_is_refused_by_run():
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 2)
    atoms.rattle(0.1, seed=3)
    with pytest.raises(ReferenceFailed, match=r"^emt: invalid result: \|F\| = .* exceeds max_force = 0.01 eV/Å$"):
        parent_for("emt", {"max_force": 0.01}).run(atoms_to_payload(atoms))


def test_within_walltime_stops_a_sleep_and_keeps_the_timer_it_found():
    started = time.monotonic()
    with pytest.raises(WalltimeExceeded, match=r"^emt: exceeded walltime_s = 0.5 s$"):
        within_walltime(lambda: time.sleep(30), 0.5, "emt")
    assert time.monotonic() - started < 2.0
    assert within_walltime(lambda: 42, 5.0, "emt") == 42
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # pytest-timeout's timer is still running


def test_the_physics_of_a_job_is_the_json_stored_databases_hold():
    """The options that identify a job, as plain JSON in the option order (the hash of stored jobs)."""
    physics = parent_for("gpaw", {"ecut": 500, "convergence": {"energy": 1e-6}, "ranks": 4}).physics()
    assert json.dumps(physics) == (
        '{"mode": "pw", "ecut": 500.0, "h": 0.2, "basis": "dzp", "xc": "PBE", "smearing": "fermi-dirac", '
        '"smearing_width": 0.1, "kpt_density": 30.0, "kpts": null, "convergence": {"energy": 1e-06}, '
        '"maxiter": 333, "spinpol": false, "magmom": 0.0, "charge": 0.0}'
    )


def test_other_setups_are_part_of_the_physics_and_reach_gpaw():
    """A job with the 10-electron Pt datasets is another result than one with the default ones;
    the default is left out of the physics, so jobs stored before the option keep their hash."""
    default, ten = parent_for("gpaw"), parent_for("gpaw", {"setups": {"Pt": "10"}})
    assert "setups" not in default.physics() and ten.physics()["setups"] == {"Pt": "10"}
    assert parent_for("gpaw", {"setups": "10"}).physics()["setups"] == "10"
    box = {"numbers": [78], "positions": [[2.5, 2.5, 2.5]], "cell": (5.0 * np.eye(3)).tolist(), "pbc": [False] * 3}
    assert ten.setup(box)[1]["setups"] == {"Pt": "10"} and default.setup(box)[1]["setups"] == "paw"


def test_kpoints_meet_the_density_on_periodic_axes_and_gamma_elsewhere():
    params = parent_for("gpaw")
    cell = bulk("Pt", "fcc", a=3.92, cubic=True) * (1, 2, 3)
    assert params.kpts_for(cell) == tuple(math.ceil(30.0 / length) for length in cell.cell.lengths())
    for k, length in zip(params.kpts_for(cell), cell.cell.lengths()):
        assert k * length >= 30.0
    slab = cell.copy()
    slab.pbc = (True, True, False)
    assert params.kpts_for(slab)[2] == 1
    chunk = molecule("H2O", vacuum=6.0)
    assert params.kpts_for(chunk) == (1, 1, 1)


def test_plane_waves_get_a_periodic_box_with_gamma_only_for_a_chunk():
    chunk = molecule("H2O", vacuum=6.0)
    atoms, kwargs = parent_for("gpaw").setup(atoms_to_payload(chunk), txt="gpaw.txt")
    assert kwargs["kpts"]["size"] == (1, 1, 1)
    assert kwargs["mode"] == {"name": "pw", "ecut": 450.0}
    assert kwargs["occupations"] == {"name": "fermi-dirac", "width": 0.1}
    assert atoms.pbc.all()
    np.testing.assert_allclose(atoms.positions, chunk.positions)


def test_emt_reference_equals_direct_emt():
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True) * (2, 2, 2)
    atoms.rattle(0.1, seed=3)
    result = parent_for("emt").run(atoms_to_payload(atoms))
    atoms.calc = EMT()
    assert result["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(result["forces"], atoms.get_forces(), atol=1e-12)
    assert result["wall_time_s"] >= 0 and result["host"]


def test_emt_failure_carries_the_reason():
    with pytest.raises(ReferenceFailed, match="No EMT-potential for Si"):
        parent_for("emt").run(atoms_to_payload(bulk("Si")))


def test_gpaw_structure_without_a_cell_fails_before_launch(tmp_path):
    water = molecule("H2O")
    with pytest.raises(ReferenceFailed, match="full cell"):
        parent_for("gpaw").run(atoms_to_payload(water), str(tmp_path))


def test_launcher_prefix_follows_parsl_then_slurm_then_mpiexec(monkeypatch):
    params = parent_for("gpaw", {"ranks": 2})
    monkeypatch.delenv("PARSL_MPI_PREFIX", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert params.launch_prefix() == ["mpiexec", "-n", "2"]
    assert parent_for("gpaw", {"ranks": 1}).launch_prefix() == []
    monkeypatch.setenv("PARSL_MPI_PREFIX", "srun --ntasks 2 --nodelist n1 --mpi=pmix")
    assert params.launch_prefix() == ["srun", "--ntasks", "2", "--nodelist", "n1", "--mpi=pmix"]
    explicit = parent_for("gpaw", {"ranks": 3, "launcher": "srun", "launcher_args": ["--mpi=pmix"]})
    assert explicit.launch_prefix() == ["srun", "--ntasks", "3", "--mpi=pmix"]
