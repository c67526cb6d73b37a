"""Kernel selection on CPU, with stand-ins for the CUDA packages: which path is taken, and what the
user is told when a kernel cannot be used."""
import glob
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import types
import warnings

import pytest
import torch

import pixelvit as pv
from helpers import ROOT
from keep_arch import keep_arch


LOOKUPS = (pv._mamba_fused_scan, pv._flash_attn_func)   # cached once per process


@pytest.fixture(autouse=True)
def fresh_kernel_lookup(monkeypatch):
    """Each test looks the kernels up afresh and leaves no cached stand-in behind."""
    monkeypatch.delenv("PIXELVIT_REQUIRE_KERNELS", raising=False)
    for lookup in LOOKUPS:
        lookup.cache_clear()
    yield
    for lookup in LOOKUPS:
        lookup.cache_clear()


def fused_op(*args, **kwargs):
    raise AssertionError("a stand-in: never called here")


def install_mamba_ssm(monkeypatch, **conv_functions):
    """A stand-in mamba_ssm.ops.triton.ssd_combined with the causal-conv1d names it imported."""
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined"]
    modules = [types.ModuleType(name) for name in names]
    for parent, child, name in zip(modules, modules[1:], names[1:]):
        setattr(parent, name.rsplit(".", 1)[1], child)
    for name, module in zip(names, modules):
        monkeypatch.setitem(sys.modules, name, module)
    modules[-1].mamba_split_conv1d_scan_combined = fused_op
    for name, value in conv_functions.items():
        setattr(modules[-1], name, value)


def missing(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)   # import raises ModuleNotFoundError


def test_mamba_ssm_with_causal_conv1d_is_used(monkeypatch):
    install_mamba_ssm(monkeypatch, causal_conv1d_fn=len, causal_conv1d_fwd_function=len,
                      causal_conv1d_bwd_function=len)
    assert pv._mamba_fused_scan() is fused_op


@pytest.mark.parametrize("conv_functions", [
    dict(causal_conv1d_fn=None, causal_conv1d_fwd_function=None, causal_conv1d_bwd_function=None),  # >= 2.2.5
    dict(causal_conv1d_fn=None, causal_conv1d_cuda=None),                                             # 2.0-2.2
])
def test_mamba_ssm_without_a_usable_causal_conv1d_is_refused(monkeypatch, conv_functions):
    # mamba-ssm imports fine, but its conv functions are None: the first forward would fail
    install_mamba_ssm(monkeypatch, **conv_functions)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match=r"causal-conv1d >= 1\.5\.1"):
        assert pv._mamba_fused_scan() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pv._mamba_fused_scan() is None   # warned once per process, not per call


def test_missing_kernels_warn_with_the_reason_only_where_cuda_is(monkeypatch):
    missing(monkeypatch, "mamba_ssm", "flash_attn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a CPU machine: nothing to say
        assert pv._mamba_fused_scan() is None and pv._flash_attn_func() is None
    for lookup in LOOKUPS:
        lookup.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match="mamba-ssm kernels unavailable.*ModuleNotFoundError"):
        assert pv._mamba_fused_scan() is None
    with pytest.warns(UserWarning, match="flash-attn kernels unavailable.*ModuleNotFoundError"):
        assert pv._flash_attn_func() is None


def test_required_kernels_that_are_missing_are_an_error(monkeypatch):
    missing(monkeypatch, "mamba_ssm", "flash_attn")
    monkeypatch.setenv("PIXELVIT_REQUIRE_KERNELS", "1")
    with pytest.raises(RuntimeError, match="mamba-ssm.*PIXELVIT_REQUIRE_KERNELS=1"):
        pv._mamba_fused_scan()
    with pytest.raises(RuntimeError, match="flash-attn.*PIXELVIT_REQUIRE_KERNELS=1"):
        pv._flash_attn_func()
    with pytest.raises(RuntimeError, match="PIXELVIT_REQUIRE_KERNELS"):
        pv.backends()


@pytest.mark.parametrize("d_conv,expand,accepted", [(4, 2, True), (2, 2, True), (5, 2, False), (1, 2, False)])
def test_configurations_the_kernels_reject_take_the_pytorch_path(d_conv, expand, accepted):
    mixer = pv.Mamba2Mixer(64, d_state=16, d_conv=d_conv, expand=expand, headdim=16)
    assert mixer.kernel_accepts_config() == accepted
    # 16 heads of 2 channels: conv_dim 32 + 2 * 3 = 38 channels, not a multiple of 8
    assert not pv.Mamba2Mixer(16, d_state=3, headdim=2).kernel_accepts_config()


def test_a_batch_that_fits_one_kernel_call_is_not_copied(monkeypatch):
    mixer = pv.Mamba2Mixer(32, d_state=8, headdim=16)
    result = torch.randn(3, 5, 32)
    monkeypatch.setattr(pv, "_mamba_fused_scan", lambda: lambda zxbcdt, **kwargs: result)
    assert mixer._fused(mixer.in_proj(torch.randn(3, 5, 32))) is result


