"""A real PostgreSQL server for the tests: Debian's initdb and pg_ctl in a temporary directory, on
127.0.0.1 and a free port, run as an unprivileged user (the server refuses root), stopped and removed
at the end of the session. Tests that need it skip, saying why, only where no server binaries exist."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_USER = "nobody"
"""The unprivileged account that runs the server when the tests run as root."""
DATABASE_USER = "nft"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class PostgresServer:
    port: int
    directory: Path

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of a database on this server (psycopg driver, trust authentication)."""
        return f"postgresql+psycopg://{DATABASE_USER}@127.0.0.1:{self.port}/{database}"


def _binaries() -> Path | None:
    """The bin directory of the newest PostgreSQL server installed the Debian way, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (fsync off: test data need not survive a crash)."""
    binaries = _binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb); apt-get install postgresql")
    directory = Path(tempfile.mkdtemp(prefix="nft-postgresql-"))
    data = directory / "data"
    if os.geteuid() == 0:
        shutil.chown(directory, SERVER_USER)
    port = _free_port()
    pg_ctl = str(binaries / "pg_ctl")
    try:
        subprocess.run(
            _as_server_user(
                [str(binaries / "initdb"), "-D", str(data), "-U", DATABASE_USER, "--auth=trust", "-E", "UTF8", "--no-instructions"]
            ),
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        options = f"-h 127.0.0.1 -p {port} -k {directory} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        subprocess.run(
            _as_server_user(
                [pg_ctl, "-D", str(data), "-o", options, "-l", str(directory / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "start"]
            ),
            check=True,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 30,
        )
    except subprocess.CalledProcessError as error:
        log = directory / "server.log"
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {error.stderr or error.stdout}{log.read_text() if log.exists() else ''}") from None
    try:
        yield PostgresServer(port, directory)
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)


_database_numbers = itertools.count(1)


@pytest.fixture
def postgresql_url(postgresql_server: PostgresServer) -> str:
    """The URL of a new, empty database on the session's server (one per test)."""
    import psycopg

    name = f"nft_test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(
        f"host=127.0.0.1 port={postgresql_server.port} user={DATABASE_USER} dbname=postgres", autocommit=True
    ) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return postgresql_server.url(name)
