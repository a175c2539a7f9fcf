"""One GPAW reference calculation as an MPI program: ``gpaw python -m pipeline.execution.gpaw_runner IN OUT``.

IN is the JSON written by `GpawParent.run` (payload, complete options, log name, and for a cell
relaxation its `relax_cell` = {fmax, steps}); rank 0 writes OUT with energy (eV, the free energy that
the forces derive from) and forces (eV/Å) (after a cell relaxation also `final_positions` and
`final_cell`, Å), or ``{"error": reason}`` and exit code 3 when GPAW raised (SCF not converged, bad input).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gpaw python -m pipeline.execution.gpaw_runner IN.json OUT.json", file=sys.stderr)
        return 2
    input_file, result_file = argv
    with open(input_file) as stream:
        job = json.load(stream)

    from gpaw import GPAW
    from gpaw.mpi import world

    from pipeline.execution.parents.gpaw import GpawParent

    try:
        atoms, kwargs = GpawParent.model_validate(job["params"]).setup(job["payload"], txt=job["txt"])
        relax = job.get("relax_cell")
        if relax:
            from pipeline.science.initial_sets import relax_cell

            atoms, _, _, _ = relax_cell(atoms, GPAW(**kwargs), relax["fmax"], relax["steps"])
        else:
            atoms.calc = GPAW(**kwargs)
        forces = atoms.get_forces()
        energy = atoms.get_potential_energy(force_consistent=True)
        result = {"energy": float(energy), "forces": forces.tolist(), "ranks": world.size}
        if relax:
            result.update(final_positions=atoms.positions.tolist(), final_cell=atoms.cell.array.tolist())
        exit_code = 0
    except Exception as error:
        result = {"error": describe_failure(error, job["params"])}
        exit_code = 3
    if world.rank == 0:
        from pipeline.storage.atomic import write_text_atomically

        write_text_atomically(result_file, json.dumps(result))
    return exit_code


def describe_failure(error: Exception, params: dict) -> str:
    """One line for the database: the exception, and for SCF trouble what limit was hit."""
    text = f"{type(error).__name__}: {error}".strip().rstrip(":")
    if "ConvergenceError" in type(error).__name__:
        text += f" (SCF did not converge within maxiter={params.get('maxiter')} iterations)"
    return text


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
