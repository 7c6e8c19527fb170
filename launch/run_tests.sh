#!/usr/bin/env bash
# Runs the test suite on a fresh machine: creates .venv, installs the package with its test
# extra, then runs pytest (8 fake CPU devices are set up by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
export RESEARCH_DATA_DIR="${RESEARCH_DATA_DIR:-$PWD/.cache/tfds}"
exec .venv/bin/python -m pytest tests -n 2 "$@"
