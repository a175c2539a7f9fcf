"""Every bad input is refused before anything is written: exit 2, one line on stderr naming the file
and the field, and the disk as it was. One row per case, across the commands (docs/bad-input.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.science.examples import bulk_training_cells, emt_label, emt_labelled
from tests.plugins.campaign_fixtures import rattled_cluster, write_campaign

pytestmark = pytest.mark.timeout(120)


def disk_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time, and every folder. A folder's own
    modification time is left out: reading a campaign's SQLite database creates and removes its
    journal files beside it, which leaves nothing but changes the folder's time."""
    state = {}
    for folder, folders, files in os.walk(root):
        for name in folders:
            state[str((Path(folder) / name).relative_to(root))] = (-1, 0)
        for name in files:
            path = Path(folder) / name
            info = path.stat()
            state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return state


# ----- the cases: each writes what it needs under `here` and returns the nft arguments ----------


def campaign(changes=None, **options) -> Callable[[Path], list[str]]:
    def make(here: Path) -> list[str]:
        return ["run", str(write_campaign(here / "campaign", changes, **options))]

    return make


def campaign_text(edit: Callable[[str], str]) -> Callable[[Path], list[str]]:
    """A valid small campaign whose config text is then edited."""

    def make(here: Path) -> list[str]:
        config = write_campaign(here / "campaign")
        config.write_text(edit(config.read_text()))
        return ["run", str(config)]

    return make


def campaign_target(atoms: Atoms) -> Callable[[Path], list[str]]:
    return campaign(target=atoms)


def campaign_initial(images: list[Atoms]) -> Callable[[Path], list[str]]:
    def make(here: Path) -> list[str]:
        config = write_campaign(here / "campaign")
        write(config.parent / "initial.traj", images)
        return ["run", str(config)]

    return make


def nan_positions() -> Atoms:
    atoms = rattled_cluster()
    atoms.positions[3, 1] = np.nan
    return atoms


def inf_positions() -> Atoms:
    atoms = rattled_cluster()
    atoms.positions[0, 0] = np.inf
    return atoms


def two_atoms_too_close() -> Atoms:
    atoms = rattled_cluster()
    atoms.positions[1] = atoms.positions[0] + [0.1, 0.0, 0.0]
    return atoms


def periodic_without_cell() -> Atoms:
    atoms = rattled_cluster()
    atoms.pbc = True
    return atoms


def labelled_with(energy: float, forces_value: float) -> list[Atoms]:
    images = [emt_label(cell) for cell in bulk_training_cells(count=3, seed=3)]
    forces = images[1].get_forces().copy()
    forces[0, 0] = forces_value
    images[1].calc = SinglePointCalculator(images[1], energy=energy, forces=forces)
    return images


def training_file(images: list[Atoms], *options: str) -> Callable[[Path], list[str]]:
    def make(here: Path) -> list[str]:
        path = here / "train.extxyz"
        write(path, images)
        return ["train", str(path), "-o", str(here / "model.nft"), *options]

    return make


def good_training_file(*options: str) -> Callable[[Path], list[str]]:
    return training_file([emt_label(cell) for cell in bulk_training_cells(count=3, seed=3)], *options)


def model_file(header_hidden: list[int] | None = None, junk: bool = False, *options: str) -> Callable[[Path], list[str]]:
    """`nft evaluate` of a model whose file is junk or whose header asks for a huge network."""

    def make(here: Path) -> list[str]:
        path = here / "model.nft"
        if junk:
            path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        else:
            from safetensors.torch import save_file
            import torch

            metadata = {
                "format": "nft-ensemble",
                "version": "1",
                "hidden": json.dumps(header_hidden),
                "descriptor": json.dumps({"elements": [78]}),
                "member_seeds": json.dumps([0, 1]),
            }
            save_file({"feature_mean": torch.zeros(1, 20, dtype=torch.float64)}, str(path), metadata=metadata)
        structure = here / "probe.traj"
        write(structure, rattled_cluster())
        return ["evaluate", str(path), str(structure), "--parent", "emt", *options]

    return make


