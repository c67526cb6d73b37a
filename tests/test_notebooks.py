"""The notebooks: each one runs top to bottom in fast mode, as a reader would run it, and the committed
copies carry the figures of a real execution."""
import os
import re
import sys
from types import SimpleNamespace

import nbformat
import numpy as np
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
    for cell in code:   # one print in one piece (notebooks/execute.py merges them)
        kinds = [o.get("name") if o.output_type == "stream" else None for o in cell.outputs]
        assert not any(a is not None and a == b for a, b in zip(kinds, kinds[1:])), f"{name}: split prints"
    small = re.findall(r"fontsize=([0-8])\b", "".join(cell.source for cell in code))
    assert not small, f"{name} sets text in {small} pt: figures are read at 100 %, at 9 pt or more"


@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n[:2].isdigit()])
def test_main_notebook_quotes_the_paper_beside_the_code(name):
    """Each main notebook sets the paper's sentences that it reproduces as a blockquote, and code follows."""
    cells = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4).cells
    quoted = [i for i, cell in enumerate(cells[:-1]) if cell.cell_type == "markdown"
              and any(len(line[1:].split()) >= 10 for line in cell.source.splitlines() if line.startswith(">"))
              and cells[i + 1].cell_type == "code"]
    assert quoted, f"{name} quotes no sentence of the paper (a '>' line of 10 words or more) before a code cell"


def test_patch_axes_tick_exactly_the_patch_sizes():
    common = import_common()
    patch_axis, plt = common.patch_axis, common.plt

    fig, ax = plt.subplots()
    ax.plot([64, 32, 16, 8, 4, 2, 1], range(7))
    patch_axis(ax, [64, 32, 16, 8, 4, 2, 1])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "32", "16", "8", "4", "2", "1"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == []      # nothing piles up
    left, right = ax.get_xlim()
    assert left > 64 and right < 1                                             # largest patch first
    plt.close(fig)


def import_common():
    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    import matplotlib
    matplotlib.use("Agg")
    import common
    return common


def test_seeded_runs_each_seed_in_its_own_folder_and_keeps_its_log(tmp_path):
    common = import_common()
    calls = []

    def main(argv):   # a stand-in for a script's main: logs two epochs whose top-1 depends on the seed
        calls.append(argv)
        seed, out = int(argv[argv.index("--seed") + 1]), argv[argv.index("--output") + 1]
        os.makedirs(out)
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            f.write('{"epoch": 0, "top1": 50.0}\n' + f'{{"epoch": 1, "top1": {60 + seed}}}\n')
        print("a progress bar that must not reach the notebook")
        return {"top1": 60.0 + seed}

    script = SimpleNamespace(parse_args=lambda argv: argv, main=main)   # settings: the command line itself
    runs = common.seeded(script, ["--patch", "4"], str(tmp_path / "run"), seeds=(0, 2))
    assert [argv[:2] for argv in calls] == [["--patch", "4"]] * 2
    assert [r["folder"] for r in runs] == [str(tmp_path / "run_s0"), str(tmp_path / "run_s2")]
    assert [r["top1"] for r in runs] == [60.0, 62.0]
    assert [[e["top1"] for e in r["log"]] for r in runs] == [[50.0, 60.0], [50.0, 62.0]]
    assert common.spread(runs, "top1") == (61.0, 60.0, 62.0)
    assert common.spread_text(runs, "top1") == "61.0 (60.0 to 62.0)"
    assert common.late_gain(runs) == 11.0                       # (10 + 12) / 2 over the last of 2 epochs
    assert common.training_done(runs[0]["log"][-1]) == 2        # train.py logs the 0-based epoch that ended
    assert common.training_done({"iter": 30, "mIoU": 1.0}) == 30  # eval_seg and eval_det log iterations done


def test_a_gap_counts_as_larger_than_the_spread_only_when_no_seeds_overlap():
    common = import_common()
    low, high = [{"m": v} for v in (1.0, 2.0, 3.0)], [{"m": v} for v in (3.5, 4.0, 9.0)]
    touching = [{"m": v} for v in (3.0, 4.0, 5.0)]                # shares 3.0 with `low`
    assert common.separated(low, high, "m") and common.separated(high, low, "m")
    assert not common.separated(low, touching, "m")
    assert (common.versus_spread(high, low, "m"), common.versus_spread(touching, low, "m")) == ("larger than", "within")


def test_draw_spread_bars_run_from_the_lowest_seed_to_the_highest():
    common = import_common()
    fig, ax = common.plt.subplots()
    runs_per_x = [[{"m": 1.0}, {"m": 3.0}, {"m": 8.0}], [{"m": 5.0}, {"m": 5.0}, {"m": 5.0}]]
    means = common.draw_spread(ax, [8, 4], runs_per_x, "m", "x", transform=lambda v: 10 * v)
    assert list(means) == [40.0, 50.0]
    bars = ax.collections[0].get_segments()                     # errorbar's vertical lines, one per x
    assert [tuple(seg[:, 1]) for seg in bars] == [(10.0, 80.0), (50.0, 50.0)]
    dots = [line.get_ydata().tolist() for line in ax.lines[1:]]  # every seed drawn, after the mean line
    assert [10.0, 30.0, 80.0] in dots and [50.0, 50.0, 50.0] in dots
    common.plt.close(fig)


def test_the_readme_and_the_guide_link_every_notebook():
    for doc in ("README.md", os.path.join("docs", "notebooks.md")):
        linked = set(re.findall(r"notebooks/(\w+\.ipynb)", open(os.path.join(ROOT, doc)).read()))
        assert linked == set(NOTEBOOKS), doc


def test_power_law_fit_recovers_a_hand_made_law():
    common = import_common()
    x = np.array([1, 2, 4, 8, 16])
    assert common.fit_power_law(x, 3.0 * x ** -0.5) == pytest.approx((3.0, -0.5))
    # the paper's Adventurer-B/224 error (100 - top-1) falls with the patch size: a positive exponent
    acc = common.PAPER["table1"]["rows"][4]["acc"]
    _, k = common.fit_power_law([int(p) for p in acc], [100 - a for a in acc.values()])
    assert 0 < k < 0.2
