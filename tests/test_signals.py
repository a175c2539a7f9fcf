"""Signals stop `nft run` within seconds and leave nothing of the campaign running.

A terminal's Ctrl-C, `timeout` and many batch systems signal the driver's whole process group, which
holds Parsl's interchange too; a SIGKILL of the driver alone must not orphan the interchange. Each test
runs a real `nft run` on a tiny EMT campaign (its own session, as `setsid nft run` would) and signals
it while training is in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.campaign.config import load_config
from tests.plugins.campaign_fixtures import NFT, default_stop_signals, processes_using, run_nft
from tests.test_resume import campaign_processes, kill_workers_of

pytestmark = pytest.mark.timeout(240)

STOPS_WITHIN_S = 10.0
"""A signalled run must have exited this soon."""
NOTHING_LEFT_WITHIN_S = 5.0
"""After the driver's exit, every process of the campaign must be gone this soon (watchdogs poll every second)."""
INTERRUPTED = "interrupted: run the same command again to resume"
ONE_ITERATION = {"active": {"max_iterations": 1}}


def start_nft_run(config: Path) -> subprocess.Popen:
    """`nft run CONFIG` in a session of its own (the group a terminal would signal)."""
    return subprocess.Popen(
        NFT + ["run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_stop_signals,
    )


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float = 120) -> list[str]:
    """Read the run's stdout until a line contains `text`; the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < deadline, f"no {text!r} line in time:\n{''.join(lines)}"
    raise AssertionError(f"nft run ended before {text!r}:\n{''.join(lines)}{process.stderr.read()}")


def left_running(workdir: Path) -> set[int]:
    """Pids of the campaign's processes still alive: worker pools, workers, their children, the interchange."""
    return campaign_processes(workdir) | processes_using(workdir)


def wait_until_nothing_left(workdir: Path, timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := left_running(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def stop_and_wait(process: subprocess.Popen, workdir: Path, send: Callable[[], None]) -> tuple[str, float, set[int]]:
    """`send()` a signal, wait for `nft run` to exit: its stderr, the seconds it took, and the
    campaign's processes still alive `NOTHING_LEFT_WITHIN_S` later."""
    sent = time.monotonic()
    send()
    _, stderr = process.communicate(timeout=60)
    seconds = time.monotonic() - sent
    return stderr, seconds, wait_until_nothing_left(workdir, NOTHING_LEFT_WITHIN_S)


def kill_everything(process: subprocess.Popen, workdir: Path) -> None:
    """Cleanup after a failed assertion: the run's group, then whatever of the campaign is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()
    kill_workers_of(workdir)
    for pid in processes_using(workdir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: signal.Signals(s).name)
def test_a_signal_to_the_process_group_stops_the_run_and_everything_it_started(small_campaign, signum):
    config = small_campaign(ONE_ITERATION)
    workdir = load_config(config).workdir
    process = start_nft_run(config)
    try:
        wait_for_line(process, "training")
        time.sleep(1.0)  # the training job is on a worker
        assert campaign_processes(workdir), "no worker pool running: nothing to test"
        stderr, stopped_after, alive = stop_and_wait(process, workdir, lambda: os.killpg(process.pid, signum))
    finally:
        kill_everything(process, workdir)
    print(f"\n{signal.Signals(signum).name} to the group: nft run exited {process.returncode} after {stopped_after:.1f} s")
    assert process.returncode == 130, stderr
    assert INTERRUPTED in stderr and "Traceback" not in stderr, stderr
    assert stopped_after < STOPS_WITHIN_S
    assert not alive, f"still running {NOTHING_LEFT_WITHIN_S} s after the driver's exit: {sorted(alive)}"

    resumed = run_nft("run", config)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["stop_reason"] == "max_iterations"


def test_sigkill_of_the_driver_alone_ends_the_interchange_and_releases_its_stdout(small_campaign):
    config = small_campaign(ONE_ITERATION)
    workdir = load_config(config).workdir
    process = start_nft_run(config)
    try:
        wait_for_line(process, "training")
        time.sleep(1.0)
        assert processes_using(workdir) - {process.pid}, "no interchange or worker running: nothing to test"
        closed = threading.Event()
        reader = threading.Thread(target=lambda: (process.stdout.read(), closed.set()), daemon=True)
        reader.start()
        killed = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        released = closed.wait(timeout=NOTHING_LEFT_WITHIN_S)
        released_after = time.monotonic() - killed
        alive = wait_until_nothing_left(workdir, NOTHING_LEFT_WITHIN_S)
    finally:
        kill_everything(process, workdir)
    print(f"\nSIGKILL of the driver: its stdout closed by every holder after {released_after:.1f} s")
    assert released, f"the driver's stdout still held open {NOTHING_LEFT_WITHIN_S} s after its SIGKILL"
    assert not alive, f"still running {NOTHING_LEFT_WITHIN_S} s after the driver's SIGKILL: {sorted(alive)}"


def test_an_interchange_killed_alone_fails_the_run_in_one_line_and_leaves_nothing(small_campaign):
    """Only the interchange is killed (an OOM killer, a stray `kill`): the driver must not wait
    forever for the training job it was running."""
    config = small_campaign(ONE_ITERATION)
    workdir = load_config(config).workdir
    process = start_nft_run(config)
    try:
        wait_for_line(process, "training")
        time.sleep(1.0)
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as handle:
            children = [int(pid) for pid in handle.read().split()]
        interchange = [pid for pid in children if b"interchange" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(interchange) == 1, children
        stderr, failed_after, alive = stop_and_wait(process, workdir, lambda: os.kill(interchange[0], signal.SIGKILL))
    finally:
        kill_everything(process, workdir)
    print(f"\nSIGKILL of the interchange alone: nft run exited {process.returncode} after {failed_after:.1f} s")
    assert process.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interchange" in lines[0] and "SIGKILL" in lines[0], stderr
    assert failed_after < STOPS_WITHIN_S
    assert not alive, f"still running {NOTHING_LEFT_WITHIN_S} s after the driver's exit: {sorted(alive)}"


@pytest.mark.parametrize("delay_s", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_a_signal_while_nft_starts_exits_130_with_the_message(tmp_path, signum, delay_s):
    """A signal while nft is still importing (before any command runs) exits 130 with the message,
    not a traceback or a silent death by the signal; `nft status` of a missing config would exit 2."""
    process = subprocess.Popen(
        NFT + ["status", str(tmp_path / "missing.toml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_stop_signals,
    )
    time.sleep(delay_s)
    os.killpg(process.pid, signum)
    try:
        stdout, stderr = process.communicate(timeout=STOPS_WITHIN_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    if process.returncode == 2:  # the command had already refused the config: the signal came after it
        return
    assert process.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1] == INTERRUPTED, stderr
    assert "Traceback" not in stderr, stderr