def diverged_model(here: Path) -> list[str]:
    """`nft evaluate` of a model file whose weights hold a NaN (a diverged training)."""
    import torch

    from pipeline.science.settings import TrainingSettings
    from pipeline.science.training import train_ensemble
    from pipeline.storage.model_file import save_model

    model, _ = train_ensemble(
        [emt_labelled(cell) for cell in bulk_training_cells(count=2, seed=3)],
        TrainingSettings(ensemble=2, epochs=1, optimizer="lbfgs", lbfgs_steps=0),
    )
    with torch.no_grad():
        model.networks.weights[0][0, 0, 0] = float("nan")
    save_model(model, here / "model.nft")
    write(here / "probe.traj", rattled_cluster())
    return ["evaluate", str(here / "model.nft"), str(here / "probe.traj"), "--parent", "emt", "--json"]


def evaluate_structure(atoms: Atoms, reference: str = "emt") -> Callable[[Path], list[str]]:
    """`nft evaluate` of a real (briefly trained) model on a structure."""
    return evaluate_files([atoms], reference=reference)


def evaluate_files(*files: list[Atoms] | None, reference: str = "emt") -> Callable[[Path], list[str]]:
    """`nft evaluate` of a real (briefly trained) model on several files: probe0.traj, probe1.traj, …
    holding the given images (None: the file is not written, so it is missing)."""

    def make(here: Path) -> list[str]:
        from pipeline.science.settings import TrainingSettings
        from pipeline.science.training import train_ensemble
        from pipeline.storage.model_file import save_model

        data = [emt_labelled(cell) for cell in bulk_training_cells(count=2, seed=3)]
        model, _ = train_ensemble(data, TrainingSettings(ensemble=2, epochs=1, optimizer="lbfgs", lbfgs_steps=0))
        save_model(model, here / "model.nft")
        paths = [here / ("probe.traj" if len(files) == 1 else f"probe{k}.traj") for k in range(len(files))]
        for path, images in zip(paths, files):
            if images is not None:
                write(path, images)
        return ["evaluate", str(here / "model.nft"), *map(str, paths), "--parent", reference]

    return make


def junk_file_second(here: Path) -> list[str]:
    arguments = evaluate_files([rattled_cluster()], [rattled_cluster()])(here)
    (here / "probe1.traj").write_text("this is not a trajectory")
    return arguments


def copper_atom(atoms: Atoms) -> Atoms:
    atoms = atoms.copy()
    atoms.numbers[5] = 29
    return atoms


def locality(*options: str, structure: str = "cluster", config: str | dict | None = None) -> Callable[[Path], list[str]]:
    """`nft locality` of a small cluster file ("cluster"), one with a NaN position ("nan"), a junk
    file ("junk"), an Fe cluster ("iron"), a periodic Pt cell ("bulk"), a folder ("folder") or a missing one ("missing"), with valid arguments that `options` then override (typer keeps an option's last
    value). The parent is `--parent emt`; with `config`, `--config` instead: a small campaign
    with these changes (a dict), a missing file ("missing"), or nothing at all ("neither")."""

    def make(here: Path) -> list[str]:
        path = here / "structure.traj"
        if structure == "cluster":
            write(path, rattled_cluster())
        elif structure == "nan":
            write(path, nan_positions())
        elif structure == "junk":
            path.write_text("this is not a trajectory")
        elif structure == "iron":
            write(path, iron_cluster())
        elif structure == "bulk":
            write(path, periodic_platinum())
        elif structure == "folder":
            path.mkdir()
        if config is None:
            parent = ["--parent", "emt"]
        elif config == "missing":
            parent = ["--config", str(here / "nope.toml")]
        elif config == "neither":
            parent = []
        else:
            parent = ["--config", str(write_campaign(here / "campaign", config))]
        return ["locality", str(path), *parent, "--radii", "4,6", *options]

    return make


def status_of_missing_database(here: Path) -> list[str]:
    return ["status", str(write_campaign(here / "campaign"))]


def report_of_missing_database(here: Path) -> list[str]:
    return ["report", str(write_campaign(here / "campaign"))]


def relax(*options: str, structure: str = "cluster", output: str = "relaxed.traj") -> Callable[[Path], list[str]]:
    """`nft relax` of a never-run small campaign with a Pt cluster ("cluster"), a Cu dimer ("copper":
    an element the campaign lacks), an Fe cluster ("iron": one EMT lacks) or a missing file ("missing"), with `options` after the valid ones."""

    def make(here: Path) -> list[str]:
        config = write_campaign(here / "campaign")
        path = here / "structure.traj"
        if structure == "cluster":
            write(path, rattled_cluster())
        elif structure == "copper":
            write(path, Atoms("Cu2", positions=[(0, 0, 0), (0, 0, 2.5)]))
        elif structure == "iron":
            write(path, iron_cluster())
        return ["relax", str(config), str(path), "-o", str(here / output), *options]

    return make


