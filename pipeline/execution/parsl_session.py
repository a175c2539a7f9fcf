"""A Parsl session: Parsl loaded for a `with` block and stopped in bounded time whatever ended first.

`parsl_session(config)` always cleans up, also when a signal to the driver's process group has ended
an interchange; each interchange ends with the driver, and a run directory whose path the shell
would split is reached through a private alias.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import parsl
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

from pipeline.errors import RunFailed
from pipeline.execution.sites import PARSL_DIR_NAME, WATCHDOG_PERIOD_S, SiteError


CLEANUP_S = 20.0
"""Longest wait for Parsl's own clean-up; after it the interchanges are killed and the blocks cancelled."""
INTERCHANGE_POLL_S = 0.5
"""How often a session checks that its interchanges are alive."""
INTERCHANGE_ANSWER_S = 2.0
"""How long an interchange may take to answer before the clean-up gives it up (dying, or stopped)."""
SAFE_ALIAS_PREFIX = "nft-parsl-"
"""Name prefix of the private temporary folder that holds a run directory's alias (`_shell_safe_run_dir`)."""

logger = logging.getLogger("parsl.nft")  # a child of Parsl's logger: lines go to runinfo/NNN/parsl.log


class InterchangeEnded(RunFailed):
    """A Parsl interchange ended while its session was open: its executor's jobs fail with this."""


@contextmanager
def parsl_session(config: Config) -> Iterator[DataFlowKernel]:
    """Load Parsl with `config` for a `with` block; on exit clean up its executors and clear it.

    This interpreter's bin directory goes on PATH first: Parsl starts its interchange and workers
    by command name, which fails when nft is run by absolute path without its venv on PATH. Each
    interchange ignores SIGINT and ends with this process (`interchange_command`); one that ends
    while the session is open fails its executor's jobs (`InterchangeEnded`) instead of leaving
    them waiting forever. The clean-up takes at most `CLEANUP_S` (`stop_parsl`).
    """
    interpreter_bin = str(Path(sys.executable).parent)
    if interpreter_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, [interpreter_bin, os.environ.get("PATH")]))
    with _shell_safe_run_dir(config), _interchanges_ending_with_driver(config):
        dfk = parsl.load(config)
        watch = _InterchangeWatch(_interchange_executors(config.executors))
        try:
            yield dfk
        finally:
            watch.stop()
            stop_parsl(dfk)


def interchange_command(command: Sequence[str], driver_pid: int) -> list[str]:
    """`command` (an executor's interchange launch command) run so that the interchange ignores
    SIGINT and is killed within `WATCHDOG_PERIOD_S` of the driver's death, even by SIGKILL.

    A terminal's Ctrl-C signals the whole process group: the driver then stops Parsl in order, which
    needs the interchange alive. And Parsl's interchange does not watch its parent: a killed driver
    would leave it listening, and holding the caller's stdout, for minutes.
    """
    script = (
        "trap '' INT; "
        f"( while kill -0 $$ 2>/dev/null; do kill -0 {int(driver_pid)} 2>/dev/null || kill -KILL $$; "
        f"sleep {WATCHDOG_PERIOD_S}; done ) </dev/null >/dev/null 2>&1 & "
        'exec "$@"'
    )
    return ["/bin/sh", "-c", script, "nft-interchange", *command]


def stop_parsl(dfk: DataFlowKernel) -> None:
    """Parsl's clean-up of `dfk`, waited for at most `CLEANUP_S`, then Parsl cleared.

    An executor whose interchange has ended or does not answer within `INTERCHANGE_ANSWER_S` (a
    signal to the process group) is given up first: Parsl would wait forever for its answer to the
    scale-in. Should the clean-up still not finish in time, the interchanges are killed and the
    blocks cancelled directly.
    """
    executors = _interchange_executors(dfk.executors.values())
    for executor in executors:
        if executor.bad_state_is_set or executor.interchange_proc is None:
            continue
        reason = _interchange_ended(executor) or _unanswered(executor)
        if reason is not None:
            _give_up(executor, reason)
    cleaner = threading.Thread(target=dfk.cleanup, name="nft-parsl-cleanup", daemon=True)
    cleaner.start()
    try:
        cleaner.join(CLEANUP_S)
    finally:
        if cleaner.is_alive():
            logger.warning("Parsl's clean-up did not finish in %.0f s: killing interchanges, cancelling blocks", CLEANUP_S)
            for executor in executors:
                _kill_interchange_and_blocks(executor)
        parsl.clear()


def _interchange_executors(executors: Any) -> list[HighThroughputExecutor]:
    """The executors among `executors` that run an interchange (HighThroughputExecutor, MPIExecutor)."""
    return [executor for executor in executors if isinstance(executor, HighThroughputExecutor)]


