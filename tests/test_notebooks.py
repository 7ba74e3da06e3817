"""Every notebook's code runs, top to bottom, as a reader would run it: everywhere in one namespace from
notebooks/, without Jupyter (cells that need a GPU skip themselves where there is none), and on a GPU
machine in a Jupyter kernel through nbclient (`pip install ".[notebooks]"`), every cell without an error."""
import json
import os
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plots render off-screen
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name} cell {i}", "exec"), namespace)


def test_notebooks_are_committed_with_outputs():
    for path in NOTEBOOKS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(c.get("outputs") for c in cells), f"{path.name}: run it and save its outputs"


def test_notebooks_are_valid_nbformat_4():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        assert nb["nbformat"] == 4 and isinstance(nb["cells"], list), path.name
        for cell in nb["cells"]:
            assert cell["cell_type"] in ("code", "markdown") and isinstance(cell["source"], (str, list)), path.name
            assert not any(o.get("output_type") == "error" for o in cell.get("outputs", [])), \
                f"{path.name}: saved with an error output"


@pytest.mark.gpu
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_jupyter(path):
    nbformat = pytest.importorskip("nbformat", reason="no nbformat: pip install '.[notebooks]'")
    nbclient = pytest.importorskip("nbclient", reason="no nbclient: pip install '.[notebooks]'")
    pytest.importorskip("ipykernel", reason="no ipykernel (the notebooks' Python kernel): pip install '.[notebooks]'")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    if os.environ.get("CUFLASH_NOTEBOOK_OUT"):  # keep the executed notebook (to commit a GPU run's outputs)
        nbformat.write(nb, os.path.join(os.environ["CUFLASH_NOTEBOOK_OUT"], path.name))
