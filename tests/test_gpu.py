"""Kernel vs fallback parity on a GPU at Adventurer-B patch-1 shapes. Skipped without CUDA or kernels."""
import pytest
import torch

import pixelvit as pv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
mamba = pytest.mark.skipif(pv._mamba_fused_scan() is None, reason="needs mamba-ssm and causal-conv1d")
flash = pytest.mark.skipif(pv._flash_attn_func() is None, reason="needs flash-attn")

PIXELS_224 = 224 * 224 + 2  # the mixer sees N + CLS + the heading-average token


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_mixer(mixer, u, dtype, kernels, monkeypatch):
    monkeypatch.setattr(pv, "USE_KERNELS", kernels)
    mixer.zero_grad()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = mixer(u)
    out.float().square().mean().backward()
    return out.detach(), mixer.in_proj.weight.grad.clone(), mixer.last_path


@cuda
@mamba
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_fused_mixer_matches_fallback_at_adventurer_b_patch1(dtype, tolerance, monkeypatch):
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(768).cuda()
    u = torch.randn(2, PIXELS_224, 768, device="cuda")
    fused, fused_grad, path = run_mixer(mixer, u, dtype, True, monkeypatch)
    assert path == "mamba_ssm_fused"
    ref, ref_grad, path = run_mixer(mixer, u, dtype, False, monkeypatch)
    assert path == "torch_chunked_ssd"
    assert relative_error(fused, ref) < tolerance
    assert relative_error(fused_grad, ref_grad) < tolerance


@cuda
@mamba
def test_fused_mixer_splits_batches_past_the_int32_limit():
    # 14 images of Adventurer-B at patch 1 exceed 2**31 in_proj elements: one call would corrupt.
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(768).cuda().bfloat16()
    u = torch.randn(14, PIXELS_224, 768, device="cuda", dtype=torch.bfloat16)
    assert pv.kernel_batch_limit(PIXELS_224, mixer.in_proj.out_features) == 13
    with torch.no_grad():
        together = mixer(u)
        alone = mixer(u[13:])
    # (cuBLAS may tile the out_proj differently for another batch size: equal up to rounding)
    assert relative_error(together[13:], alone) < 1e-2


@cuda
@flash
def test_flash_attention_matches_sdpa(monkeypatch):
    torch.manual_seed(0)
    attn = pv.Attention(768, 12).cuda()
    x = torch.randn(2, 3137, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        flash_out = attn(x)
        assert attn.last_path == "flash_attn"
        monkeypatch.setattr(pv, "USE_KERNELS", False)
        sdpa_out = attn(x)
    assert relative_error(flash_out, sdpa_out) < 1e-2


@cuda
def test_gpu_matches_cpu_on_a_small_model():
    torch.manual_seed(0)
    model = pv.create_model("adv_t", patch=4, res=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    cpu = model(x)
    gpu = model.cuda()(x.cuda()).cpu()
    assert relative_error(gpu, cpu) < 1e-3
