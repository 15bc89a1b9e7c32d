"""drop ix_runner_jobs_status_user, which ix_runner_jobs_status_created already covers

Every status change updated both indexes. The only reads that used it (active jobs by user, for
claims and limits) filter on `status` alone, which `ix_runner_jobs_status_created` leads with too;
reads by user and status use `ix_runner_jobs_user_status_created`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 00:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain DROP INDEX, not a batch operation: on SQLite a batch would copy `runner_jobs` and
    # lose the job-count triggers of migration 0002.
    op.drop_index("ix_runner_jobs_status_user", table_name="runner_jobs")


def downgrade() -> None:
    op.create_index("ix_runner_jobs_status_user", "runner_jobs", ["status", "requested_by"], unique=False)
