"""The connection to a campaign database: URL resolution, the engine, SQLite settings, the schema check.

Any SQLAlchemy URL works; SQLite (the default) runs in WAL mode with foreign keys on and a 30 s busy
timeout, so a reader in another process never blocks the driver. Opening checks that the database is
nft's, of this schema version, or creates the schema in an empty one; a version-2 database, or a
version-1 database of one campaign, is migrated in place (a version-1 campaign's structures and jobs
join it).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, cast

import sqlalchemy.exc as sa_exc
from sqlalchemy import Connection, Engine, create_engine, event, insert, inspect, select, text, update
from sqlalchemy.engine import URL, CursorResult, Result, make_url
from sqlalchemy.pool import NullPool

from pipeline.errors import BadInput
from pipeline.storage.schema import (
    APPLICATION,
    SCHEMA_VERSION,
    STRUCTURE_KINDS,
    STRUCTURE_KINDS_V2,
    Base,
    CampaignJobRow,
    CampaignStructureRow,
    MetadataRow,
)

__all__ = ["DatabaseError", "error_reason", "open_engine", "resolve_database_url", "write_engine"]

BEGIN_OPTION = "nft_sqlite_begin"
"""Execution option naming how an SQLite transaction begins: DEFERRED (reads) or IMMEDIATE (writes)."""


class DatabaseError(BadInput):
    """The database cannot be used: missing, not a database, not nft's, or another schema version.

    A `BadInput`, so the CLI exits 2 with the one-line message (it names the file or URL)."""


class NoDatabaseYet(DatabaseError):
    """Opened without `create`: the SQLite file or the schema is not there yet (a campaign not yet
    run), as opposed to a database that cannot be reached or is not nft's."""


def resolve_database_url(url: str, workdir: str | os.PathLike[str]) -> str:
    """A relative SQLite path resolved inside `workdir`; other URLs and absolute paths unchanged."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not _is_sqlite_file(parsed):
        return url
    database = Path(parsed.database or "")
    if database.is_absolute():
        return url
    path = Path(workdir).resolve() / database
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def open_engine(url: str, *, create: bool) -> tuple[Engine, str, str | None]:
    """An engine on `url` with the schema checked (or, with `create`, made in an empty database),
    the name that messages use (the file of an SQLite database, else the URL without password), and
    a one-line note when an older database was migrated on opening (else None).

    With `create=False` a missing SQLite file is refused rather than created; any refusal is a
    one-line `DatabaseError` naming the file or URL."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise DatabaseError(f"{url}: not a valid database URL") from exc
    name = _display_name(parsed)
    if _is_sqlite(parsed) and _is_sqlite_file(parsed) and not create:
        if not Path(parsed.database or "").is_file():
            raise NoDatabaseYet(f"{name}: no such database file")
    engine = _make_engine(parsed)
    try:
        version = _open_schema(engine, name, create)
        note = _migrate(engine, name) if version in MIGRATABLE_VERSIONS else None
        _use_wal(engine, name, parsed)
    except BaseException:
        engine.dispose()
        raise
    return engine, name, note


def write_engine(engine: Engine) -> Engine:
    """The same engine, whose SQLite transactions take the write lock up front (a read-then-write
    never fails on upgrading its lock)."""
    return engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})


def error_reason(exc: sa_exc.SQLAlchemyError) -> str:
    """The driver's one-line message of a SQLAlchemy error (no SQL, no parameters)."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def rows_changed(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE changed (its cursor's row count)."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


def _driver_connection(connection: Connection) -> Any:
    """The DBAPI driver's own connection under `connection` (for SQLite PRAGMAs outside a transaction)."""
    raw = connection.connection.driver_connection
    if raw is None:
        raise DatabaseError("the database connection is closed")
    return raw


def _is_sqlite_file(url: URL) -> bool:
    database = url.database or ""
    return database not in ("", ":memory:") and not database.startswith("file:")


def _display_name(url: URL) -> str:
    if _is_sqlite(url) and _is_sqlite_file(url) and url.database:
        return url.database
    return url.render_as_string(hide_password=True)


DRIVER_EXTRAS = {"postgresql": "postgresql"}
"""The pip extra of nft that installs a backend's driver."""


