"""tests/gpu_check.sh on this CPU machine: its early exits, its time boxes, and a dry run on a stand-in
GPU (nvidia-smi and nvcc replaced by scripts, torch.cuda told that an H100 is there) in which the
causal-conv1d build fails: every step still runs, in order, and the failure is reported."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import xml.etree.ElementTree as ET

import pytest
import torch

from helpers import ROOT
from keep_arch import keep_arch

SCRIPT = os.path.join(ROOT, "tests", "gpu_check.sh")
STEPS = ["preflight", "mamba-ssm", "parity-triton-ssd-bf16", "causal-conv1d", "parity-fused-bf16",
         "parity-models", "table6", "parity-rest"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")


def stand_in_machine(tmp_path, gpu=True, nvcc="13.0"):
    """PATH, PYTHONPATH and CUDA_HOME of a machine with the named GPU and nvcc: nvidia-smi and nvcc
    are scripts, and with `gpu` a sitecustomize makes torch report an H100 (sm_90). PATH keeps only
    the system folders and the interpreter's, so that this machine's real nvcc is not found."""
    bin_dir, py_dir, cuda = tmp_path / "bin", tmp_path / "py", tmp_path / "cuda"
    for folder in (bin_dir, py_dir, cuda / "bin", cuda / "include"):
        folder.mkdir(parents=True)
    (cuda / "include" / "cuda_runtime.h").write_text("")
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\ncase "$1" in -L) echo "GPU 0: NVIDIA H100 80GB HBM3";;\n'
                                        '*) echo "NVIDIA H100 80GB HBM3, 580.65, 81559 MiB, 9.0";; esac\n')
    if nvcc:
        (cuda / "bin" / "nvcc").write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {nvcc}, V{nvcc}.88"\n')
    for tool in [*bin_dir.iterdir(), *(cuda / "bin").iterdir()]:
        tool.chmod(0o755)
    if gpu:
        (py_dir / "sitecustomize.py").write_text(textwrap.dedent("""
            import torch
            torch.cuda.is_available = lambda: True
            torch.cuda.get_device_name = lambda *args: "NVIDIA H100 80GB HBM3"
            torch.cuda.get_device_capability = lambda *args: (9, 0)
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXELVIT_", "CUDA_HOME"))}
    env.update(PATH=os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), "/usr/bin", "/bin"]),
               PYTHONPATH=str(py_dir), PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               CUDA_HOME=str(cuda))
    return env


