"""The notebooks: each one runs top to bottom in fast mode, as a reader would run it, and the committed
copies carry the figures of a real execution."""
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import ROOT

NOTEBOOKS = sorted(p for p in os.listdir(os.path.join(ROOT, "notebooks")) if p.endswith(".ipynb"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs folder for all notebooks, so that later ones reuse the miniature runs of earlier ones."""
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, runs, monkeypatch):
    monkeypatch.setenv("PIXELVIT_FAST", "1")
    monkeypatch.setenv("PIXELVIT_RUNS", str(runs))
    folder = os.path.join(ROOT, "notebooks")
    notebook = nbformat.read(os.path.join(folder, name), as_version=4)
    # a failing cell (the notebooks assert what they compute) raises CellExecutionError
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
    figures = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
               if "image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})]
    assert figures, f"{name} drew no figure"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_shows_its_outputs(name):
    path = os.path.join(ROOT, "notebooks", name)
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), f"{name} is committed with cells that never ran"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"], f"{name} has an error output"
    assert os.path.getsize(path) < 600_000, f"{name} is too large to read on GitHub"
    text = "".join(o.get("text", "") for cell in code for o in cell.outputs if o.output_type == "stream")
    for spam in ("it/s]", "s/it]", "%|", "\x1b[A", "Average Precision  (AP) @["):   # tqdm, pycocotools
        assert spam not in text, f"{name} has progress-bar or evaluator output: {spam!r}"


def test_patch_axes_tick_exactly_the_patch_sizes():
    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    import matplotlib
    matplotlib.use("Agg")
    from common import patch_axis, plt

    fig, ax = plt.subplots()
    ax.plot([64, 32, 16, 8, 4, 2, 1], range(7))
    patch_axis(ax, [64, 32, 16, 8, 4, 2, 1])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "32", "16", "8", "4", "2", "1"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == []      # nothing piles up
    left, right = ax.get_xlim()
    assert left > 64 and right < 1                                             # largest patch first
    plt.close(fig)


def test_every_topic_of_the_issue_has_a_notebook():
    assert len(NOTEBOOKS) == 8
