"""The benchmark's Table 6 bookkeeping (the GPU rows themselves need a GPU): the rows of one
configuration with the training-step benchmark replaced by a stand-in, and the subprocess harness with a
stand-in child that crashes, hangs or reports its environment."""
import argparse
import json
import os
import sys
import textwrap
import time

import torch

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tests"))
import benchmark  # noqa: E402


def test_table6_rows_record_oom_other_errors_and_gpu_hours(monkeypatch, capsys):
    calls = []

    def fake_benchmark_row(model, patch, res, batch, steps, amp):
        calls.append((model, patch, amp, batch))
        if patch == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        if patch == 2:
            raise RuntimeError("Triton Error [CUDA]: an illegal memory access\nsecond line")
        return dict(images_per_s=100.0 / patch, memory_mb_per_image=1.0)

    monkeypatch.setattr(benchmark, "benchmark_row", fake_benchmark_row)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    benchmark.table6_rows_in_this_process("bf16", "adv_b", [16, 4, 2, 1])
    rows = {r["patch"]: r for r in (json.loads(line[len(benchmark.ROW_MARK):])
                                    for line in capsys.readouterr().out.splitlines()
                                    if line.startswith(benchmark.ROW_MARK))}
    assert [c[1] for c in calls] == [16, 4, 2, 1]         # an error does not end the configuration
    assert all(batch == benchmark.TABLE6_BATCH[patch] for _, patch, _, batch in calls)
    assert rows[1]["status"] == "out of memory"
    assert rows[2]["status"] == "error: RuntimeError: Triton Error [CUDA]: an illegal memory access"
    assert rows[4]["status"] == "ok" and rows[4]["gpu_hours"] == 1_281_167 / 25.0 / 3600


def report(fused, triton, flash):
    return dict(mamba_ssm_fused=fused, mamba_ssm_triton_ssd=triton, flash_attn=flash, why={})


def test_table6_configurations_put_adventurer_first_and_never_repeat_sdpa():
    assert benchmark.table6_configs(report(True, True, True)) == [
        ("bf16", "adv_b", "mamba_ssm_fused"), ("bf16", "adv_b", "torch"),
        ("bf16", "deit_b", "flash_attn"), ("bf16", "deit_b", "sdpa"),
        ("bf16", "adv_b", "mamba_ssm_triton_ssd"),
        ("fp16", "adv_b", "mamba_ssm_fused"), ("fp16", "deit_b", "flash_attn")]
    # causal-conv1d and flash-attn missing: the Triton SSD tier, and DeiT-B's SDPA rows once per dtype
    assert benchmark.table6_configs(report(False, True, False)) == [
        ("bf16", "adv_b", "mamba_ssm_triton_ssd"), ("bf16", "adv_b", "torch"), ("bf16", "deit_b", "sdpa"),
        ("fp16", "adv_b", "mamba_ssm_triton_ssd"), ("fp16", "deit_b", "sdpa")]


def stand_in_child(tmp_path, monkeypatch, body):
    """TABLE6_ROWS_COMMAND pointed at a script that prints its rows the way the real one does."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys, time
        amp, model, *patches = sys.argv[1:]
        def row(patch, **extra):
            print({benchmark.ROW_MARK!r} + json.dumps(dict(patch=int(patch), status="ok", images_per_s=1.0,
                                                            **extra)), flush=True)
    """) + textwrap.dedent(body))
    monkeypatch.setattr(benchmark, "TABLE6_ROWS_COMMAND", [sys.executable, str(script)])


def test_a_crashing_configuration_keeps_its_rows_and_says_why(tmp_path, monkeypatch):
    stand_in_child(tmp_path, monkeypatch, """
        row(patches[0])
        print("Segmentation fault in causal_conv1d_bwd", flush=True)
        sys.exit(139)
    """)
    rows = list(benchmark.run_table6_config("bf16", "adv_b", "torch", [16, 8, 4], time.time() + 60))
    assert [r["patch"] for r in rows] == [16, 8, 4] and rows[0]["status"] == "ok"
    assert all(r["status"] == "not reached: the run exited with status 139: Segmentation fault in "
                              "causal_conv1d_bwd" for r in rows[1:])


def test_a_hanging_configuration_is_stopped_at_the_deadline(tmp_path, monkeypatch):
    stand_in_child(tmp_path, monkeypatch, """
        row(patches[0])
        time.sleep(600)
    """)
    start = time.time()
    rows = list(benchmark.run_table6_config("bf16", "adv_b", "torch", [16, 8, 4], time.time() + 5))
    assert time.time() - start < 30
    assert [r["status"] for r in rows] == ["ok", "skipped: time budget (cut during this row)",
                                           "skipped: time budget"]


def test_table6_runs_each_path_with_its_settings_and_writes_json_row_by_row(tmp_path, monkeypatch):
    stand_in_child(tmp_path, monkeypatch, """
        for patch in patches:
            row(patch, env={k: v for k, v in os.environ.items() if k.startswith("PIXELVIT_")})
    """)
    monkeypatch.setattr(benchmark.pv, "backends", lambda: report(True, True, False))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a stand-in GPU")
    out = tmp_path / "table6.json"
    rows = benchmark.bench_table6(argparse.Namespace(time_budget=120, deadline=None, json=str(out)))
    assert len(rows) == 6 * 5                              # 6 configurations x patches 16..1
    by_path = {r["path"]: r["env"] for r in rows}
    assert by_path["torch"]["PIXELVIT_KERNELS"] == "0"
    assert by_path["mamba_ssm_fused"] == dict(PIXELVIT_KERNELS="1", PIXELVIT_FUSED_MAMBA="1",
                                              PIXELVIT_REQUIRE_KERNELS="1")
    assert by_path["mamba_ssm_triton_ssd"]["PIXELVIT_FUSED_MAMBA"] == "0"
    written = json.loads(out.read_text())
    assert written["table6"] == json.loads(json.dumps(rows))
    assert "flash-attn not installed" in written["notes"][0]
    assert {r["paper_gpu_hours"] for r in rows if r["patch"] == 4} == {9.79, 6.86}


def test_table6_rows_past_the_time_budget_are_recorded_as_skipped(tmp_path, monkeypatch):
    stand_in_child(tmp_path, monkeypatch, "raise SystemExit('never started')")
    monkeypatch.setattr(benchmark.pv, "backends", lambda: report(True, True, True))
    rows = benchmark.bench_table6(argparse.Namespace(time_budget=None, deadline=time.time() - 1, json=None))
    assert len(rows) == 7 * 5 and {r["status"] for r in rows} == {"skipped: time budget"}


def test_operations_grow_little_with_tokens_in_the_accelerator_shape():
    # Adventurer-B's blocks at 224 px, two deep: in the accelerator shape a patch-1 image (50,177
    # tokens) dispatches within 5x the operations of a patch-16 one (197 tokens); the CPU shape's
    # loop over 64-token chunks and 1,024-token blocks dispatches over 10x more at patch 1
    counts = {(shape, patch, backward): benchmark.count_operations("adv_b", patch, shape, backward, depth=2)
              for shape in ("accelerator", "cpu") for patch in (16, 1) for backward in (False, True)}
    for backward in (False, True):
        assert counts["accelerator", 1, backward] <= 5 * counts["accelerator", 16, backward], counts
        assert counts["cpu", 1, backward] > 10 * counts["accelerator", 1, backward], counts
