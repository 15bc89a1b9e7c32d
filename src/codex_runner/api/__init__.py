"""The HTTP API (FastAPI): routes, auth, error mapping, SSE."""

from codex_runner.api.app import create_app

__all__ = ["create_app"]
