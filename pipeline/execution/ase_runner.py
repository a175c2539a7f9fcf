"""One reference calculation by an ASE calculator as its own process:
``python -m pipeline.execution.ase_runner IN OUT``, in the job's directory.

IN is the JSON written by `AseProcessParent.calculate` (the parent's name, its complete options and
the structure's payload); OUT gets energy (eV) and forces (eV/Å), or ``{"error": reason}`` and exit
code 3 when the calculation failed (an SCF that did not converge, a calculator that raised).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m pipeline.execution.ase_runner IN.json OUT.json", file=sys.stderr)
        return 2
    input_file, result_file = argv
    with open(input_file) as stream:
        job = json.load(stream)

    from pipeline.execution.parents import ReferenceFailed, parent_for
    from pipeline.execution.parents.ase_process import AseProcessParent
    from pipeline.storage.atomic import write_text_atomically

    parent = parent_for(job["parent"], job["params"])
    assert isinstance(parent, AseProcessParent)
    try:
        energy, forces = parent.compute_here(job["payload"])
        result: dict = {"energy": energy, "forces": forces.tolist()}
        exit_code = 0
    except ReferenceFailed as failure:
        result, exit_code = {"error": failure.reason}, 3
    except Exception as error:  # the calculator raised: its message is the reason
        result, exit_code = {"error": f"{type(error).__name__}: {error}".strip().rstrip(":")}, 3
    write_text_atomically(result_file, json.dumps(result))
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
