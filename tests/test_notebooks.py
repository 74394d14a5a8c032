"""Every notebook runs top to bottom on CPU without an error, in bounded time, and its plot
cells draw a picture. The notebooks keep their outputs (so they read well on a repository
page); refresh them after a change with

    JAXFORMER_WRITE_NOTEBOOKS=1 python -m pytest tests/test_notebooks.py

Each notebook runs in a fresh kernel with the user's environment, minus this suite's
XLA_FLAGS (the 8 emulated devices): a notebook that wants several devices sets them itself in
its first cell, as a user would.
"""
import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TOPICS = {"01_quickstart", "02_megatron_conversion", "03_parallelism", "04_bert_encoding",
          "05_benchmarks", "06_serving"}
CELL_TIMEOUT = 240  # seconds for one cell
NOTEBOOK_BUDGET = 300  # seconds for a whole notebook (each takes well under a minute alone)
PRIVATE = re.compile(r"\b(?:jf|jaxformer|model)\._[a-z]|from jaxformer[\w.]* import _")


def test_every_topic_has_a_notebook():
    assert {p.stem for p in NOTEBOOKS} == TOPICS


def _kernel_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_and_public_api(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert cell.execution_count is not None, f"{path.name}: a cell was saved unexecuted"
        assert not any(o.output_type == "error" for o in cell.outputs), \
            f"{path.name}: stored outputs hold an error"
        assert not PRIVATE.search(cell.source), \
            f"{path.name}: notebooks use the public API only: {PRIVATE.search(cell.source)[0]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     record_timing=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute(env=_kernel_env())  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - t0
    plots = 0
    for cell in _code_cells(nb):
        assert not any(o.output_type == "error" for o in cell.outputs)
        if "plot" in cell.metadata.get("tags", []):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert images, f"{path.name}: plot cell drew nothing:\n{cell.source[:200]}"
            plots += len(images)
    if path.stem == "05_benchmarks":
        assert plots >= 2
    assert elapsed < NOTEBOOK_BUDGET, f"{path.name} took {elapsed:.0f}s"
    if os.environ.get("JAXFORMER_WRITE_NOTEBOOKS"):
        nbformat.write(nb, path)
