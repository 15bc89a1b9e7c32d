"""The statements of a drain's hot path, run on the DBAPI cursor.

A trivial job makes a terminal write, an event row and a share of a claim. Through
`Connection.execute`, SQLAlchemy's work per statement (cache key, execution context, result set-up:
about 13–22 µs here, more than SQLite's own for these statements: `bench/job_store.py
--statement`) was about a tenth of such a job's CPU in a profile of `bench/drain_inprocess.py`,
and at concurrency 2, where a claim serves one job, nearly a fifth (docs/performance.md,
"Dispatch").

SQLAlchemy still does everything but the execution: the statement is a Core construct, compiled
once per dialect by SQLAlchemy; bind values go through the processors SQLAlchemy would apply
(`TypeEngine.bind_processor` of the dialect's own type), result columns through
`TypeEngine.result_processor`, and a DBAPI error is raised as SQLAlchemy's `DBAPIError`, so
`with_retries` and callers see what `Connection.execute` would give them (a lost connection is
invalidated, as SQLAlchemy does, so the pool never hands it out again). Only for statements
without expanding (`IN` list) parameters; the rest of the store uses `Connection.execute`. These
statements bypass SQLAlchemy's execution events, so its statement logging (`echo`) does not show
them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

Processor = Callable[[Any], Any] | None


class Prepared:
    """`statement` compiled for `dialect`; `result` names the types of the columns it returns
    (in order), when it returns rows. `column_keys` limits an INSERT to those columns."""

    def __init__(
        self,
        statement: ClauseElement,
        dialect: Dialect,
        *,
        result: Sequence[sa.types.TypeEngine[Any]] = (),
        column_keys: Sequence[str] | None = None,
    ) -> None:
        compiled = cast(
            SQLCompiler,
            statement.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None),
        )
        if any(bind.expanding for bind in compiled.binds.values()):
            raise ValueError("expanding parameters need Connection.execute")
        self.sql = compiled.string
        self._dialect = dialect
        self._positional = bool(compiled.positional)
        if self._positional:
            binds = [(name, compiled.binds[name]) for name in compiled.positiontup or []]
        else:
            # Named: the SQL's own names (anonymous parameters are named at compile time).
            binds = [(compiled.bind_names[bind], bind) for bind in compiled.binds.values()]
            if compiled.escaped_bind_names:
                raise ValueError("escaped parameter names need Connection.execute")
        self._binds: list[tuple[str, Processor, Any]] = []
        # Parameters without a value of their own: a call must give them, as Connection.execute
        # insists too.
        self._required = frozenset(name for name, bind in binds if bind.required)
        for name, bind in binds:
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            # A value fixed in the statement (e.g. `status == 'queued'`), processed once.
            fixed = None if bind.required else bind.effective_value
            self._binds.append((name, process, process(fixed) if process and fixed is not None else fixed))
        self._results: list[Processor] = [
            t.dialect_impl(dialect).result_processor(dialect, None) for t in result
        ]

    def params(self, values: Mapping[str, Any]) -> Any:
        """The DBAPI parameters for `values` (bind name → value; names not given keep the
        statement's own value)."""
        if not self._required.issubset(values.keys()):
            missing = ", ".join(sorted(self._required.difference(values.keys())))
            raise sa.exc.ArgumentError(f"a value is required for bind parameter(s) {missing}")
        out = []
        for name, process, default in self._binds:
            if name in values:
                value = values[name]
                out.append(process(value) if process is not None else value)
            else:
                out.append(default)
        if self._positional:
            return out
        return dict(zip((name for name, _, _ in self._binds), out, strict=True))

    def row(self, raw: Sequence[Any]) -> list[Any]:
        return [
            value if process is None else process(value)
            for process, value in zip(self._results, raw, strict=True)
        ]

    def execute(self, conn: Connection, values: Mapping[str, Any] | None = None) -> int:
        """Runs the statement once; the number of rows it changed."""
        with self._cursor(conn) as cursor:
            cursor.execute(self.sql, self.params(values or {}))
            return int(cursor.rowcount)

    def execute_each(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Runs the statement once per row; the number of rows each run changed. On PostgreSQL
        all in one round trip (psycopg's `executemany(..., returning=True)` pipelines them and
        keeps each one's result); elsewhere one after the other."""
        if self._dialect.name != "postgresql":
            return [self.execute(conn, values) for values in rows]
        if not rows:
            return []
        counts: list[int] = []
        with self._cursor(conn) as cursor:
            cursor.executemany(self.sql, [self.params(values) for values in rows], returning=True)
            while True:
                counts.append(int(cursor.rowcount))
                if not cursor.nextset():
                    return counts

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows:
            with self._cursor(conn) as cursor:
                cursor.executemany(self.sql, [self.params(values) for values in rows])

    def fetch(self, conn: Connection, values: Mapping[str, Any] | None = None) -> list[list[Any]]:
        """Runs the statement once; its rows, each value processed as `result` says."""
        with self._cursor(conn) as cursor:
            cursor.execute(self.sql, self.params(values or {}))
            return [self.row(raw) for raw in cursor.fetchall()]

    @contextmanager
    def _cursor(self, conn: Connection) -> Iterator[Any]:
        dbapi = self._dialect.loaded_dbapi
        raw = conn.connection.dbapi_connection
        cursor = raw.cursor()  # type: ignore[union-attr]
        try:
            yield cursor
        except dbapi.Error as exc:
            lost = self._dialect.is_disconnect(exc, raw, cursor)
            if lost:
                conn.invalidate(exc)
            # As Connection.execute raises it: with_retries tells transient errors by it.
            raise sa.exc.DBAPIError.instance(
                self.sql, None, exc, dbapi.Error, connection_invalidated=lost, dialect=self._dialect
            ) from exc
        finally:
            with contextlib.suppress(dbapi.Error):  # a cursor of a lost connection may not close
                cursor.close()
