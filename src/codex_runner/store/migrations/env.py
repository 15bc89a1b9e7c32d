"""Alembic environment: runs against the connection handed in by `codex_runner.store.migrate`."""

from __future__ import annotations

from alembic import context

from codex_runner.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `codex-runner migrate`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
