"""What the notebooks share: the project on the import path, the paper's tables, the runs folder, fast
mode, the plot style, patch-size axes, running a script's `main()` quietly, once per seed, and drawing
the spread over seeds; the classification miniatures that notebooks 2-4 share; and the analysis of runs
(`read_results`, every results.json under a folder, and `fit_power_law`).

    from common import FAST, PAPER, RUNS, log2_axis, log_yaxis, patch_axis, quietly, seeded, draw_spread
"""
import contextlib
import io
import json
import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import FuncFormatter, LogFormatter, NullLocator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # pixelvit.py, train.py, eval_seg.py, eval_det.py

PAPER = json.load(open(os.path.join(HERE, "paper_tables.json")))
# Fast mode (the default without a GPU, and what the tests run): miniatures sized for 2 CPU cores.
FAST = os.environ.get("PIXELVIT_FAST", "0" if torch.cuda.is_available() else "1") == "1"
RUNS = os.environ.get("PIXELVIT_RUNS", os.path.join(os.path.dirname(HERE), "runs"))
# readable at 100 %: 9 pt legends, 90 dpi (the committed notebooks stay small enough for GitHub to show)
plt.rcParams.update({"figure.dpi": 90, "legend.fontsize": 9, "font.size": 10})


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


def quietly(script, argv):
    """A script module's run of a command line, `script.main(script.parse_args(argv))`, with its progress
    bars and prints held back (they would fill the saved notebook); returns its results. If it fails,
    what it printed is shown with the error."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            return script.main(script.parse_args(argv))
    except BaseException:
        sys.stderr.write(printed.getvalue()[-5000:])
        raise


SEEDS = (0, 1, 2)  # every miniature runs each setting once per seed and draws the spread


def seeded(script, argv, folder, seeds=SEEDS):
    """The script's command line once per seed, quietly, in folder_s<seed>; a list of results, each with its run folder
    and its log (the metrics after each epoch or evaluation, from the run's log.jsonl)."""
    runs = []
    for seed in seeds:
        out = f"{folder}_s{seed}"
        result = quietly(script, argv + ["--seed", str(seed), "--output", out])
        with open(os.path.join(out, "log.jsonl")) as f:
            runs.append(dict(result, folder=out, log=[json.loads(line) for line in f]))
    return runs


def spread(runs, metric):
    """(mean, lowest, highest) of a metric over the seeds' runs."""
    values = [r[metric] for r in runs]
    return float(np.mean(values)), min(values), max(values)


def spread_text(runs, metric, digits=1):
    mean, low, high = spread(runs, metric)
    return f"{mean:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"


def separated(runs_a, runs_b, metric):
    """Whether two settings' seeds do not overlap: every seed of one above every seed of the other."""
    a, b = [r[metric] for r in runs_a], [r[metric] for r in runs_b]
    return min(a) > max(b) or min(b) > max(a)


def versus_spread(runs_a, runs_b, metric):
    """'larger than' or 'within' the spread over seeds, for the sentences the notebooks print."""
    return "larger than" if separated(runs_a, runs_b, metric) else "within"


def draw_spread(ax, xs, runs_per_x, metric, label, style="o-", transform=lambda v: v):
    """Each seed as a dot, the mean over seeds as a line, bars from the lowest seed to the highest."""
    values = [[transform(r[metric]) for r in runs] for runs in runs_per_x]
    means = np.array([np.mean(v) for v in values])
    lows, highs = np.array([min(v) for v in values]), np.array([max(v) for v in values])
    line, = ax.plot(xs, means, style, label=f"{label} (mean of {len(values[0])} seeds; bars: range)")
    ax.errorbar(xs, means, yerr=[means - lows, highs - means], fmt="none", ecolor=line.get_color(), capsize=3)
    for x, v in zip(xs, values):
        ax.plot([x] * len(v), v, ".", color=line.get_color(), alpha=0.4)
    return means


def training_done(entry):
    """How far training was at a log entry: iterations (eval_seg, eval_det) or epochs (train.py logs the
    0-based epoch that just ended)."""
    return entry["iter"] if "iter" in entry else entry["epoch"] + 1


def draw_curves(ax, runs, metric, label):
    """A metric at each evaluation: the mean over seeds, shaded from the lowest seed to the highest."""
    steps = [training_done(entry) for entry in runs[0]["log"]]
    values = np.array([[entry[metric] for entry in r["log"]] for r in runs])
    line, = ax.plot(steps, values.mean(0), label=label)
    ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)


