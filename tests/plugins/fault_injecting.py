"""Test-only fault injection, named as such: `FaultInjectingParent` is EMT that, with set
probabilities, raises, exits its worker process, hangs past its walltime, or returns NaN or absurd
forces; and `fault_injecting_env`, the environment in which `nft run` (driver and Parsl workers)
knows it as ``[parent] calculator = "fault-injecting"``.

An attempt's fault is decided by (seed, geometry, attempt): a run is reproducible, and a retry of
the same job (the next attempt) draws again, so it can succeed. A `schedule` of faults goes first:
the first attempts of the run, in the order the workers start them (a locked counter file), take
its faults one by one whatever the geometry, so a test sees every kind however the model chose its
chunks.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pytest
from pydantic import Field, model_validator

from pipeline.execution.parents import PARENTS
from pipeline.execution.options import NonNegativeInt, PositiveFloat, option_error, rejects
from pipeline.execution.parents.base import ReferenceFailed
from pipeline.execution.parents.emt import EmtParent

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_DIES_AFTER_S = 0.5
"""An injected worker death comes this long into the job, as a lost node's does (mid-calculation).
Within milliseconds of the worker's previous result, the death would take that result with it
(Parsl's worker hands results to a queue that a background thread flushes) and Parsl would wait for
it forever: a race of Parsl's, not a fault the campaign is meant to survive here."""
FAULTS = ("raise", "exit", "hang", "nan", "absurd")
EXIT_CODE = 17
"""The exit status of a worker the injector ends (`os._exit`)."""
ABSURD_FACTOR = 1e4
"""An absurd result: EMT's forces times this (a rattled Pt55's 2.9 eV/Å become ~3e4 eV/Å)."""

Probability = Annotated[float, Field(ge=0, le=1), rejects("must be a number in [0, 1], got {value}")]


class FaultInjectingParent(EmtParent):
    """EMT with injected faults (test-only): each attempt raises, exits, hangs, returns NaN or absurd
    forces with the given probabilities, else returns EMT's result. Faults are not physics."""

    name: ClassVar[str] = "fault-injecting"
    evaluates_targets: ClassVar[bool] = False  # the driver labels no targets itself: no fault in the driver

    raise_probability: Probability = 0.0
    exit_probability: Probability = 0.0  # the worker process ends (os._exit): Parsl reports it lost
    hang_probability: Probability = 0.0  # sleeps hang_s before computing: walltime_s must stop it
    nan_probability: Probability = 0.0  # NaN forces on every atom
    absurd_probability: Probability = 0.0  # forces × ABSURD_FACTOR, beyond max_force
    hang_s: PositiveFloat = 3600.0  # seconds a hang sleeps
    seed: NonNegativeInt = 0
    schedule: list[Literal["raise", "exit", "hang", "nan", "absurd", "none"]] = []  # the first attempts' faults
    schedule_file: str | None = None  # the counter of attempts started, shared by the workers

    @model_validator(mode="after")
    def _probabilities_add_up(self) -> FaultInjectingParent:
        if sum(self.probabilities().values()) > 1 + 1e-12:
            raise option_error(f"fault probabilities sum to {sum(self.probabilities().values()):g}, more than 1")
        if self.schedule and not self.schedule_file:
            raise option_error("a fault schedule needs schedule_file, the counter its workers share")
        return self

    def probabilities(self) -> dict[str, float]:
        """Probability of each fault per attempt, in `FAULTS` order."""
        return {fault: getattr(self, f"{fault}_probability") for fault in FAULTS}

    def scheduled_fault(self) -> str | None:
        """The schedule's next entry ('none' is no fault), or None once it is used up: the counter in `schedule_file` is read and advanced under an exclusive lock."""
        if not self.schedule:
            return None
        with open(self.schedule_file, "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)
            counter.seek(0)
            started = int(counter.read() or 0)
            counter.seek(0)
            counter.truncate()
            counter.write(str(started + 1))
        if started >= len(self.schedule):
            return None
        return self.schedule[started]

    def fault(self, payload: Mapping[str, Any], attempt: int) -> str | None:
        """The fault of this attempt at this geometry (one of `FAULTS`), or None: the schedule's next
        entry while it lasts, else a uniform draw from sha256(seed, attempt, numbers, positions)
        against the cumulative probabilities."""
        if (scheduled := self.scheduled_fault()) is not None:
            return None if scheduled == "none" else scheduled
        digest = hashlib.sha256(f"{self.seed}:{attempt}:".encode())
        digest.update(np.asarray(payload["numbers"], dtype=np.int64).tobytes())
        digest.update(np.asarray(payload["positions"], dtype=np.float64).tobytes())
        draw = int.from_bytes(digest.digest()[:8], "big") / 2**64
        bound = 0.0
        for fault, probability in self.probabilities().items():
            bound += probability
            if draw < bound:
                return fault
        return None

    def run(self, payload: Mapping[str, Any], job_dir: str | None = None, attempt: int = 1) -> dict[str, Any]:
        """EMT's result, or this attempt's fault; a NaN or absurd result goes through the same
        `checked_result` as any parent's, which refuses it."""
        start = time.perf_counter()
        fault = self.fault(payload, attempt)
        if fault == "raise":
            raise ReferenceFailed(f"{self.name}: injected failure (attempt {attempt})")
        if fault == "exit":
            time.sleep(WORKER_DIES_AFTER_S)
            os._exit(EXIT_CODE)
        if fault == "hang":
            time.sleep(self.hang_s)
        energy, forces, log_file = self.calculate(dict(payload), job_dir)
        if fault == "nan":
            forces = np.full_like(forces, np.nan)
        if fault == "absurd":
            forces = np.asarray(forces) * ABSURD_FACTOR + ABSURD_FACTOR  # no atom is left at zero force
        return self.checked_result(payload, energy, forces, start, log_file)


def register() -> None:
    """Make ``fault-injecting`` a parent in this process (before the config loader is imported)."""
    PARENTS.setdefault(FaultInjectingParent.name, FaultInjectingParent)


def fault_kind(reason: str) -> str:
    """The fault behind a failure reason: raise, exit, hang, nan or absurd (else 'other')."""
    if "injected failure" in reason:
        return "raise"
    if "WorkerLost" in reason or "lost" in reason.lower():
        return "exit"
    if "walltime" in reason:
        return "hang"
    if "non-finite" in reason:
        return "nan"
    if "exceeds max_force" in reason:
        return "absurd"
    return "other"


_SITECUSTOMIZE = '''
"""Test-only: register the fault-injecting parent in every Python process of this environment."""
from tests.plugins.fault_injecting import register

register()
'''


@pytest.fixture
def fault_injecting_env(tmp_path) -> dict[str, str]:
    """An environment for `nft` subprocesses in which the driver and its Parsl workers know the
    ``fault-injecting`` parent (a sitecustomize on PYTHONPATH registers it at interpreter start;
    the config loader builds its `[parent]` tables from `PARENTS` when first imported)."""
    hook_dir = tmp_path / "fault-injecting-hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["COLUMNS"] = "400"  # the lines nft prints stay whole, for a test to read
    return env
