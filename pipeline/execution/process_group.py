"""Run an external command (an MPI launcher and its ranks) as one process group that can be stopped
whole: at a walltime, or when the calling worker dies. Not tied to any one parent code."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_process_group(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float | None) -> tuple[int | None, str, str]:
    """Run `command` in its own process group; past `timeout_s` stop the whole group (launcher and
    ranks: SIGTERM, then SIGKILL). Returns (exit code or None on timeout, stdout, stderr).

    A sidecar in the group (`caller_watchdog`) kills the group when this process dies, so a worker
    killed with its driver leaves no MPI job computing."""
    process = subprocess.Popen(
        caller_watchdog(command, os.getpid()),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=5.0)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        return None, stdout or "", stderr or ""
    finally:
        _signal_group(process.pid, signal.SIGKILL)  # ranks the launcher left behind
        if process.poll() is None:
            process.wait()


def caller_watchdog(command: list[str], caller_pid: int, period_s: int = 1) -> list[str]:
    """`command` behind a shell that first starts a sidecar in the job's process group: every
    `period_s` it checks that `caller_pid` lives, and when it is gone it SIGKILLs the whole group
    (the launcher and its ranks). The shell then execs `command`, which keeps the group's pid."""
    sidecar = (
        f"( while kill -0 {int(caller_pid)} 2>/dev/null; do sleep {int(period_s)}; done; "
        "kill -KILL -- -$$ ) </dev/null >/dev/null 2>&1 & exec \"$@\""
    )
    return ["bash", "-c", sidecar, "nft-job", *command]


def _signal_group(group_id: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group_id, sig)
    except (ProcessLookupError, PermissionError):
        pass