def late_gain(runs, metric="top1"):
    """How much the metric still rose over the last quarter of training (mean over seeds): near 0 at a plateau."""
    quarter = max(1, len(runs[0]["log"]) // 4)
    return float(np.mean([r["log"][-1][metric] - r["log"][-1 - quarter][metric] for r in runs]))


# The classification miniature of notebooks 2-4: scikit-learn's scanned digits at their native 8 x 8 pixels,
# a small Adventurer (width 32, 2 blocks) and the demo recipe at lr 4e-3, the same for every patch size.
# Fast mode trains 20 epochs, in which patches 8 and 4 level off and patch 2 nearly; patch 1 levels off
# after about 30, so full mode trains 40.
DIGIT_EPOCHS = 20 if FAST else 40
DIGIT_WIDTH, DIGIT_DEPTH = 32, 2
DIGITS = ["--embed-dim", str(DIGIT_WIDTH), "--depth", str(DIGIT_DEPTH), "--lr", "4e-3", "--warmup-epochs", "1",
          "--epochs", str(DIGIT_EPOCHS), "--workers", "0", "--data", "digits"]


def digits(patch, res=8, extend=1):
    """The classification miniature at one patch size (and input size, and --extend), once per seed;
    the notebooks share these runs, so a run made by one is reused by the next."""
    import train
    name = f"digits_adv_w{DIGIT_WIDTH}d{DIGIT_DEPTH}_r{res}_p{patch}_x{extend}_e{DIGIT_EPOCHS}"
    return seeded(train, DIGITS + ["--res", str(res), "--patch", str(patch), "--extend", str(extend)],
                  os.path.join(RUNS, "notebooks", name))


# The fine-detail miniature: digits typeset in six of matplotlib's bundled fonts, 15-20 px tall with strokes
# 1-2 px wide, centred in a 24 px frame, so that a patch of 8 holds pieces of several strokes and a patch of 4
# about one. The linear patch embedding must then compress (the paper's "compressive encoding"): an 8 x 8
# patch's 64 grey values go into 32 channels, a 4 x 4 patch's 16 fit. Same model and recipe as the 8 px
# miniature; fewer epochs, as each costs more tokens.
FINE_FACES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "cmr10.ttf", "cmss10.ttf", "STIXGeneral.ttf")
FINE_RES, FINE_EPOCHS, FINE_TRAIN, FINE_VAL = 24, 8 if FAST else 30, 1200, 400


def typeset_digit(digit, rng, size=FINE_RES):
    """One grey image of a digit: a random bundled font at 15-20 px, centred, with Gaussian pixel noise
    (sigma 12 of 255)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    fonts = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    font = ImageFont.truetype(os.path.join(fonts, FINE_FACES[rng.integers(len(FINE_FACES))]), int(rng.integers(15, 21)))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).text((size / 2, size / 2), str(digit), fill=255, font=font, anchor="mm")
    pixels = np.asarray(canvas, float) + rng.normal(0, 12, (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_fine_digits(folder):
    """The fine-detail task as an ImageNet-style folder (train/<digit>/*.png, val/<digit>/*.png), written once."""
    if os.path.isdir(os.path.join(folder, "val")):
        return folder
    rng = np.random.default_rng(0)
    for split, count in (("train", FINE_TRAIN), ("val", FINE_VAL)):
        for digit in range(10):
            os.makedirs(os.path.join(folder, split, str(digit)), exist_ok=True)
            for i in range(count // 10):
                typeset_digit(digit, rng).save(os.path.join(folder, split, str(digit), f"{i:04d}.png"))
    return folder


def fine_digits(patch):
    """The fine-detail miniature at one patch size, once per seed (the 8 px miniature's model and recipe)."""
    import train
    data = write_fine_digits(os.path.join(RUNS, "notebooks", "fine_digits_data"))
    name = f"fine_digits_adv_w{DIGIT_WIDTH}d{DIGIT_DEPTH}_r{FINE_RES}_p{patch}_e{FINE_EPOCHS}"
    argv = [a for a in DIGITS if a not in ("--data", "digits")]
    argv[argv.index("--epochs") + 1] = str(FINE_EPOCHS)
    argv += ["--recipe", "demo", "--data-path", data, "--res", str(FINE_RES), "--patch", str(patch)]
    return seeded(train, argv, os.path.join(RUNS, "notebooks", name))


def read_results(root):
    """Every results.json under `root` (from train.py, eval_seg.py or eval_det.py), each with
    its folder under "run"; the notebooks put these next to the paper's numbers."""
    found = []
    for dirpath, _, files in sorted(os.walk(root)):
        if "results.json" in files:
            with open(os.path.join(dirpath, "results.json")) as f:
                found.append(dict(json.load(f), run=dirpath))
    return found


def fit_power_law(x, y):
    """The least-squares line through (log x, log y): y ~= a * x**k. Returns (a, k)."""
    k, log_a = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(np.exp(log_a)), float(k)
