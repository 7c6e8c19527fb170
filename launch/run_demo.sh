#!/usr/bin/env bash
# Runs the demo (every experiment at demo size on the embedded data) on a fresh machine:
# creates .venv, installs the package, runs launch/demo.py and prints runs/demo/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python -m launch.demo --workdir=runs/demo "$@"
