"""The Triton SSD tier executed, not only wired: tests/interpreted_triton.py runs mamba-ssm's Triton
kernels on this CPU under Triton's interpreter (mamba_chunk_scan_combined against its float64
reference; pixelvit's mixer sent to that tier against the PyTorch path in float32 and bf16), in a
process of its own, since the interpreter must be on before triton is imported."""
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tarfile

import pytest

from helpers import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton (it comes with torch's CUDA builds on Linux)")


@pytest.fixture(scope="module")
def mamba_ssm_source(tmp_path_factory):
    sdists = sorted(glob.glob(os.path.join(ROOT, "sdists", "mamba_ssm-*.tar.gz")))
    if not sdists:
        pytest.skip("needs the mamba-ssm sdist in sdists/ (`.ci/run` fetches it; README, Tests)")
    folder = tmp_path_factory.mktemp("mamba_ssm")
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(folder, filter="data")
    return str(next(folder.glob("mamba_ssm-*")))


def run_interpreted(source, *pytest_args, **env):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join("tests", "interpreted_triton.py"), *pytest_args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "1", "MAMBA_SSM_SOURCE": source, **env})


def skip_if_skipped(proc):
    """The interpreted tests skip where this triton cannot define mamba-ssm's kernels; so does this one."""
    if re.search(r"^\d+ skipped", proc.stdout, flags=re.M):
        pytest.skip(re.findall(r"^SKIPPED \[\d+\] \S+ (.*)$", proc.stdout, flags=re.M)[0])


def test_the_triton_tier_runs_its_kernels_and_matches(mamba_ssm_source):
    proc = run_interpreted(mamba_ssm_source)
    skip_if_skipped(proc)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"^3 passed", proc.stdout, flags=re.M), proc.stdout[-2000:]


def test_a_wiring_fault_in_the_triton_tier_is_caught(mamba_ssm_source):
    # pixelvit's call with dt_bias dropped on its way to the kernel: the comparison must fail, on the output
    proc = run_interpreted(mamba_ssm_source, "-k", "pixelvit and float32", TRITON_TIER_BREAK="dt_bias")
    skip_if_skipped(proc)
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert re.search(r"^1 failed, 2 deselected", proc.stdout, flags=re.M), proc.stdout[-2000:]
    assert "AssertionError: output" in proc.stdout
