"""What the notebooks share: the project on the import path, the paper's tables, the runs folder, fast
mode, the plot style, patch-size axes, and running a script's `main()` quietly.

    from common import FAST, PAPER, RUNS, log2_axis, log_yaxis, patch_axis, quietly
"""
import contextlib
import io
import json
import os
import sys

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import FuncFormatter, LogFormatter, NullLocator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # pixelvit.py, train.py, eval_seg.py, eval_det.py

PAPER = json.load(open(os.path.join(HERE, "paper_tables.json")))
# Fast mode (the default without a GPU, and what the tests run): miniatures sized for 2 CPU cores.
FAST = os.environ.get("PIXELVIT_FAST", "0" if torch.cuda.is_available() else "1") == "1"
RUNS = os.environ.get("PIXELVIT_RUNS", os.path.join(os.path.dirname(HERE), "runs"))
plt.rcParams.update({"figure.dpi": 72})


def log2_axis(ax, ticks, label, descending=False):
    """A log-2 x axis with ticks exactly at `ticks` and nothing else: no minor tick labels piling up."""
    ticks = sorted(ticks, reverse=descending)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)
    margin = 1.25 if descending else 1 / 1.25          # a quarter of a step beyond the end ticks
    ax.set_xlim(ticks[0] * margin, ticks[-1] / margin)


def log_yaxis(ax, label):
    """A log y axis labelled with plain numbers (20, 30), not 2x10^1."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.set_ylabel(label)


def patch_axis(ax, patches, label="patch size"):
    """Patch sizes on a log-2 axis, largest first, as the paper's figures read."""
    log2_axis(ax, patches, label, descending=True)


def quietly(main, argv):
    """A script's `main(argv)` with its progress bars and prints held back (they would fill the saved
    notebook); returns its results. If it fails, what it printed is shown with the error."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            return main(argv)
    except BaseException:
        sys.stderr.write(printed.getvalue()[-5000:])
        raise
