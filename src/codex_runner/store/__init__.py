"""The only code that speaks SQL: schema, migrations, claims and compare-and-set writes."""

from codex_runner.store.engine import create_store_engine
from codex_runner.store.jobs import ClaimedJob, JobStore

__all__ = ["ClaimedJob", "JobStore", "create_store_engine"]
