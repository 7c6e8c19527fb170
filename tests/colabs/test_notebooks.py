"""Executes every notebook in colabs/ top to bottom at smoke size."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("RESEARCH_NOTEBOOK_SIZE", "smoke")
  monkeypatch.setenv("XLA_FLAGS", "")  # one device in the kernel, as in Colab
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