# --- the one-shot GPU check -------------------------------------------------------------------

SETUP_PY = '''
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        if bare_metal_version >= Version("11.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_90,code=sm_90")
        if bare_metal_version >= Version("12.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_100,code=sm_100")
'''


def test_kernel_builds_keep_only_this_gpus_architecture():
    # the pattern of mamba-ssm 2.3 and causal-conv1d 1.7's setup.py
    text = keep_arch(SETUP_PY, "90")
    assert re.findall(r"code=sm_(\d+)", text) == ["90"]
    compile(textwrap.dedent(text), "setup.py", "exec")   # an emptied `if` keeps a body: still Python
    with pytest.raises(ValueError, match="sm_89"):
        keep_arch(SETUP_PY, "89")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script builds and benchmarks")
def test_gpu_check_script_runs_its_cpu_part(tmp_path):
    script = os.path.join(ROOT, "tests", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    proc = subprocess.run(["bash", script], env={**os.environ, "OUT": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "report.txt").read_text()
    assert f"torch {torch.__version__}" in report and "GPU: none" in report
    assert "no CUDA GPU: kernel build, parity tests and Table 6 are skipped" in report


# --- the fused op's wiring, against mamba-ssm's own reference of it ---------------------------

@pytest.fixture
def mamba_ssm_reference(tmp_path, monkeypatch):
    """mamba-ssm's pure-PyTorch `mamba_split_conv1d_scan_ref`, the reference its tests hold the
    fused CUDA op to, run on CPU from the sdists in sdists/ (see README, Kernels): the two compiled
    extensions are stubbed, and the three CUDA calls inside the reference are pointed at the
    packages' own pure-PyTorch references (causal_conv1d_ref, selective_scan_ref, rms_norm_ref)."""
    sdists = [glob.glob(os.path.join(ROOT, "sdists", f"{name}-*.tar.gz")) for name in ("mamba_ssm", "causal_conv1d")]
    if not all(sdists):
        pytest.skip("needs the mamba-ssm and causal-conv1d sdists in sdists/: pip download --no-deps "
                    "--no-binary :all: mamba-ssm causal-conv1d -d sdists")
    for found in sdists:
        with tarfile.open(sorted(found)[-1]) as tar:
            tar.extractall(tmp_path, filter="data")
    before = set(sys.modules)
    monkeypatch.setattr(sys, "path", [str(p) for p in tmp_path.iterdir()] + sys.path)
    for extension in ("selective_scan_cuda", "causal_conv1d_cuda"):
        monkeypatch.setitem(sys.modules, extension, types.ModuleType(extension))
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
    from mamba_ssm.ops import selective_scan_interface
    from mamba_ssm.ops.triton import layernorm_gated, ssd_combined
    monkeypatch.setattr(ssd_combined, "causal_conv1d_fn", causal_conv1d_ref)
    monkeypatch.setattr(selective_scan_interface, "selective_scan_fn", selective_scan_interface.selective_scan_ref)
    monkeypatch.setattr(ssd_combined, "rmsnorm_fn", lambda x, weight, bias, z, eps, norm_before_gate:
                        layernorm_gated.rms_norm_ref(x, weight, bias, z=z, eps=eps, norm_before_gate=norm_before_gate))
    yield ssd_combined.mamba_split_conv1d_scan_ref
    for name in set(sys.modules) - before:   # leave no mamba_ssm behind for the kernel lookups
        if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
            del sys.modules[name]


def test_fused_path_passes_what_mamba_ssm_expects(mamba_ssm_reference, monkeypatch):
    # every argument _fused hands the fused op (conv weight layout, dt_bias, A, D, gated-norm
    # order, heads, groups), checked by the op's own reference against the PyTorch path
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(64, d_state=16, headdim=16, chunk_size=32).double()
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.conv1d.bias.uniform_(-0.5, 0.5)
        mixer.D.uniform_(0.5, 1.5)
    monkeypatch.setattr(pv, "_mamba_fused_scan", lambda: mamba_ssm_reference)
    u = torch.randn(3, 70, 64, dtype=torch.float64)
    fused = mixer._fused(mixer.in_proj(u))
    # the op takes A in float32, as the kernels do: equal up to that rounding
    assert torch.allclose(fused, mixer._torch(u), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the GPU tests run for real")
@pytest.mark.parametrize("required,outcome", [("1", "failed"), ("0", "skipped")])
def test_gpu_tests_fail_instead_of_skipping_when_kernels_are_required(required, outcome):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          cwd=ROOT, env={**os.environ, "PIXELVIT_REQUIRE_KERNELS": required},
                          capture_output=True, text=True, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"\d+ {outcome} in .*", summary), summary   # every test, none passed
    assert proc.returncode == (1 if outcome == "failed" else 0)
