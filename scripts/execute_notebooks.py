"""Executes every notebook in notebooks/ top to bottom and writes it back with its outputs.

    python scripts/execute_notebooks.py [notebooks/02_drafters.ipynb ...]

So a reader sees results (text, tables, plots) without running anything. The outputs are
those of the machine that ran this (CPU settings unless a TPU/GPU is present); the
notebooks' own first cell prints the backend. tests/test_notebooks.py re-executes them
from scratch on every CI run, so committed outputs never stand in for a run.
"""
from __future__ import annotations

import glob
import os
import sys

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(paths):
  paths = paths or sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
    nbformat.write(nb, path)
    print(f"executed {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
