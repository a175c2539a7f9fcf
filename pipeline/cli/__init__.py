"""The `nft` command: argument parsing, printing and exit codes only."""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any

INTERRUPTED_EXIT_CODE = 130
INTERRUPTED_MESSAGE = "interrupted: run the same command again to resume"
STOP_SIGNALS = tuple(stop for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(stop) is not signal.SIG_IGN)
"""Signals that stop any command the way Ctrl-C does: a terminal's Ctrl-C or a closed session, and
`kill` or `timeout`, often sent to the whole process group. A signal the caller ignores stays
ignored (`nohup nft run …` must outlive the session; a shell's background job ignores Ctrl-C)."""


def _exit_at_once(signum: int, frame: Any) -> None:
    """Before a command starts (imports) and after it ended (interpreter shutdown) there is nothing
    to clean up: say so and exit 130 at once, instead of a traceback or a silent death by signal."""
    print(INTERRUPTED_MESSAGE, file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT_CODE)


def _raise_interrupt(signum: int, frame: Any) -> None:
    """While a command runs, a stopping signal unwinds it like Ctrl-C (Parsl and files cleaned up on
    the way out; `common.exit_codes` then exits 130)."""
    raise KeyboardInterrupt


_handles_signals = os.path.basename(sys.argv[0]) == "nft"
"""Whether this process is the `nft` command (its console script, or `main`), whose signal handlers
nft sets; a process that only imports the CLI (pytest's CliRunner, a notebook) keeps its own."""


def stop_at_once() -> None:
    """In the `nft` command, from now on a stopping signal exits 130 at once: before a command runs
    and after it ended."""
    if not _handles_signals:
        return
    for stop in STOP_SIGNALS:
        signal.signal(stop, _exit_at_once)


stop_at_once()  # first, so that a signal during the imports below exits 130 too

import typer  # noqa: E402

PRIVATE_BITS = 0o022
"""Never group- or world-writable: whatever the user's umask, nft's folders, model files and the
scripts Parsl runs with bash are writable by their owner only (a umask of 000 would let any local
user swap a model or a submit script)."""
os.umask(os.umask(PRIVATE_BITS) | PRIVATE_BITS)  # tighten, never loosen: the umask can only be read by setting it

app = typer.Typer(
    name="nft",
    help="Nearsighted Force Training of machine-learned interatomic potentials.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        from pipeline import __version__

        print(f"nft {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
) -> None:
    """Nearsighted Force Training of machine-learned interatomic potentials."""


def main() -> None:
    """The `nft` entry point: the command runs with stopping signals unwinding it (exit 130); then
    the exit handlers run and the process ends at once with the command's exit code. Python's own
    finalisation is skipped: it puts the default handlers back first, so a late Ctrl-C or SIGTERM
    would kill the process by the signal instead of exiting 130, and a stray non-daemon thread
    could keep it alive."""
    global _handles_signals
    _handles_signals = True
    for stop in STOP_SIGNALS:
        signal.signal(stop, _raise_interrupt)
    try:
        app()
        code = 0
    except SystemExit as ended:
        code = _exit_status(ended.code)
    stop_at_once()
    atexit._run_exitfuncs()  # what Python would run on exit (logging's flush, libraries' clean-ups)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_status(code: object) -> int:
    """The exit status `sys.exit(code)` gives: 0 for None, the number, else 1 with the text on stderr."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


from pipeline.cli import _register  # noqa: E402,F401  (attaches the subcommands)
