"""job counts on PostgreSQL: the triggers append deltas, a fold moves them into the counts rows

With the triggers of 0002 updating `runner_job_counts` in place, every status change locked one
or two counts rows (status, user, repo) till commit, in the order its rows were written. Create
batches, claims, terminal batches and cancels lock the same hot rows in different orders, and
PostgreSQL broke the resulting deadlocks after `deadlock_timeout` (1 s each, a claim stalled the
while). Now the triggers only append to `runner_job_count_deltas`, which locks nothing another
writer waits on, and `runner_fold_job_counts()` moves the deltas into the counts rows: one folder
at a time (a try-lock; a busy one is skipped), sorted, locking no other table. Readers sum both.

SQLite (one writer at a time, no deadlock) keeps the triggers of 0002: its deltas table stays
empty, so every reader is the same SQL on both databases.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 22:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# pg_try_advisory_xact_lock key of the fold (store/jobs.py keeps its other keys beside it).
FOLD_LOCK_KEY = 0x636F646578_05

_KEY = "status, requested_by, repo_id"
_APPLY_DELTAS = f"""CREATE OR REPLACE FUNCTION runner_job_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO runner_job_count_deltas ({_KEY}, n)
        VALUES (OLD.status, OLD.requested_by, OLD.repo_id, -1), (NEW.status, NEW.requested_by, NEW.repo_id, 1);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO runner_job_count_deltas ({_KEY}, n) VALUES (NEW.status, NEW.requested_by, NEW.repo_id, 1);
    ELSE
        INSERT INTO runner_job_count_deltas ({_KEY}, n) VALUES (OLD.status, OLD.requested_by, OLD.repo_id, -1);
    END IF;
    RETURN NULL;
END
$$"""
# The deltas a statement snapshot sees go, summed, into the counts rows in key order; deltas
# committed meanwhile wait for the next fold. Returns how many deltas it moved, or -1 when another
# fold holds the lock (this one is skipped: the other does the work).
_FOLD = f"""CREATE FUNCTION runner_fold_job_counts() RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock({FOLD_LOCK_KEY}) THEN
        RETURN -1;
    END IF;
    WITH gone AS (
        DELETE FROM runner_job_count_deltas RETURNING {_KEY}, n
    ), summed AS (
        SELECT {_KEY}, sum(n) AS n, count(*) AS c FROM gone GROUP BY {_KEY}
    ), folded AS (
        INSERT INTO runner_job_counts ({_KEY}, n)
        SELECT {_KEY}, n FROM summed ORDER BY {_KEY}
        ON CONFLICT ({_KEY}) DO UPDATE SET n = runner_job_counts.n + EXCLUDED.n
    )
    SELECT coalesce(sum(c), 0) INTO moved FROM summed;
    RETURN moved;
END
$$"""
# 0002's function, for the downgrade.
_APPLY_IN_PLACE = f"""CREATE OR REPLACE FUNCTION runner_job_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        UPDATE runner_job_counts SET n = n - 1
        WHERE status = OLD.status AND requested_by = OLD.requested_by AND repo_id = OLD.repo_id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO runner_job_counts ({_KEY}, n) VALUES (NEW.status, NEW.requested_by, NEW.repo_id, 1)
        ON CONFLICT ({_KEY}) DO UPDATE SET n = runner_job_counts.n + 1;
    END IF;
    RETURN NULL;
END
$$"""


def upgrade() -> None:
    op.create_table(
        "runner_job_count_deltas",
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("repo_id", sa.String(length=36), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_APPLY_DELTAS)
        op.execute(_FOLD)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A running fold finishes first; then writers wait while the last deltas go in and the
        # triggers change back. In this order: a create batch holds the fold lock (its fold's)
        # while it inserts jobs, so the table lock first would deadlock with it.
        op.execute(f"SELECT pg_advisory_xact_lock({FOLD_LOCK_KEY})")
        op.execute("LOCK TABLE runner_jobs IN SHARE MODE")
        op.execute(
            f"WITH gone AS (DELETE FROM runner_job_count_deltas RETURNING {_KEY}, n) "
            f"INSERT INTO runner_job_counts ({_KEY}, n) SELECT {_KEY}, sum(n) FROM gone GROUP BY {_KEY} "
            f"ON CONFLICT ({_KEY}) DO UPDATE SET n = runner_job_counts.n + EXCLUDED.n"
        )
        op.execute(_APPLY_IN_PLACE)
        op.execute("DROP FUNCTION runner_fold_job_counts()")
    op.drop_table("runner_job_count_deltas")
