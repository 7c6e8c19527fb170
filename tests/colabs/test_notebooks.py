"""Executes the notebooks in colabs/ top to bottom at smoke size (the tour: fresh runtime)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
# tour.ipynb runs end to end in tests/colabs/test_fresh_runtime.py, on a runtime without this
# package (its setup cell installs it): running it here too would only repeat that.
FRESH_RUNTIME_NOTEBOOK = "tour.ipynb"
NOTEBOOKS = sorted(p for p in (ROOT / "colabs").glob("*.ipynb") if p.name != FRESH_RUNTIME_NOTEBOOK)


def test_there_are_notebooks():
  assert NOTEBOOKS and (ROOT / "colabs" / FRESH_RUNTIME_NOTEBOOK).exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("RESEARCH_NOTEBOOK_SIZE", "smoke")
  # The kernel keeps the suite's 8 fake devices (inherited XLA_FLAGS), so the smoke experiment
  # it runs compiles the same programs as the smoke tests, and whichever comes second reads
  # them from the shared compilation cache. One device, as on Colab, is what the tour runs
  # with in test_fresh_runtime.py.
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
    allow_errors=True,  # every cell runs and its error is recorded, so the check below sees all
  ).execute()
  errors = [
    o
    for c in notebook.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.get("output_type") == "error"
  ]
  assert not errors, "\n".join(f"{o['ename']}: {o['evalue']}" for o in errors)
