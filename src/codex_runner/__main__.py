"""`python -m codex_runner`: the `codex-runner` command, for a venv whose scripts are not on PATH."""

from codex_runner.cli import main

if __name__ == "__main__":
    main()
