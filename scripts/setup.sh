#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install diffsim into it.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch first and pinned: torch==2.13.0 resolves to a CPU build where one is offered locally,
# and pyproject's open range (torch>=2.3) is then already satisfied, so pip never pulls a
# multi-GB CUDA build as a side effect of installing diffsim.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
stamp=.venv/.diffsim-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet -e ".[dev,rl,distributed]"
    touch "$stamp"
fi
