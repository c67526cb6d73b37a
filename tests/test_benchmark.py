"""The benchmark's Table 6 bookkeeping (the GPU rows themselves need a GPU), with train.py's
benchmark replaced by a stand-in that records what it was asked to run."""
import argparse
import json
import os
import sys

import torch

import pixelvit as pv
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tests"))
import benchmark  # noqa: E402


def test_table6_rows_record_paths_dtypes_oom_and_gpu_hours(tmp_path, monkeypatch):
    calls = []

    def fake_train_benchmark(argv):
        flags = dict(zip(argv[1::2], argv[2::2]))     # argv[0] is --benchmark
        calls.append((flags["--model"], int(flags["--patch"]), flags["--amp"], pv.USE_KERNELS, int(flags["--batch-size"])))
        if flags["--patch"] == "1" and not pv.USE_KERNELS:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return dict(images_per_s=100.0 / int(flags["--patch"]), memory_mb_per_image=1.0)

    monkeypatch.setattr(benchmark.train, "main", fake_train_benchmark)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = tmp_path / "table6.json"
    rows = benchmark.bench_table6(argparse.Namespace(time_budget=60, json=str(out)))

    # bf16 with kernels and with the PyTorch paths, fp16 with kernels: 2 models x 5 patches each
    assert len(rows) == len(calls) == 30
    assert {(m, amp, k) for m, _, amp, k, _ in calls} == {
        (m, amp, k) for m in ("deit_b", "adv_b") for amp, k in (("bf16", True), ("bf16", False), ("fp16", True))}
    assert all(batch == benchmark.TABLE6_BATCH[patch] for _, patch, _, _, batch in calls)
    oom = [r for r in rows if r["status"] == "out of memory"]
    assert [(r["model"], r["patch"], r["kernels"]) for r in oom] == [("deit_b", 1, False), ("adv_b", 1, False)]
    row = next(r for r in rows if r["status"] == "ok" and r["patch"] == 4)
    assert row["gpu_hours"] == 1_281_167 / 25.0 / 3600        # images/s 25 -> GPU-hours per epoch
    assert row["paper_gpu_hours"] == {"deit_b": 9.79, "adv_b": 6.86}[row["model"]]
    assert json.loads(out.read_text())["table6"] == json.loads(json.dumps(rows))
    assert pv.USE_KERNELS is True


def test_table6_rows_past_the_time_budget_are_recorded_as_skipped(monkeypatch):
    monkeypatch.setattr(benchmark.train, "main", lambda argv: dict(images_per_s=1.0))
    rows = benchmark.bench_table6(argparse.Namespace(time_budget=-1, json=None))
    assert len(rows) == 30 and {r["status"] for r in rows} == {"skipped: time budget"}