def report_into_a_file(here: Path) -> list[str]:
    config = write_campaign(here / "campaign")
    (here / "taken").write_text("a file, not a folder")
    return ["report", str(config), "-o", str(here / "taken")]


def initial(*arguments: str) -> Callable[[Path], list[str]]:
    """`nft initial ARGUMENTS -o HERE/init.traj` (a later -o in `arguments` wins)."""
    return lambda here: ["initial", *arguments[:1], "-o", str(here / "init.traj"), *arguments[1:]]


def generated_campaign(target: Atoms | None = None, **generate) -> Callable[[Path], list[str]]:
    """A small campaign with `[data.initial_generate]` (`generate`) instead of data.initial."""
    return campaign({"data": {"initial": None, "initial_generate": {"count": 4, **generate}}}, target=target)


def iron_cluster() -> Atoms:
    atoms = rattled_cluster()
    atoms.symbols[:] = "Fe"
    return atoms


def periodic_platinum() -> Atoms:
    """A periodic fcc Pt cell (4 atoms): its chunks grow as r³."""
    from ase.build import bulk

    return bulk("Pt", "fcc", a=3.92, cubic=True)


def init_config(*options: str, target: str = "cluster", existing: bool = False) -> Callable[[Path], list[str]]:
    """`nft init HERE/target.traj -o HERE/campaign.toml OPTIONS` with a Pt cluster ("cluster"), an Fe
    one ("iron"), a Pt dimer 9 Å apart whose atoms the default 8 Å chunks would leave alone
    ("dimer"), or no file ("missing"); with `existing`, campaign.toml is there already."""

    def make(here: Path) -> list[str]:
        path = here / "target.traj"
        if target == "cluster":
            write(path, rattled_cluster())
        elif target == "iron":
            write(path, iron_cluster())
        elif target == "dimer":
            write(path, Atoms("Pt2", positions=[(0, 0, 0), (0, 0, 9.0)]))
        if existing:
            (here / "campaign.toml").write_text("# mine\n")
        return ["init", str(path), "-o", str(here / "campaign.toml"), *options]

    return make


def relax_with_a_changed_model(here: Path) -> list[str]:
    """`nft relax` of a campaign whose recorded latest model file had one byte flipped afterwards."""
    from pipeline.campaign.config import load_config
    from pipeline.science.settings import TrainingSettings
    from pipeline.science.training import train_ensemble
    from pipeline.storage.model_file import save_model
    from pipeline.storage.store import CampaignStore

    arguments = relax()(here)
    campaign = load_config(arguments[1])
    model, _ = train_ensemble(
        [emt_labelled(cell) for cell in bulk_training_cells(count=2, seed=3)],
        TrainingSettings(ensemble=2, epochs=1, optimizer="lbfgs", lbfgs_steps=0),
    )
    path = save_model(model, campaign.workdir / "models" / "iteration-001.nft")
    with CampaignStore.open(campaign.database_url, campaign.name, campaign.as_dict(), files_root=campaign.workdir) as store:
        store.record_model(1, path, {})
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF
    path.write_bytes(bytes(data))
    return arguments


