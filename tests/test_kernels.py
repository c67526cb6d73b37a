"""Kernel selection on CPU, with stand-ins for the CUDA packages: which path is taken, and what the
user is told when a kernel cannot be used."""
import glob
import os
import re
import subprocess
import sys
import tarfile
import types
import warnings

import pytest
import torch

import pixelvit as pv
from helpers import ROOT

LOOKUPS = (pv._mamba_ssd_module, pv._mamba_fused_scan, pv._mamba_chunk_scan, pv._flash_attn_func)
CUDA_BF16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)   # what kernel_path reads


@pytest.fixture(autouse=True)
def fresh_kernel_lookup(monkeypatch):
    """Each test looks the kernels up afresh and leaves no cached stand-in behind."""
    monkeypatch.setattr(pv, "REQUIRE_KERNELS", False)
    monkeypatch.setattr(pv, "KERNEL_PROBLEMS", {})
    for lookup in LOOKUPS:
        lookup.cache_clear()
    yield
    for lookup in LOOKUPS:
        lookup.cache_clear()


def fused_op(*args, **kwargs):
    raise AssertionError("a stand-in: never called here")


def chunk_scan_op(*args, **kwargs):
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
    modules[-1].mamba_chunk_scan_combined = chunk_scan_op
    for name, value in conv_functions.items():
        setattr(modules[-1], name, value)


def missing(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)   # import raises ModuleNotFoundError


CAUSAL_CONV1D_OK = dict(causal_conv1d_fn=len, causal_conv1d_fwd_function=len, causal_conv1d_bwd_function=len)


def test_mamba_ssm_with_causal_conv1d_is_used(monkeypatch):
    install_mamba_ssm(monkeypatch, **CAUSAL_CONV1D_OK)
    assert pv._mamba_fused_scan() is fused_op and pv._mamba_chunk_scan() is chunk_scan_op
    mixer = pv.Mamba2Mixer(64, d_state=16, headdim=16)
    assert mixer.kernel_path(CUDA_BF16) == "mamba_ssm_fused"


@pytest.mark.parametrize("conv_functions", [
    dict(causal_conv1d_fn=None, causal_conv1d_fwd_function=None, causal_conv1d_bwd_function=None),  # >= 2.2.5
    dict(causal_conv1d_fn=None, causal_conv1d_cuda=None),                                             # 2.0-2.2
])
def test_mamba_ssm_without_a_usable_causal_conv1d_takes_the_triton_ssd(monkeypatch, conv_functions):
    # mamba-ssm imports fine, but its conv functions are None: the fused op's first forward would
    # fail, while its Triton SSD scan needs no causal-conv1d
    install_mamba_ssm(monkeypatch, **conv_functions)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match=r"causal-conv1d >= 1\.5\.1"):
        assert pv._mamba_fused_scan() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pv._mamba_fused_scan() is None   # warned once per process, not per call
        assert pv._mamba_chunk_scan() is chunk_scan_op
        mixer = pv.Mamba2Mixer(64, d_state=16, headdim=16)
        assert mixer.kernel_path(CUDA_BF16) == "mamba_ssm_triton_ssd"
    report = pv.backends()
    assert (report["mamba_ssm_fused"], report["mamba_ssm_triton_ssd"]) == (False, True)
    assert "causal-conv1d >= 1.5.1" in report["why"]["mamba_ssm_fused"]


@pytest.mark.parametrize("setting,value,path", [
    ("USE_FUSED_MAMBA", False, "mamba_ssm_triton_ssd"),   # PIXELVIT_FUSED_MAMBA=0
    ("USE_KERNELS", False, "torch_chunked_ssd"),          # PIXELVIT_KERNELS=0
])
def test_settings_choose_the_tier(monkeypatch, setting, value, path):
    install_mamba_ssm(monkeypatch, **CAUSAL_CONV1D_OK)
    monkeypatch.setattr(pv, setting, value)
    mixer = pv.Mamba2Mixer(64, d_state=16, headdim=16)
    assert mixer.kernel_path(CUDA_BF16) == path


