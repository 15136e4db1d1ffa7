#!/usr/bin/env bash
# The project's test command (the README's and CI's): lint, format check, then the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k stream -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -m ruff check queuegate tests scripts
"$py" -m ruff format --check queuegate tests scripts
"$py" -m pytest -q -ra "$@"
