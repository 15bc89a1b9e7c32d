"""codex-runner: run AI coding agents as durable jobs against git repositories."""

__version__ = "0.1.0"