def check_driver(url: str) -> None:
    """DatabaseError (one line) unless the URL's backend and its Python driver are installed."""
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError) as exc:
        raise DatabaseError(f"{mask_password(url)}: not a database URL SQLAlchemy knows ({error_reason(exc)})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        backend = parsed.get_backend_name()
        extra = DRIVER_EXTRAS.get(backend)
        hint = f"pip install 'nft[{extra}]'" if extra else f"install the {parsed.get_driver_name()} driver"
        raise DatabaseError(f"{mask_password(url)}: the {backend} driver is not installed ({exc.name or exc}: {hint})") from None


def mask_password(url: str) -> str:
    """The URL with any password replaced by ***, for messages and stored configs."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        return url
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def _make_engine(url: URL) -> Engine:
    if not _is_sqlite(url):
        return create_engine(url, pool_pre_ping=True)
    # One connection per transaction for files: nothing to share across threads or a fork.
    options: dict[str, Any] = {"poolclass": NullPool} if _is_sqlite_file(url) else {}
    engine = create_engine(url, connect_args={"timeout": 30}, **options)

    @event.listens_for(engine, "connect")
    def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout = 30000")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_sqlite(connection: Any) -> None:
        # Writers take the write lock up front, so a read-then-write never fails on upgrade.
        mode = connection.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


SCHEMA_LOCK_KEY = 0x6E6674  # "nft": the PostgreSQL advisory lock held while the schema is checked or made


def _open_schema(engine: Engine, name: str, create: bool) -> str:
    """Create the schema in an empty database, or check that this is nft's, of our version (or of
    the one we migrate); returns the version found."""
    begin_mode = "IMMEDIATE" if create else "DEFERRED"
    try:
        with engine.connect().execution_options(**{BEGIN_OPTION: begin_mode}) as connection:
            with connection.begin():
                if connection.dialect.name == "postgresql":  # drivers starting at once create the schema once
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                tables = set(inspect(connection).get_table_names())
                if not tables:
                    if not create:
                        raise NoDatabaseYet(f"{name}: empty database, no nft campaign in it")
                    Base.metadata.create_all(connection)
                    connection.execute(
                        insert(MetadataRow),
                        [
                            {"key": "application", "value": APPLICATION},
                            {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                        ],
                    )
                    return str(SCHEMA_VERSION)
                if MetadataRow.__tablename__ not in tables:
                    raise DatabaseError(f"{name}: not an nft database (no {MetadataRow.__tablename__} table)")
                facts = {key: value for key, value in connection.execute(select(MetadataRow.key, MetadataRow.value))}
    except sa_exc.SQLAlchemyError as exc:
        raise DatabaseError(f"{name}: cannot open as a database ({error_reason(exc)})") from exc
    if facts.get("application") != APPLICATION:
        raise DatabaseError(f"{name}: not an nft database")
    version = facts.get("schema_version")
    if version not in (str(SCHEMA_VERSION), *MIGRATABLE_VERSIONS):
        raise DatabaseError(f"{name}: nft database schema version {version}, this nft reads version {SCHEMA_VERSION}")
    return str(version)


MIGRATABLE_VERSIONS = ("1", "2")
"""Schema versions migrated on opening: 1 had no campaign membership, no job claims, no lease; 2 had
no snapshot or prototype structures and no end geometry on results."""

_V2_COLUMNS = {
    "campaigns": ("lease_id VARCHAR(64)", "lease_owner VARCHAR(255)", "lease_since {timestamp}", "lease_heartbeat {timestamp}"),
    "reference_jobs": ("claimed_by INTEGER REFERENCES campaigns (id)",),
    "iterations": ("carved BOOLEAN NOT NULL DEFAULT TRUE",),  # v1 never recorded it: as if selection ran
}
_V3_COLUMNS = {"reference_results": ("final_positions {blob}", "final_cell {blob}")}


def _migrate(engine: Engine, name: str) -> str | None:
    """An older database to `SCHEMA_VERSION` in one transaction; the one-line note for the user.

    From 1: the new columns and tables, and every structure and job joins the database's one
    campaign (several campaigns are refused: their data cannot be told apart). From 2: the wider
    check on structure kinds and the end-geometry columns of results."""
    version: str | None = None
    try:
        with engine.connect().execution_options(**{BEGIN_OPTION: "IMMEDIATE"}) as connection:
            if connection.dialect.name == "sqlite":  # rebuilding a table needs foreign keys off, outside a transaction
                _driver_connection(connection).execute("PRAGMA foreign_keys = OFF")
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
                version = connection.scalar(select(MetadataRow.value).where(MetadataRow.key == "schema_version"))
                if version not in MIGRATABLE_VERSIONS:  # another process migrated it meanwhile
                    return None
                campaign_ids = list(connection.scalars(text("SELECT id FROM campaigns ORDER BY id")))
                if version == "1":
                    _migrate_1_to_2(connection, name, campaign_ids)
                _migrate_2_to_3(connection)
                if connection.dialect.name == "sqlite":
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise DatabaseError(f"{name}: migration would break {len(broken)} reference(s) between tables; left as it was")
                connection.execute(update(MetadataRow).where(MetadataRow.key == "schema_version").values(value=str(SCHEMA_VERSION)))
    except sa_exc.SQLAlchemyError as exc:
        raise DatabaseError(f"{name}: cannot migrate from schema version {version} ({error_reason(exc)})") from exc
    if version == "1":
        owner = f"campaign {campaign_ids[0]}" if campaign_ids else "no campaign"
        return f"{name}: migrated from schema version 1 to {SCHEMA_VERSION} (everything joins {owner})"
    return f"{name}: migrated from schema version {version} to {SCHEMA_VERSION}"


def _migrate_1_to_2(connection: Connection, name: str, campaign_ids: list[int]) -> None:
    if len(campaign_ids) > 1:
        raise DatabaseError(
            f"{name}: nft database schema version 1 with {len(campaign_ids)} campaigns; "
            f"this nft reads version {SCHEMA_VERSION} and migrates a version-1 database "
            "only when it holds one campaign (their structures and jobs cannot be told apart)"
        )
    _add_v2_columns_and_tables(connection)
    if campaign_ids:
        _join_everything_to(connection, campaign_ids[0])


def _migrate_2_to_3(connection: Connection) -> None:
    """The end-geometry columns of results, and the structure kinds check widened to `STRUCTURE_KINDS`."""
    blob = "BYTEA" if connection.dialect.name == "postgresql" else "BLOB"
    for table, columns in _V3_COLUMNS.items():
        for column in columns:
            connection.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column.format(blob=blob)}")
    old_check, new_check = _kinds_check(STRUCTURE_KINDS_V2), _kinds_check(STRUCTURE_KINDS)
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("ALTER TABLE structures DROP CONSTRAINT ck_structure_kind")
        connection.exec_driver_sql(f"ALTER TABLE structures ADD CONSTRAINT ck_structure_kind CHECK ({new_check})")
        return
    _rebuild_sqlite_table(connection, "structures", old_check, new_check)


def _kinds_check(kinds: tuple[str, ...]) -> str:
    return "kind IN (" + ", ".join(f"'{kind}'" for kind in kinds) + ")"


def _rebuild_sqlite_table(connection: Connection, table: str, old: str, new: str) -> None:
    """SQLite cannot alter a check: copy `table` into one made from its own DDL with `old` replaced
    by `new`, drop it and take its name (its indexes are made again; foreign keys are off)."""
    ddl = connection.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).scalar_one()
    indexes = [
        row[0]
        for row in connection.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL", (table,)
        )
    ]
    if old not in ddl:
        raise DatabaseError(f"table {table} does not hold the check {old!r} that version 2 made")
    staging = f"{table}_migrating"
    head, rest = ddl.split("(", 1)
    if head.split()[-1].strip('"') != table:
        raise DatabaseError(f"table {table}: unexpected DDL {head!r}")
    connection.exec_driver_sql(f"CREATE TABLE {staging} (" + rest.replace(old, new))
    connection.exec_driver_sql(f"INSERT INTO {staging} SELECT * FROM {table}")
    connection.exec_driver_sql(f"DROP TABLE {table}")
    connection.exec_driver_sql(f"ALTER TABLE {staging} RENAME TO {table}")
    for index in indexes:
        connection.exec_driver_sql(index)


def _add_v2_columns_and_tables(connection: Connection) -> None:
    timestamp = "TIMESTAMP WITH TIME ZONE" if connection.dialect.name == "postgresql" else "DATETIME"
    for table, columns in _V2_COLUMNS.items():
        for column in columns:
            connection.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column.format(timestamp=timestamp)}")
    tables = Base.metadata.tables
    Base.metadata.create_all(connection, tables=[tables[CampaignStructureRow.__tablename__], tables[CampaignJobRow.__tablename__]])


def _join_everything_to(connection: Connection, campaign_id: int) -> None:
    """Every structure and job of a version-1 database becomes campaign `campaign_id`'s, in id order;
    jobs it ran or finished are claimed by it (so its resume resets its interrupted ones)."""
    campaign = {"campaign": int(campaign_id)}
    connection.execute(
        text(
            "INSERT INTO campaign_structures (campaign_id, structure_id, created_at)"
            " SELECT CAST(:campaign AS INTEGER), id, created_at FROM structures ORDER BY id"
        ),
        campaign,
    )
    connection.execute(
        text(
            "INSERT INTO campaign_jobs (campaign_id, job_id, reused, created_at)"
            " SELECT CAST(:campaign AS INTEGER), id, false, created_at FROM reference_jobs ORDER BY id"
        ),
        campaign,
    )
    connection.execute(text("UPDATE reference_jobs SET claimed_by = CAST(:campaign AS INTEGER) WHERE status <> 'pending'"), campaign)


def _use_wal(engine: Engine, name: str, url: URL) -> None:
    """Put an SQLite file in WAL mode (persistent in the file): readers never block the writer.

    Done only once the file is known to be ours, so a foreign file is left untouched."""
    if not (_is_sqlite(url) and _is_sqlite_file(url)):
        return
    try:
        with engine.connect() as connection:
            raw = _driver_connection(connection)
            mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                raw.execute("PRAGMA journal_mode = WAL")
    except (sa_exc.SQLAlchemyError, sqlite3.Error) as exc:
        raise DatabaseError(f"{name}: cannot switch to WAL mode ({exc})") from exc
