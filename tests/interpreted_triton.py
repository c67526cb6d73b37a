"""The Triton SSD tier's real kernels, executed on a CPU by Triton's interpreter.

Not collected by the main run: tests/test_triton_tier.py runs this file with pytest in a process of its
own, because the interpreter must be switched on (tests/triton_cpu.py) before anything imports triton,
and reads the mamba-ssm sdist's folder from MAMBA_SSM_SOURCE. TRITON_TIER_BREAK=dt_bias drops the
dt_bias argument on its way to the kernel, a wiring fault that these tests must catch.
"""
import os
import sys
import types

import pytest
import torch

import pixelvit as pv
import triton_cpu  # switches the interpreter on and stands in for CUDA: before mamba-ssm defines its kernels
from test_gpu import compare, relative_error
from test_kernels import skip_without_a_gpu_driver

SOURCE = os.environ["MAMBA_SSM_SOURCE"]


@pytest.fixture(scope="module")
def ssd_combined():
    """mamba-ssm's ops/triton/ssd_combined.py from the unpacked sdist, without the package's __init__
    (it imports transformers and every compiled extension) and with a stand-in for the Mamba-1 scan's
    extension, which `ops/selective_scan_interface.py` imports and nothing here calls."""
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [os.path.join(SOURCE, "mamba_ssm")]
    sys.modules["mamba_ssm"] = package
    try:
        from mamba_ssm.ops.triton import ssd_chunk_scan, ssd_combined
    except RuntimeError as e:
        skip_without_a_gpu_driver(e)
    assert triton_cpu.interpreting(ssd_chunk_scan._chunk_scan_fwd_kernel)
    return ssd_combined


def scan_for_pixelvit(ssd_combined):
    scan = ssd_combined.mamba_chunk_scan_combined
    if os.environ.get("TRITON_TIER_BREAK") == "dt_bias":
        return lambda *args, dt_bias=None, **kwargs: scan(*args, **kwargs)
    return scan


def test_chunk_scan_matches_its_float64_reference(ssd_combined):
    # mamba_chunk_scan_combined (chunk cumsum, chunk state, state passing, bmm, chunk scan, and their
    # backward kernels) against mamba-ssm's PyTorch reference of it in float64, forward and the
    # gradient of every input; 96 tokens in 3 chunks of 32 (the reference takes whole chunks only),
    # 4 heads in 2 groups
    torch.manual_seed(0)
    b, l, h, p, g, n, chunk = 2, 96, 4, 16, 2, 16, 32
    inputs = dict(x=torch.randn(b, l, h, p), dt=torch.rand(b, l, h) - 0.5, A=-torch.rand(h) - 0.5,
                  B=torch.randn(b, l, g, n), C=torch.randn(b, l, g, n), D=torch.randn(h), z=torch.randn(b, l, h, p),
                  dt_bias=torch.rand(h) - 0.5)
    weights = torch.randn(b, l, h, p, dtype=torch.float64)
    results = {}
    for name, op, dtype in [("kernel", ssd_combined.mamba_chunk_scan_combined, torch.float32),
                            ("reference", ssd_combined.ssd_chunk_scan_combined_ref, torch.float64)]:
        leaves = {k: v.to(dtype, copy=True).requires_grad_() for k, v in inputs.items()}
        y = op(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk, D=leaves["D"], z=leaves["z"],
               dt_bias=leaves["dt_bias"], dt_softplus=True)
        (y.double() * weights).sum().backward()
        results[name] = {"output": y.detach(), **{k: v.grad for k, v in leaves.items()}}
    for name, reference in results["reference"].items():
        # float32 rounding over sums of a few hundred terms: about 1e-7 relative (a wrong index or
        # a dropped term is off by order 1)
        assert relative_error(results["kernel"][name], reference) < 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_pixelvit_triton_tier_matches_the_pytorch_path(ssd_combined, dtype, monkeypatch):
    # a small Adventurer block (with flip) whose mixer is sent to the Triton SSD tier on this CPU: the
    # same comparison as tests/test_gpu.py, forward and every gradient, against float64; 7 x 7 patch
    # tokens + CLS + the mean token = 51 tokens in chunks of 16, the last one partial
    monkeypatch.setattr(pv, "_mamba_chunk_scan", lambda: scan_for_pixelvit(ssd_combined))
    monkeypatch.setattr(pv.Mamba2Mixer, "kernel_path", lambda self, u: (
        "mamba_ssm_triton_ssd" if pv.USE_KERNELS and u.dtype != torch.float64 else "torch_chunked_ssd"))
    torch.manual_seed(0)
    block = pv.AdventurerBlock(64, dict(d_state=16, headdim=16, chunk_size=16), mlp_hidden=128, flip=True)
    with torch.no_grad():   # away from the initialisation's ones and zeros, so that each one matters
        block.mixer.D.uniform_(0.5, 1.5)
        block.mixer.norm.weight.uniform_(0.5, 1.5)
    compare(block, [torch.randn(2, 7 * 7 + 1, 64)], dtype, monkeypatch, "mamba_ssm_triton_ssd", "torch_chunked_ssd")