CASES: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    # nft run: the config file
    "config file missing": (lambda here: ["run", str(here / "nope.toml")], ("nope.toml", "no such config file")),
    "malformed TOML": (campaign_text(lambda text: text + "\n[model\n"), ("config.toml", "malformed TOML")),
    "unknown key": (campaign({"model": {"epoch": 3}}), ("model.epoch", "unknown key")),
    "wrong type": (campaign({"model": {"ensemble": "ten"}}), ("model.ensemble", "must be an integer")),
    "radius inf": (campaign_text(lambda t: t.replace("radius = 6.0", "radius = inf")), ("chunks.radius", "finite")),
    "vacuum nan": (campaign_text(lambda t: t.replace("vacuum = 4.0", "vacuum = nan")), ("chunks.vacuum", "finite")),
    "cutoff inf": (campaign_text(lambda t: t.replace("cutoff = 5.0", "cutoff = inf")), ("model.cutoff", "finite")),
    "negative radius": (campaign({"chunks": {"radius": -1.0}}), ("chunks.radius", "must be > 0")),
    "one member": (campaign({"model": {"ensemble": 1}}), ("model.ensemble", "must be >= 2")),
    "no hidden layers": (campaign({"model": {"hidden": []}}), ("model.hidden", "must not be empty")),
    "unknown descriptor": (campaign({"model": {"descriptor": {"kind": "g7"}}}), ("model.descriptor.kind", "g5-moments")),
    "radial lengths differ": (
        campaign({"model": {"descriptor": {"radial_centers": [0.0, 2.0], "radial_etas": [0.1]}}}),
        ("model.descriptor", "same length"),
    ),
    "unknown device": (campaign({"model": {"device": "gpu"}}), ("model.device", "'auto', 'cpu' or 'cuda'")),
    "zero threshold": (campaign({"active": {"threshold": 0.0}}), ("active.threshold", "must be > 0")),
    "empty name": (campaign({"campaign": {"name": ""}}), ("campaign.name", "must not be empty")),
    "not a database URL": (campaign({"campaign": {"database": "not a url"}}), ("campaign.database",)),
    "database driver not installed": (
        campaign({"campaign": {"database": "mysql+mysqldb://me:secret@127.0.0.1/nft"}}),
        ("campaign.database", "driver is not installed", "me:***@"),
    ),
    "unreachable PostgreSQL server": (
        campaign({"campaign": {"database": "postgresql://me:secret@127.0.0.1:1/nft"}}),
        ("cannot open as a database", "me:***@127.0.0.1:1"),
    ),
    "unknown parent": (campaign({"parent": {"calculator": "vasp"}}), ("parent.calculator", "vasp")),
    "options of another parent": (campaign({"parent": {"gpaw": {"xc": "PBE"}}}), ("parent.gpaw", "emt")),
    "negative retries": (campaign({"parent": {"emt": {"retries": -1}}}), ("parent.emt.retries", "integer >= 0")),
    "zero walltime": (campaign({"parent": {"emt": {"walltime_s": 0.0}}}), ("parent.emt.walltime_s", "positive")),
    "zero max_force": (campaign({"parent": {"emt": {"max_force": 0.0}}}), ("parent.emt.max_force", "positive")),
    "zero lm_steps": (
        campaign({"model": {"optimizer": "levenberg-marquardt", "lm_steps": 0, "epochs": 0, "lbfgs_steps": None}}),
        ("model.lm_steps", "trains nothing"),
    ),
    "zero lbfgs_steps and epochs": (campaign({"model": {"lbfgs_steps": 0, "epochs": 0}}), ("model.lbfgs_steps", "trains nothing")),
    "both loss weights zero": (
        campaign({"model": {"energy_weight": 0.0, "force_weight": 0.0}}),
        ("model.force_weight", "energy_weight = 0", "nothing is trained"),
    ),
    "cutoff 0.5": (campaign({"model": {"cutoff": 0.5}}), ("model.cutoff", "> 0.5 Å", "no neighbour")),
    "cutoff short of the nearest neighbours": (campaign({"model": {"cutoff": 1.0}}), ("model.cutoff", "nearest neighbours")),
    "chunk radius holding no neighbour": (campaign({"chunks": {"radius": 1.0}}), ("chunks.radius", "no neighbour", "lone atoms")),
    "chunk radius below the cutoff, trained on the chunk": (
        campaign({"chunks": {"radius": 4.0, "training_environment": "chunk"}, "model": {"cutoff": 5.0}}),
        ("chunks.radius", "below model.cutoff", "training_environment"),
    ),
    "chunk radius huge on a periodic target": (
        campaign({"chunks": {"radius": 1e6}}, target=periodic_platinum()),
        ("chunks.radius", "1e+06 Å sphere", "at most 100,000"),
    ),
    "workdir the filesystem root": (campaign({"campaign": {"workdir": "/"}}), ("campaign.workdir", "filesystem root")),
    "workdir above the config": (campaign({"campaign": {"workdir": "../.."}}), ("campaign.workdir", "contains the config's folder")),
    "workdir the home folder": (campaign({"campaign": {"workdir": str(Path.home())}}), ("campaign.workdir", "home folder")),
    # nft run: the structures
    "target is a folder": (campaign({"data": {"targets": ["."]}}), ("data.targets[0]", "is a folder")),
    "target element EMT lacks": (campaign_target(iron_cluster()), ("data.targets", "emt parent has no parameters for Fe")),
    "target file missing": (campaign({"data": {"targets": ["missing.traj"]}}), ("data.targets[0]", "no such file")),
    "no targets": (campaign({"data": {"targets": []}}), ("data.targets", "must not be empty")),
    "NaN positions": (campaign_target(nan_positions()), ("data.targets[0]", "not finite")),
    "inf positions": (campaign_target(inf_positions()), ("data.targets[0]", "not finite")),
    "atoms 0.1 Å apart": (campaign_target(two_atoms_too_close()), ("data.targets[0]", "0.1 Å apart")),
    "periodic without a cell": (campaign_target(periodic_without_cell()), ("data.targets[0]", "no volume")),
    "element the initial set lacks": (campaign_target(Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])), ("data.targets", "Cu")),
    "NaN force in the initial set": (campaign_initial(labelled_with(-1.0, np.nan)), ("data.initial[0]", "forces")),
    "inf energy in the initial set": (campaign_initial(labelled_with(np.inf, 0.0)), ("data.initial[0]", "energy")),
    # nft run: the site
    "zero workers": (campaign({"site": {"options": {"workers": 0}}}), ("local.py", "workers")),
    "unknown site option": (campaign({"site": {"options": {"cores": 2}}}), ("site option 'cores'",)),
    "unknown site": (campaign({"site": {"name": "nowhere"}}), ("--site", "nowhere")),
    # nft train
    "NaN force in training data": (training_file(labelled_with(-1.0, np.nan)), ("train.extxyz", "image 1", "forces")),
    "hidden not numbers": (good_training_file("--hidden", "5,x"), ("--hidden",)),
    "one member to train": (good_training_file("--ensemble", "1"), ("--ensemble", ">= 2")),
    "cutoff inf to train": (good_training_file("--cutoff", "inf"), ("--cutoff", "finite")),
    "unknown device to train": (good_training_file("--device", "tpu"), ("--device",)),
    "output folder missing": (lambda here: good_training_file()(here)[:2] + ["-o", str(here / "no" / "m.nft")], ("does not exist",)),
    "output not writable to train": (lambda here: good_training_file()(here)[:2] + ["-o", "/proc/m.nft"], ("-o", "/proc", "not writable")),
    "cutoff 1 Å to train": (good_training_file("--cutoff", "1.0"), ("--cutoff", "nearest neighbours", "2.69 Å")),
    "cutoff 0.5 Å to train": (good_training_file("--cutoff", "0.5"), ("--cutoff", "> 0.5 Å")),
    "cutoff 1e6 Å to train": (good_training_file("--cutoff", "1e6"), ("--cutoff", "sphere", "at most 100,000")),
    "no LM steps to train": (good_training_file("--lm-steps", "0"), ("--lm-steps", "trains nothing")),
    "no LM steps to train, by the former name": (good_training_file("--lm", "0"), ("--lm-steps", "trains nothing")),
    "LM steps by both names": (good_training_file("--lm-steps", "3", "--lm", "4"), ("--lm-steps", "given twice", "--lm")),
    # nft evaluate
    "junk model file": (model_file(junk=True), ("model.nft",)),
    "model with NaN weights": (diverged_model, ("model.nft", "not finite")),
    "model header asks for a huge network": (model_file(header_hidden=[100_000_000]), ("model.nft", "out of bounds")),
    "unknown reference": (evaluate_structure(rattled_cluster(), reference="vasp"), ("--parent", "vasp")),
    "bad parent option to evaluate": (
        lambda here: evaluate_structure(rattled_cluster())(here) + ["--parent-option", "retries=-1"],
        ("--parent-option retries", "integer >= 0"),
    ),
    "element the reference lacks to evaluate": (evaluate_structure(iron_cluster()), ("probe.traj", "emt parent has no parameters for Fe")),
    "NaN positions to evaluate": (evaluate_structure(nan_positions()), ("probe.traj", "not finite")),
    "second file missing to evaluate": (evaluate_files([rattled_cluster()], None), ("probe1.traj", "not found")),
    "second file unreadable to evaluate": (junk_file_second, ("probe1.traj", "not a readable structure file")),
    "NaN positions in a second file's image 1": (
        evaluate_files([rattled_cluster()], [rattled_cluster(), nan_positions()]),
        ("probe1.traj", "image 1", "not finite"),
    ),
    "element the model lacks in a second file's image 2": (
        evaluate_files([rattled_cluster()], [rattled_cluster(), rattled_cluster(), copper_atom(rattled_cluster())]),
        ("probe1.traj", "image 2", "Cu", "not in the model"),
    ),
    # nft locality
    "locality structure missing": (locality(structure="missing"), ("structure.traj", "file not found")),
    "locality structure unreadable": (locality(structure="junk"), ("structure.traj", "not a readable structure file")),
    "locality NaN positions": (locality(structure="nan"), ("structure.traj", "image 0", "not finite")),
    "locality structure is a folder": (locality(structure="folder"), ("structure.traj", "is a folder")),
    "locality element EMT lacks": (locality(structure="iron"), ("structure.traj", "emt parent has no parameters for Fe")),
    "locality element the config's parent lacks": (locality(structure="iron", config={}), ("structure.traj", "no parameters for Fe")),
    "locality radius huge on a periodic structure": (locality("--radii", "4,1e6", structure="bulk"), ("--radii", "1e+06 Å sphere")),
    "locality plot not writable": (locality("--plot", "/proc/plot.png"), ("--plot", "/proc", "not writable")),
    "locality workdir not writable": (locality("--workdir", "/proc/work"), ("--workdir", "not writable")),
    "locality unknown calculator": (locality("--parent", "vasp"), ("--parent", "vasp", "emt, gpaw")),
    "locality no calculator": (locality(config="neither"), ("--parent", "required", "--config")),
    "locality calculator and config": (locality("--parent", "emt", config={}), ("--parent", "not with --config")),
    "locality config missing": (locality(config="missing"), ("nope.toml", "no such config file")),
    "locality config with a bad parent option": (
        locality(config={"parent": {"emt": {"retries": -1}}}),
        ("config.toml", "parent.emt.retries"),
    ),
    "locality radii empty": (locality("--radii", ""), ("--radii", "comma-separated chunk radii in Å")),
    "locality radii not numbers": (locality("--radii", "4,x"), ("--radii", "'4,x'")),
    "locality radius zero": (locality("--radii", "4,0"), ("--radii", "positive number of Å")),
    "locality radius negative": (locality("--radii", "4,-6"), ("--radii", "positive number of Å")),
    "locality radius inf": (locality("--radii", "inf"), ("--radii", "positive number of Å")),
    "locality no sample atoms": (locality("--atoms", "0"), ("--atoms", ">= 1")),
    "locality tolerance zero": (locality("--tolerance", "0"), ("--tolerance", "> 0")),
    "locality tolerance negative": (locality("--tolerance", "-0.1"), ("--tolerance", "> 0")),
    "locality tolerance nan": (locality("--tolerance", "nan"), ("--tolerance", "> 0")),
    "locality negative vacuum": (locality("--vacuum", "-1"), ("--vacuum", ">= 0")),
    "locality plot not a PNG": (lambda here: locality("--plot", str(here / "plot.pdf"))(here), ("--plot", ".png")),
    "locality plot folder missing": (lambda here: locality("--plot", str(here / "no" / "plot.png"))(here), ("--plot", "does not exist")),
    "locality unknown site": (locality("--site", "nowhere"), ("--site", "nowhere")),
    "locality workdir is a file": (lambda here: locality("--workdir", str(here / "structure.traj"))(here), ("--workdir", "is a file")),
    "locality unknown parent option": (locality("--parent-option", "encut=300"), ("--parent-option encut", "unknown option")),
    "locality parent option with a config": (
        locality("--parent-option", "retries=1", config={}),
        ("--parent-option", "not with --config", "[parent.NAME]"),
    ),
    # nft initial, and [data.initial_generate]
    "initial element EMT lacks": (initial("Fe"), ("ELEMENTS", "emt", "no parameters for Fe")),
    "initial not an element": (initial("Pt,Xx"), ("ELEMENTS", "'Xx' is not a chemical symbol")),
    "initial three elements in two-atom cells": (initial("Cu,Au,Pt", "--max-atoms", "2"), ("ELEMENTS", "3 elements", "at most 2 atoms")),
    "initial three elements, a two-element space group": (
        initial("Cu,Au,Pt", "--space-groups", "123"),
        ("--space-groups", "123", "3 element(s)"),
    ),
    "initial negative random alloys": (initial("Cu,Au", "--random-alloys", "-1"), ("--random-alloys", ">= 0")),
    "initial parent option without a value": (
        initial("Pt", "--parent", "gpaw", "--parent-option", "ecut"),
        ("--parent-option", "KEY=VALUE"),
    ),
    "initial unknown parent option": (
        initial("Pt", "--parent", "gpaw", "--parent-option", "encut=300"),
        ("--parent-option encut", "unknown option"),
    ),
    "initial space group of two elements only": (initial("Pt", "--space-groups", "123"), ("--space-groups", "123")),
    "initial space group number": (initial("Pt", "--space-groups", "fcc"), ("--space-groups", "numbers")),
    "initial impossible separation": (initial("Pt", "--min-separation", "3.5"), ("--min-separation", "3.5 Å")),
    "initial zero count": (initial("Pt", "--count", "0"), ("--count", ">= 1")),
    "initial negative window": (initial("Pt", "--energy-window", "-0.1"), ("--energy-window", "> 0")),
    "initial output folder missing": (lambda here: initial("Pt", "-o", str(here / "no" / "x.traj"))(here), ("-o", "does not exist")),
    "initial output not writable": (initial("Pt", "-o", "/proc/x.traj"), ("-o", "/proc", "not writable")),
    "initial output format unknown": (lambda here: initial("Pt", "-o", str(here / "x.foo"))(here), ("-o", "x.foo", "no writer")),
    "initial output is a folder": (lambda here: initial("Pt", "-o", str(here))(here), ("-o", "is a folder")),
    "initial output format of one structure": (
        lambda here: initial("Pt", "-o", str(here / "init.poscar"))(here),
        ("-o", "init.poscar", "several structures", ".traj"),
    ),
    "initial output format without forces": (
        lambda here: initial("Pt", "-o", str(here / "init.cif"))(here),
        ("-o", "init.cif", "energies and forces"),
    ),
    "initial parent given twice": (initial("Pt", "--parent", "emt", "--calculator", "gpaw"), ("--parent", "given twice", "--calculator")),
    "initial fewer atoms allowed than required": (initial("Pt", "--min-atoms", "20"), ("--max-atoms", "min_atoms 20")),
    "initial space group 0 in a list": (initial("Pt", "--space-groups", "225,0"), ("--space-groups: must be >= 1",)),
    "initial unknown site": (initial("Pt", "--site", "nowhere"), ("--site", "nowhere")),
    "initial and initial_generate": (campaign({"data": {"initial_generate": {"count": 4}}}), ("config.toml", "data", "exactly one")),
    "neither initial nor initial_generate": (campaign({"data": {"initial": None}}), ("config.toml", "data", "exactly one")),
    "generate an element EMT lacks": (generated_campaign(iron_cluster()), ("data.initial_generate.elements", "Fe")),
    "generate without the targets' element": (generated_campaign(elements=["Cu"]), ("data.targets", "Pt")),
    "generate zero count": (generated_campaign(count=0), ("data.initial_generate.count", ">= 1")),
    "generate negative random alloys": (generated_campaign(random_alloys=-1), ("data.initial_generate.random_alloys", ">= 0")),
    "generate impossible separation": (generated_campaign(min_separation=9.0), ("data.initial_generate.min_separation", "9 Å")),
    # nft relax (a trained campaign without a model: tests/test_relax.py)
    "relax structure missing": (relax(structure="missing"), ("structure.traj", "file not found")),
    "relax unknown optimizer": (relax("--relax-optimizer", "SD"), ("--relax-optimizer", "BFGS, FIRE, LBFGS", "'SD'")),
    "relax fmax zero": (relax("--fmax", "0"), ("--fmax", "positive")),
    "relax fmax negative": (relax("--fmax", "-0.1"), ("--fmax", "positive")),
    "relax fmax nan": (relax("--fmax", "nan"), ("--fmax", "positive")),
    "relax steps negative": (relax("--steps", "-1"), ("--steps", "0 or more")),
    "relax element not in the campaign": (relax(structure="copper"), ("structure.traj", "element(s) Cu not in", "initial set (Pt)")),
    "relax output format unknown": (relax(output="relaxed.unknownformat"), ("-o", "relaxed.unknownformat", "no writer")),
    "relax campaign never run": (relax(), ("config.toml", "campaign.database", "nft run")),
    "relax element EMT lacks": (relax(structure="iron"), ("structure.traj", "emt parent has no parameters for Fe")),
    "relax output not writable": (relax(output="/proc/x.traj"), ("-o", "/proc", "not writable")),
    "relax with a changed model file": (relax_with_a_changed_model, ("iteration-001.nft",)),
    # nft status
    "status without a database": (status_of_missing_database, ("nft.db",)),
    # nft report
    "report without a database": (report_of_missing_database, ("config.toml", "campaign.database", "nft.db")),
    "report config missing": (lambda here: ["report", str(here / "nope.toml")], ("nope.toml", "no such config file")),
    "report output is a file": (report_into_a_file, ("-o", "taken", "is a file")),
    "export into a missing folder": (
        lambda here: ["export", str(write_campaign(here / "campaign")), "-o", str(here / "missing" / "set.extxyz")],
        ("-o", "missing", "does not exist"),
    ),
    "export into a folder": (lambda here: ["export", str(write_campaign(here / "campaign")), "-o", str(here)], ("-o", "is a folder")),
    "export into a file not named extxyz": (
        lambda here: ["export", str(write_campaign(here / "campaign")), "-o", str(here / "set.traj")],
        ("-o", "set.traj", "extxyz"),
    ),
    # nft init and nft check
    "init over an existing config": (init_config(existing=True), ("-o", "campaign.toml", "exists")),
    "init a config not named .toml": (init_config("-o", "campaign.yaml"), ("-o", "campaign.yaml", "TOML")),
    "init a missing target": (init_config(target="missing"), ("target.traj", "not found")),
    "init a target EMT lacks": (init_config(target="iron"), ("target.traj", "no parameters for Fe")),
    "init an unknown parent": (init_config("--parent", "vasp"), ("--parent", "vasp", "emt, gpaw")),
    "init a target too small for the chunk radius": (init_config(target="dimer"), ("campaign.toml", "chunks.radius")),
    "check a missing config": (lambda here: ["check", str(here / "nope.toml")], ("nope.toml", "no such config file")),
    "check an unknown key": (
        lambda here: ["check", str(write_campaign(here / "campaign", {"model": {"epoch": 3}}))],
        ("model.epoch", "unknown key"),
    ),
    "check an unknown site": (lambda here: ["check", str(write_campaign(here / "campaign", {"site": {"name": "nowhere"}}))], ("nowhere",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_before_anything_is_written(case, tmp_path):
    make, needles = CASES[case]
    arguments = make(tmp_path)
    before = disk_state(tmp_path)
    result = CliRunner().invoke(app, arguments)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert len(lines) == 1, f"{case}: {result.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{case}: {needle!r} not in {lines[0]!r}"
    assert disk_state(tmp_path) == before, f"{case}: files changed"


def test_passwords_are_masked_in_messages_and_the_stored_config(tmp_path):
    from pipeline.campaign.config import load_config
    from pipeline.storage.engine import mask_password

    assert mask_password("postgresql://me:secret@db.example:5432/nft") == "postgresql://me:***@db.example:5432/nft"
    assert mask_password("sqlite:///nft.db") == "sqlite:///nft.db"
    pytest.importorskip("psycopg")
    config = write_campaign(tmp_path / "campaign", {"campaign": {"database": "postgresql://me:secret@127.0.0.1:1/nft"}})
    stored = json.dumps(load_config(config).as_dict())
    assert "secret" not in stored and "me:***@127.0.0.1:1/nft" in stored


@pytest.mark.timeout(30)
def test_a_huge_radius_is_searched_at_once_or_refused_never_hangs():
    """Issue 25, item 4: `chunks.radius = 1e6` hung in the neighbour search (its C loop never saw
    SIGTERM). A non-periodic structure is searched no further than its extent, so the chunk is the
    whole structure at once; a periodic one is refused before the search with the reason."""
    import time

    from pipeline.science.chunks import carve_chunk
    from pipeline.science.neighbours import neighbour_pairs

    cluster = rattled_cluster()
    started = time.perf_counter()
    chunk = carve_chunk(cluster, 0, 1e6)
    pairs = neighbour_pairs(cluster, 1e6)
    assert time.perf_counter() - started < 2.0
    assert len(chunk.atoms) == len(cluster) and sorted(chunk.parent_indices) == list(range(len(cluster)))
    assert len(pairs.centers) == len(cluster) * (len(cluster) - 1)
    for search in (lambda: carve_chunk(periodic_platinum(), 0, 1e6), lambda: neighbour_pairs(periodic_platinum(), 1e6)):
        with pytest.raises(ValueError, match="1e\\+06 Å sphere"):
            search()