def test_only_cuda_below_float64_takes_a_kernel(monkeypatch):
    install_mamba_ssm(monkeypatch, **CAUSAL_CONV1D_OK)
    mixer = pv.Mamba2Mixer(64, d_state=16, headdim=16)
    assert mixer.kernel_path(types.SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "torch_chunked_ssd"
    assert mixer.kernel_path(torch.zeros(1, dtype=torch.bfloat16)) == "torch_chunked_ssd"   # CPU


def test_missing_kernels_warn_with_the_reason_only_where_cuda_is(monkeypatch):
    missing(monkeypatch, "mamba_ssm", "flash_attn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a CPU machine: nothing to say
        assert pv._mamba_fused_scan() is None and pv._flash_attn_func() is None
    for lookup in LOOKUPS:
        lookup.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match="mamba_ssm_fused kernels unavailable.*ModuleNotFoundError"):
        assert pv._mamba_fused_scan() is None
    with pytest.warns(UserWarning, match="mamba_ssm_triton_ssd kernels unavailable.*ModuleNotFoundError"):
        assert pv._mamba_chunk_scan() is None
    with pytest.warns(UserWarning, match="flash_attn kernels unavailable.*ModuleNotFoundError"):
        assert pv._flash_attn_func() is None


def test_required_kernels_fail_only_the_mixer_that_lacks_one(monkeypatch):
    monkeypatch.setattr(pv, "REQUIRE_KERNELS", True)
    attention, mixer = pv.Attention(64, 4), pv.Mamba2Mixer(64, d_state=16, headdim=16)
    # flash-attn missing, mamba-ssm's Triton SSD there: only attention on CUDA is an error
    install_mamba_ssm(monkeypatch, causal_conv1d_fn=None)
    missing(monkeypatch, "flash_attn")
    report = pv.backends()                       # reports, never raises
    assert not report["flash_attn"] and "ModuleNotFoundError" in report["why"]["flash_attn"]
    assert mixer.kernel_path(CUDA_BF16) == "mamba_ssm_triton_ssd"
    with pytest.raises(RuntimeError, match="Attention found no usable kernel.*PIXELVIT_REQUIRE_KERNELS=1"):
        attention.kernel_path(CUDA_BF16)
    assert attention.kernel_path(torch.zeros(1, dtype=torch.bfloat16)) == "sdpa"   # CPU: SDPA is the path
    # no mamba-ssm at all: the mixer on CUDA is an error too
    missing(monkeypatch, "mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined")
    for lookup in LOOKUPS:
        lookup.cache_clear()
    with pytest.raises(RuntimeError, match="Mamba2Mixer found no usable kernel.*mamba_ssm_triton_ssd"):
        mixer.kernel_path(CUDA_BF16)


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


# --- the fused op's wiring, against mamba-ssm's own reference of it ---------------------------

SDIST_HINT = ("needs the mamba-ssm and causal-conv1d sdists in sdists/ (`.ci/run` fetches them; "
              "README, Tests)")


def skip_without_a_gpu_driver(error):
    """Triton before 3.4 (torch 2.6 comes with 3.2) defines an autotuned kernel only where a GPU driver
    is active: mamba-ssm's ops then cannot even be imported on a CPU machine."""
    import triton
    if "active drivers" not in str(error):
        raise error
    pytest.skip(f"triton {triton.__version__} defines mamba-ssm's autotuned kernels only with a GPU driver: {error}")


@pytest.fixture
def ssd_combined(tmp_path, monkeypatch):
    """mamba-ssm's `ops/triton/ssd_combined.py` from the sdists in sdists/, on CPU, with its pure-
    PyTorch references wired in where it calls CUDA: the fused op's reference
    `mamba_split_conv1d_scan_ref` (the one its tests hold the fused op to) calls causal-conv1d,
    selective_scan and the gated norm, which are pointed at the packages' own references
    (causal_conv1d_ref, selective_scan_ref, rms_norm_ref). The package's __init__ is skipped (it
    imports transformers and every compiled extension); the two compiled extensions are stubbed."""
    sdists = [glob.glob(os.path.join(ROOT, "sdists", f"{name}-*.tar.gz")) for name in ("mamba_ssm", "causal_conv1d")]
    if not all(sdists):
        pytest.skip(SDIST_HINT)
    pytest.importorskip("triton", reason="mamba-ssm's ops import triton (it comes with torch's CUDA builds)")
    for found in sdists:
        with tarfile.open(sorted(found)[-1]) as tar:
            tar.extractall(tmp_path, filter="data")
    before = set(sys.modules)
    try:
        monkeypatch.setattr(sys, "path", [str(p) for p in tmp_path.iterdir()] + sys.path)
        for extension in ("selective_scan_cuda", "causal_conv1d_cuda"):
            monkeypatch.setitem(sys.modules, extension, types.ModuleType(extension))
        package = types.ModuleType("mamba_ssm")
        package.__path__ = [str(next(tmp_path.glob("mamba_ssm-*")) / "mamba_ssm")]
        monkeypatch.setitem(sys.modules, "mamba_ssm", package)
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
        try:
            from mamba_ssm.ops import selective_scan_interface
            from mamba_ssm.ops.triton import layernorm_gated, ssd_combined
        except RuntimeError as e:
            skip_without_a_gpu_driver(e)
        monkeypatch.setattr(ssd_combined, "causal_conv1d_fn", causal_conv1d_ref)
        monkeypatch.setattr(selective_scan_interface, "selective_scan_fn", selective_scan_interface.selective_scan_ref)
        monkeypatch.setattr(ssd_combined, "rmsnorm_fn", lambda x, weight, bias, z, eps, norm_before_gate:
                            layernorm_gated.rms_norm_ref(x, weight, bias, z=z, eps=eps,
                                                         norm_before_gate=norm_before_gate))
        yield ssd_combined
    finally:
        for name in set(sys.modules) - before:   # leave no mamba_ssm behind for the kernel lookups
            if name.split(".")[0] in ("mamba_ssm", "causal_conv1d"):
                del sys.modules[name]


def wiring_mixer():
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(64, d_state=16, headdim=16, chunk_size=32).double()
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.conv1d.bias.uniform_(-0.5, 0.5)
        mixer.D.uniform_(0.5, 1.5)
    return mixer


def test_fused_path_passes_what_mamba_ssm_expects(ssd_combined, monkeypatch):
    # every argument _fused hands the fused op (conv weight layout, dt_bias, A, D, gated-norm
    # order, heads, groups), checked by the op's own reference against the PyTorch path
    mixer = wiring_mixer()
    monkeypatch.setattr(pv, "_mamba_fused_scan", lambda: ssd_combined.mamba_split_conv1d_scan_ref)
    u = torch.randn(3, 70, 64, dtype=torch.float64)
    fused = mixer._fused(mixer.in_proj(u))
    # the op takes A in float32, as the kernels do: equal up to that rounding
    assert torch.allclose(fused, mixer._torch(u), rtol=1e-5, atol=1e-6)


def test_triton_ssd_path_passes_what_mamba_ssm_expects(ssd_combined, monkeypatch):
    # the middle tier: x/B/C/dt layout, dt_bias with softplus inside the scan, D, chunk size, the
    # conv cropped to causal, checked with mamba-ssm's reference of `mamba_chunk_scan_combined`
    # (the same chunk_state / state_passing / chunk_scan steps in PyTorch; it takes whole chunks
    # only, so 96 tokens = 3 chunks of 32)
    mixer = wiring_mixer()
    calls = []

    def reference_scan(*args, **kwargs):
        calls.append(kwargs)
        return ssd_combined.ssd_chunk_scan_combined_ref(*args, **kwargs)

    monkeypatch.setattr(pv, "_mamba_chunk_scan", lambda: reference_scan)
    u = torch.randn(3, 96, 64, dtype=torch.float64)
    assert torch.allclose(mixer._triton_ssd(u), mixer._torch(u), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1 and calls[0]["dt_softplus"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the GPU tests run for real")
@pytest.mark.parametrize("required,outcome", [("1", "failed"), ("0", "skipped")])
def test_gpu_tests_fail_instead_of_skipping_when_kernels_are_required(required, outcome):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          cwd=ROOT, env={**os.environ, "PIXELVIT_REQUIRE_KERNELS": required},
                          capture_output=True, text=True, timeout=300)
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"\d+ {outcome} in .*", summary), summary   # every test, none passed
    assert proc.returncode == (1 if outcome == "failed" else 0)