def run_check(env, timeout=300):
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    out = env["OUT"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    report = open(os.path.join(out, "report.txt")).read()
    return proc, summary, report


def returned_files(out):
    """What a GPU machine would send back from $OUT: at most 8 files, none more than two folders down."""
    files = [os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(out) for name in names]
    assert len(files) <= 8, files
    assert all(f.count(os.sep) <= 2 for f in files), files
    return sorted(files)


def archived(out):
    """The logs archive: {name: text} of each file in it."""
    with tarfile.open(os.path.join(out, "logs.tar.gz")) as tar:
        return {os.path.normpath(m.name): tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def mamba_ssm_sdist():
    sdist = sorted(glob.glob(os.path.join(ROOT, "sdists", "mamba_ssm-*.tar.gz")))
    if not sdist:
        pytest.skip("needs the mamba-ssm sdist in sdists/ (`.ci/run` fetches it; README, Tests)")
    return sdist[-1]


def test_the_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.parametrize("machine,reason", [
    ("no sdists", r"no mamba_ssm-\*\.tar\.gz in \S+/carry: fetch the kernel sources on a machine with network "
                  r"\(docs/kernels\.md\): MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download "
                  r"--no-deps --no-build-isolation --no-binary :all: -r tests/kernel_sdists\.txt -d sdists"),
    ("no python", r"no /nonexistent/python3 on PATH"),
    ("no torch", r"\S+python-without-packages cannot import torch \(ModuleNotFoundError: No module named 'torch'\)"),
    ("cpu torch", r"torch \S+ \(CUDA \S+\) sees no CUDA GPU; nvidia-smi: GPU 0: NVIDIA H100 80GB HBM3"),
])
def test_a_machine_the_check_cannot_use_stops_it_at_once_with_the_reason(tmp_path, machine, reason):
    env = stand_in_machine(tmp_path, gpu=machine not in ("cpu torch", "no torch"))
    carry = tmp_path / "carry"
    carry.mkdir()
    if machine != "no sdists":
        (carry / "mamba_ssm-2.3.2.post1.tar.gz").write_bytes(b"")   # only looked for before these exits
    env["GPU_CHECK_CARRY"] = str(carry)
    if machine == "no python":
        env["PYTHON"] = "/nonexistent/python3"
    if machine == "no torch":   # an interpreter without site-packages
        wrapper = tmp_path / "bin" / "python-without-packages"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
        wrapper.chmod(0o755)
        env["PYTHON"] = str(wrapper)
    start = time.time()
    proc, summary, report = run_check(env, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert time.time() - start < 60                      # nothing else was tried
    assert re.search(f"gpu_check: cannot run here: {reason}", report), report
    assert [s["step"] for s in summary["steps"]] == ["preflight"] and not summary["passed"]
    assert re.match(reason, summary["steps"][0]["note"])
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: FAILED at preflight: failed: ")
    assert returned_files(env["OUT"]) == ["logs.tar.gz", "report.txt", "summary.json"]


def declared_boxes():
    return {name: int(value) for name, value in
            re.findall(r"^(BOX_\w+|REPORT_RESERVE)=(\d+)$", open(SCRIPT).read(), flags=re.M)}


def test_the_time_boxes_fit_nine_minutes():
    boxes = declared_boxes()
    assert set(boxes) == {"BOX_PREFLIGHT", "BOX_MAMBA_SSM", "BOX_BUILD", "BOX_PARITY_TRITON", "BOX_PARITY_FUSED",
                          "BOX_PARITY_MODELS", "BOX_TABLE6", "REPORT_RESERVE"}
    # the build starts after the preflight; the wait for it ends 5 s after the build's box does
    longest = (boxes["BOX_PREFLIGHT"] + boxes["BOX_BUILD"] + 5 + boxes["BOX_PARITY_FUSED"]
               + boxes["BOX_PARITY_MODELS"] + boxes["BOX_TABLE6"] + boxes["REPORT_RESERVE"])
    assert longest <= 540
    # the two steps that run beside the build fit inside its box
    assert boxes["BOX_MAMBA_SSM"] + boxes["BOX_PARITY_TRITON"] <= boxes["BOX_BUILD"]
    # what the Triton kernels compile for each slice (docs/kernels.md): about 135 s for the bf16 tier
    # parity, about 100 s for the models slice
    assert boxes["BOX_PARITY_TRITON"] >= 200 and boxes["BOX_PARITY_MODELS"] >= 110
    assert "BUDGET=${GPU_CHECK_BUDGET:-540}" in open(SCRIPT).read()


def failing_build_carry(tmp_path):
    """What a GPU machine gets: mamba-ssm's sdist as published, and a causal-conv1d sdist whose
    build fails at once (the real one compiles for minutes)."""
    carry = tmp_path / "carry"
    carry.mkdir()
    shutil.copy(mamba_ssm_sdist(), carry)
    package = tmp_path / "causal_conv1d-1.5.2"
    package.mkdir()
    (package / "setup.py").write_text('import sys\nsys.exit("error: nvcc fatal : Unsupported gpu architecture")\n')
    with tarfile.open(carry / "causal_conv1d-1.5.2.tar.gz", "w:gz") as tar:
        tar.add(package, arcname=package.name)
    return carry


def stand_in_transformers(py_dir):
    """`import mamba_ssm` imports these names of transformers (for its language models), which the GPU
    image has and this machine need not."""
    package = py_dir / "transformers"
    (package / "utils").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "generation.py").write_text("GenerateDecoderOnlyOutput = TextStreamer = object\n")
    (package / "utils" / "__init__.py").write_text("WEIGHTS_NAME, CONFIG_NAME = 'model.bin', 'config.json'\n")
    (package / "utils" / "hub.py").write_text("def cached_file(*args, **kwargs):\n    raise OSError('offline')\n")


def selected_tests(junit_xml_text):
    return sorted(case.get("name") for case in ET.fromstring(junit_xml_text).iter("testcase"))


def test_dry_run_on_a_stand_in_gpu_runs_every_step_in_order_and_reports_the_failures(tmp_path):
    # the real parity slices and Table 6 on a stand-in GPU (they fail: there is none), a build that fails
    env = stand_in_machine(tmp_path)
    env["GPU_CHECK_CARRY"] = str(failing_build_carry(tmp_path))
    stand_in_transformers(tmp_path / "py")
    start = time.time()
    proc, summary, report = run_check(env)
    assert time.time() - start < 540
    steps = {s["step"]: s for s in summary["steps"]}
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert steps["preflight"]["status"] == "ok" and "sm_90" in steps["preflight"]["note"]
    # mamba-ssm is unpacked without its extension, and its Triton ops import through the stand-in
    assert steps["mamba-ssm"]["status"] == "ok", steps["mamba-ssm"]
    assert steps["causal-conv1d"]["status"] == "failed"
    assert "nvcc fatal : Unsupported gpu architecture" in steps["causal-conv1d"]["note"]
    out = env["OUT"]
    assert returned_files(out) == ["logs.tar.gz", "report.txt", "summary.json", "table6.json"]
    logs = archived(out)
    assert "nvcc fatal" in logs["build-causal-conv1d.log"]   # the whole log is kept
    assert "building causal_conv1d-1.5.2.tar.gz for sm_90" in logs["build-causal-conv1d.log"]
    # without the fused op its slice is skipped and its cases are left out of the later slices; every
    # other step still ran, and the parity slices selected what they name (no GPU here, so they fail)
    assert steps["parity-fused-bf16"]["status"] == "skipped"
    assert "needs causal-conv1d" in steps["parity-fused-bf16"]["note"]
    assert "pytest-fused-bf16.xml" not in logs
    assert selected_tests(logs["pytest-triton-ssd-bf16.xml"]) == [
        "test_mamba_kernel_matches_the_pytorch_path[mamba_ssm_triton_ssd-bfloat16]"]
    models = selected_tests(logs["pytest-models.xml"])
    assert "test_int32_batch_split_at_adventurer_b_patch_1[mamba_ssm_triton_ssd]" in models
    assert any("adv_b" in t for t in models) and not any("fused" in t for t in models)
    assert not any("deit_b" in t or "flash" in t for t in models)       # no flash-attn: left out
    assert "flash-attn is neither installed nor carried" in report
    rest = selected_tests(logs["pytest-rest.xml"])
    assert rest == ["test_mamba_kernel_matches_the_pytorch_path[mamba_ssm_triton_ssd-float16]",
                    "test_mamba_kernel_matches_the_pytorch_path[mamba_ssm_triton_ssd-float32]"]
    assert {steps[s]["status"] for s in STEPS[2:]} - {"failed", "skipped"} == set(), summary
    # Table 6 recorded every row's error, Adventurer-B first, and failed its step
    table6 = json.load(open(os.path.join(out, "table6.json")))
    assert table6["table6"][0]["model"] == "adv_b" and table6["table6"][0]["status"].startswith("error")
    assert "0 measured" in steps["table6"]["note"]
    assert proc.returncode == 1
    assert re.fullmatch(r"gpu_check: FAILED at parity-triton-ssd-bf16: failed: exit status 1; "
                        r"1 failed, 14 deselected in .*",
                        proc.stdout.strip().splitlines()[-1])


STAND_IN_PYTHON = """#!{python}
# A GPU machine's python whose parity slices and Table 6 pass: for the check's own logic. The slice
# named in $HANG_SLICE never ends. Everything else runs on this machine's python.
import json, os, re, sys, time
args = sys.argv[1:]
if args[:2] == ["-m", "pytest"] and "tests/test_gpu.py" in args:
    xml = next(a.split("=", 1)[1] for a in args if a.startswith("--junitxml="))
    if re.search(r"pytest-(\\S+)\\.xml", xml).group(1) == os.environ.get("HANG_SLICE"):
        time.sleep(3600)
    open(xml, "w").write('<testsuites><testsuite><testcase name="stand_in"/></testsuite></testsuites>')
    print("1 passed in 0.01s")
elif args[:2] == ["tests/benchmark.py", "--table6"]:
    json.dump({{"table6": [{{"model": "adv_b", "status": "ok"}}]}}, open(args[args.index("--json") + 1], "w"))
    print("Table 6: 1 measured")
else:
    os.execv({python!r}, [{python!r}] + args)
"""


def passing_machine(tmp_path, nvcc="13.0", headers=True, causal_conv1d=False):
    """A stand-in GPU on which every parity slice and Table 6 pass, mamba-ssm's sdist as published, and
    either a causal-conv1d that imports (a stand-in: the fused op's names, never called) or the real
    causal-conv1d sdist, which the check must then build."""
    env = stand_in_machine(tmp_path, nvcc=nvcc)
    py_dir = tmp_path / "py"
    stand_in_transformers(py_dir)
    python = tmp_path / "bin" / "python3"
    python.write_text(STAND_IN_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    env["PYTHON"] = str(python)
    if not headers:
        (tmp_path / "cuda" / "include" / "cuda_runtime.h").unlink()
    carry = tmp_path / "carry"
    carry.mkdir()
    shutil.copy(mamba_ssm_sdist(), carry)
    if causal_conv1d:
        (py_dir / "causal_conv1d").mkdir()
        (py_dir / "causal_conv1d_cuda.py").write_text("")
        (py_dir / "causal_conv1d" / "__init__.py").write_text("def causal_conv1d_fn(*args): pass\n")
        (py_dir / "causal_conv1d" / "cpp_functions.py").write_text(
            "def causal_conv1d_fwd_function(*args): pass\n"
            "causal_conv1d_bwd_function = causal_conv1d_update_function = causal_conv1d_fwd_function\n")
    else:
        shutil.copy(glob.glob(os.path.join(ROOT, "sdists", "causal_conv1d-*.tar.gz"))[-1], carry)
    env["GPU_CHECK_CARRY"] = str(carry)
    return env


@pytest.mark.parametrize("toolkit,reason", [
    ("no nvcc", r"no nvcc in \S+/cuda or on PATH"),
    ("no headers", r"no CUDA headers in \S+/cuda/include: set CUDA_HOME to the toolkit that holds \S+/nvcc"),
    ("nvcc 12.4", r"nvcc 12\.4 does not match torch's CUDA 13\.0: a CUDA 13\.x nvcc is needed"),
])
def test_a_toolkit_that_cannot_build_fails_only_the_build(tmp_path, toolkit, reason):
    env = passing_machine(tmp_path, nvcc={"no nvcc": None, "nvcc 12.4": "12.4"}.get(toolkit, "13.0"),
                          headers=toolkit != "no headers")
    proc, summary, report = run_check(env)
    steps = {s["step"]: s for s in summary["steps"]}
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert steps["causal-conv1d"]["status"] == "failed"
    assert re.fullmatch(f"exit status 1; cannot build causal-conv1d: {reason}", steps["causal-conv1d"]["note"])
    assert steps["parity-fused-bf16"]["status"] == "skipped"
    # the Triton tier, the models (their Triton-tier cases), Table 6 and the rest all ran
    assert {s: steps[s]["status"] for s in STEPS if s not in ("causal-conv1d", "parity-fused-bf16")} == \
        {s: "ok" for s in STEPS if s not in ("causal-conv1d", "parity-fused-bf16")}
    assert proc.returncode == 1 and not summary["passed"]
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: FAILED at causal-conv1d: failed: ")
    assert returned_files(env["OUT"]) == ["logs.tar.gz", "report.txt", "summary.json", "table6.json"]


def test_steps_cut_by_the_budget_are_named_and_do_not_fail_the_check(tmp_path):
    # every step passes, but the last parity slice would outlast the budget: it is cut, the exit is 0
    env = passing_machine(tmp_path, causal_conv1d=True)
    env.update(GPU_CHECK_BUDGET="60", HANG_SLICE="rest")
    start = time.time()
    proc, summary, report = run_check(env)
    assert time.time() - start < 90
    steps = {s["step"]: s for s in summary["steps"]}
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert "causal-conv1d is installed and imports: not built" in report
    assert {s: steps[s]["status"] for s in STEPS[:-1]} == {s: "ok" for s in STEPS[:-1]}
    assert steps["parity-rest"]["status"] == "cut" and "time budget" in steps["parity-rest"]["note"]
    assert summary["passed"] and summary["cut"] == ["parity-rest"]
    assert proc.returncode == 0
    assert proc.stdout.strip().splitlines()[-1] == \
        "gpu_check: every step that ran passed; cut by the time budget: parity-rest"
    assert returned_files(env["OUT"]) == ["logs.tar.gz", "report.txt", "summary.json", "table6.json"]


def test_keep_arch_keeps_only_this_gpus_architecture():
    setup_py = textwrap.dedent('''
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        if bare_metal_version >= Version("11.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_90,code=sm_90")
        if bare_metal_version >= Version("12.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_100,code=sm_100")
    ''')   # the pattern of mamba-ssm 2.3's and causal-conv1d 1.5-1.7's setup.py
    text = keep_arch(setup_py, "90")
    assert re.findall(r"code=sm_(\d+)", text) == ["90"]
    compile(text, "setup.py", "exec")   # an emptied `if` keeps a body: still Python
    with pytest.raises(ValueError, match="sm_89"):
        keep_arch(setup_py, "89")