def _interchange_ended(executor: HighThroughputExecutor) -> str | None:
    """How the executor's interchange ended ("killed by SIGTERM", "exit code 1"), None while it runs."""
    process = executor.interchange_proc
    if process is None or process.poll() is None:
        return None
    code = process.returncode
    return f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _unanswered(executor: HighThroughputExecutor) -> str | None:
    """ "no answer in N s" when the executor's interchange does not answer a command in time, else None."""
    try:
        executor.command_client.run("WORKER_BINDS", timeout_s=INTERCHANGE_ANSWER_S)
    except Exception:  # a timeout, or a command channel already broken
        return f"no answer in {INTERCHANGE_ANSWER_S:g} s"
    return None


def _give_up(executor: HighThroughputExecutor, reason: str) -> None:
    """Fail the executor's jobs (`InterchangeEnded` with `reason`), kill its interchange, cancel its blocks."""
    executor.set_bad_state_and_fail_all(InterchangeEnded(f"Parsl's interchange of executor {executor.label!r} ended ({reason})"))
    _kill_interchange_and_blocks(executor)


def _cancel_blocks(executor: HighThroughputExecutor) -> None:
    """Cancel the executor's blocks through its provider (bounded by the provider's command timeout)."""
    job_ids = list(executor.blocks_to_job_id.values())
    if executor.provider is None or not job_ids:
        return
    try:
        executor.provider.cancel(job_ids)
    except Exception:  # a block already gone, a scheduler that does not answer: logged, not fatal
        logger.exception("cancelling the blocks of executor %s failed", executor.label)


def _kill_interchange_and_blocks(executor: HighThroughputExecutor) -> None:
    process = executor.interchange_proc
    if process is not None and process.poll() is None:
        process.kill()
        try:
            process.wait(timeout=WATCHDOG_PERIOD_S)
        except subprocess.TimeoutExpired:
            logger.warning("interchange %s did not end after SIGKILL", process.pid)
    _cancel_blocks(executor)


class _InterchangeWatch:
    """A thread that gives up an executor whose interchange ends while the session is open, so
    that its jobs fail with the reason instead of being waited for forever.

    It waits one more poll before acting: a signal to the whole process group reaches the driver
    too, and its own interruption (which stops the watch) is the better report.
    """

    def __init__(self, executors: list[HighThroughputExecutor]) -> None:
        self.executors = executors
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nft-interchange-watch", daemon=True)
        if executors:
            self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(INTERCHANGE_POLL_S):
            ended = [executor for executor in self.executors if _interchange_ended(executor) is not None]
            if ended and not self._stopping.wait(INTERCHANGE_POLL_S):
                for executor in ended:
                    _give_up(executor, _interchange_ended(executor) or "ended")
                self.executors = [executor for executor in self.executors if executor not in ended]

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CLEANUP_S)


@contextmanager
def _interchanges_ending_with_driver(config: Config) -> Iterator[None]:
    """Each interchange of `config` launched by `interchange_command` for this process; the config's
    own launch commands are put back afterwards."""
    executors = _interchange_executors(config.executors)
    originals = [executor.interchange_launch_cmd for executor in executors]
    for executor, command in zip(executors, originals):
        executor.interchange_launch_cmd = interchange_command(command, os.getpid())
    try:
        yield
    finally:
        for executor, command in zip(executors, originals):
            executor.interchange_launch_cmd = command


@contextmanager
def _shell_safe_run_dir(config: Config) -> Iterator[None]:
    """Parsl puts paths under its run directory unquoted into shell commands (a local block's
    launch line, the worker pool's --logdir and --cert_dir): a path with a space, a quote or any
    non-ASCII character breaks them. Such a run directory is given to Parsl as an alias, a symlink
    with a plain name in a fresh private (0700) temporary folder, removed afterwards.

    Blocks off this host could not reach that alias: a site with such blocks is refused (SiteError).
    """
    run_dir = os.path.abspath(config.run_dir)
    if shlex.quote(run_dir) == run_dir:
        yield
        return
    remote = [
        executor.label
        for executor in config.executors
        if (provider := getattr(executor, "provider", None)) is not None and not isinstance(provider, LocalProvider)
    ]
    if remote:
        raise SiteError(
            f"executor {remote[0]!r} runs off this host, where Parsl's launch commands break on the "
            f"spaces or special characters of the workdir path {run_dir!r}: use a plain workdir path"
        )
    alias_dir = tempfile.mkdtemp(prefix=SAFE_ALIAS_PREFIX, dir=_shell_safe_temp_dir())
    alias = os.path.join(alias_dir, PARSL_DIR_NAME)
    os.makedirs(run_dir, exist_ok=True)
    os.symlink(run_dir, alias)
    original = config.run_dir
    config.run_dir = alias
    try:
        yield
    finally:
        config.run_dir = original
        shutil.rmtree(alias_dir, ignore_errors=True)  # removes the link, not what it points to


def _shell_safe_temp_dir() -> str:
    """The temporary folder, or /tmp when its path would need quoting too."""
    temporary = tempfile.gettempdir()
    return temporary if shlex.quote(temporary) == temporary else "/tmp"
