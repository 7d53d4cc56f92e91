#!/usr/bin/env bash
# The project's test command: set up, lint, type-check the core and the Ray layer, run the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check rlflow workers rewards tests
.venv/bin/mypy rlflow workers rewards
.venv/bin/python -m pytest -q "$@"
