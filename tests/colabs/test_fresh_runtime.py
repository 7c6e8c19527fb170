"""A notebook started where `research` is not installed sets itself up and runs to the end.

This is what a fresh Colab runtime sees: a Python with pip and Jupyter, without this package.
The test makes a new virtual environment with only nbclient and ipykernel, points the setup
cell's `REPO` at this checkout, and executes the tour notebook at smoke size in that
environment's kernel.
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "colabs" / "tour.ipynb"

EXECUTE = """
import json, sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=True).execute()
outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
print(json.dumps({
  "errors": [f"{o['ename']}: {o['evalue']}" for o in outputs if o.get("output_type") == "error"],
  "text": "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream"),
}))
"""


def test_tour_notebook_installs_the_package_on_a_fresh_runtime(tmp_path):
  env_dir = tmp_path / "fresh"
  subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
  python = str(env_dir / "bin" / "python")
  subprocess.run(
    [python, "-m", "pip", "install", "-q", "nbclient", "nbformat", "ipykernel"],
    check=True,
    timeout=600,
  )
  bare = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  probe = subprocess.run(
    [python, "-c", "import research"], cwd=tmp_path, env=bare, capture_output=True
  )
  assert probe.returncode != 0  # the fresh runtime does not have the package
  env = {
    **bare,
    "RESEARCH_REPO": str(ROOT),
    "RESEARCH_NOTEBOOK_SIZE": "smoke",
    "XLA_FLAGS": "",
    "MPLBACKEND": "Agg",
  }
  out = subprocess.run(
    [python, "-c", EXECUTE, str(NOTEBOOK)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert not result["errors"], result["errors"]
  assert f"research: {ROOT / 'research'} | size: smoke" in result["text"]
