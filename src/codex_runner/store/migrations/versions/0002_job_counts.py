"""exact job counts per (status, user, repo), kept by triggers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 15:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_KEY = "status, requested_by, repo_id"
_UPSERT = (
    f"INSERT INTO runner_job_counts ({_KEY}, n) VALUES (NEW.status, NEW.requested_by, NEW.repo_id, 1) "
    f"ON CONFLICT ({_KEY}) DO UPDATE SET n = runner_job_counts.n + 1"
)
_DECREMENT = (
    "UPDATE runner_job_counts SET n = n - 1 "
    "WHERE status = OLD.status AND requested_by = OLD.requested_by AND repo_id = OLD.repo_id"
)
_KEY_CHANGED = (
    "OLD.status IS DISTINCT FROM NEW.status OR OLD.requested_by IS DISTINCT FROM NEW.requested_by "
    "OR OLD.repo_id IS DISTINCT FROM NEW.repo_id"
)

SQLITE_TRIGGERS = [
    f"CREATE TRIGGER tr_runner_job_counts_insert AFTER INSERT ON runner_jobs BEGIN {_UPSERT}; END",
    f"CREATE TRIGGER tr_runner_job_counts_delete AFTER DELETE ON runner_jobs BEGIN {_DECREMENT}; END",
    "CREATE TRIGGER tr_runner_job_counts_update AFTER UPDATE OF status, requested_by, repo_id "
    f"ON runner_jobs WHEN {_KEY_CHANGED.replace('IS DISTINCT FROM', 'IS NOT')} "
    f"BEGIN {_DECREMENT}; {_UPSERT}; END",
]

PG_TRIGGERS = [
    f"""CREATE FUNCTION runner_job_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        {_DECREMENT};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        {_UPSERT};
    END IF;
    RETURN NULL;
END
$$""",
    "CREATE TRIGGER tr_runner_job_counts_insert_delete AFTER INSERT OR DELETE ON runner_jobs "
    "FOR EACH ROW EXECUTE FUNCTION runner_job_counts_apply()",
    "CREATE TRIGGER tr_runner_job_counts_update AFTER UPDATE OF status, requested_by, repo_id "
    f"ON runner_jobs FOR EACH ROW WHEN ({_KEY_CHANGED}) EXECUTE FUNCTION runner_job_counts_apply()",
]


def upgrade() -> None:
    op.create_table(
        "runner_job_counts",
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("repo_id", sa.String(length=36), nullable=False),
        sa.Column("n", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.PrimaryKeyConstraint("status", "requested_by", "repo_id", name=op.f("pk_runner_job_counts")),
    )
    with op.batch_alter_table("runner_job_counts", schema=None) as batch_op:
        batch_op.create_index("ix_runner_job_counts_user", ["requested_by", "status"], unique=False)
    # The triggers and the first counts go in together, in this one transaction (on SQLite the
    # migration holds the write lock; on PostgreSQL the share lock keeps writers out meanwhile).
    if op.get_bind().dialect.name == "postgresql":
        op.execute("LOCK TABLE runner_jobs IN SHARE MODE")
    for ddl in PG_TRIGGERS if op.get_bind().dialect.name == "postgresql" else SQLITE_TRIGGERS:
        op.execute(ddl)
    op.execute(
        f"INSERT INTO runner_job_counts ({_KEY}, n) SELECT {_KEY}, COUNT(*) FROM runner_jobs GROUP BY {_KEY}"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS tr_runner_job_counts_update ON runner_jobs")
        op.execute("DROP TRIGGER IF EXISTS tr_runner_job_counts_insert_delete ON runner_jobs")
        op.execute("DROP FUNCTION IF EXISTS runner_job_counts_apply()")
    else:
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS tr_runner_job_counts_{name}")
    with op.batch_alter_table("runner_job_counts", schema=None) as batch_op:
        batch_op.drop_index("ix_runner_job_counts_user")
    op.drop_table("runner_job_counts")
