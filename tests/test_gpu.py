"""Kernels against the PyTorch paths on a GPU, each against a float64 reference.

Without a GPU or kernels these tests skip; with PIXELVIT_REQUIRE_KERNELS=1 (tests/gpu_check.sh sets
it) they fail instead, so that a broken kernel install cannot pass. Each mamba-ssm tier is tested on
its own (the fused op, and the Triton SSD scan that runs without causal-conv1d); the tests that need
flash-attn carry the `flash_attn` mark, so a machine without it can leave out just those
(`-m "not flash_attn"`).

Tolerances: a kernel may be off the float64 reference by at most four times what the PyTorch path is
off at the same precision (a wrong argument is off by order 1), or by a floor where the kernels'
arithmetic differs by design: Triton's dot
runs TF32 even for float32 inputs, which mamba-ssm's own tests allow for with rtol 1e-2 / atol 3e-3
(tests/ops/triton/test_ssd.py), and FlashAttention keeps its softmax statistics in float32 but its
probabilities in the input dtype.
"""

import pytest
import torch

import pixelvit as pv

REQUIRED = pv.REQUIRE_KERNELS
PIXELS_224 = 224 * 224 + 2      # the mixer sees N + CLS + the heading-average token
FLOOR = {torch.float32: 3e-3, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def require(mamba=None, flash=False):
    """Skip (fail under PIXELVIT_REQUIRE_KERNELS=1) unless CUDA and the named kernels are there:
    mamba="mamba_ssm_fused" or "mamba_ssm_triton_ssd" (a tier), "any" (either tier)."""
    tiers = {"mamba_ssm_fused": pv._mamba_fused_scan, "mamba_ssm_triton_ssd": pv._mamba_chunk_scan}
    if mamba is None:
        mamba_ok = True
    elif mamba == "any":
        mamba_ok = any(lookup() is not None for lookup in tiers.values())
    else:
        mamba_ok = tiers[mamba]() is not None
    missing = [what for what, ok in [("a CUDA GPU", torch.cuda.is_available()),
                                     (f"mamba-ssm's {mamba} kernels", mamba_ok),
                                     ("flash-attn", not flash or pv._flash_attn_func())] if not ok]
    if missing:
        (pytest.fail if REQUIRED else pytest.skip)(f"needs {', '.join(missing)}: {pv.KERNEL_PROBLEMS}")


def best_mamba_tier():
    return "mamba_ssm_fused" if pv._mamba_fused_scan() else "mamba_ssm_triton_ssd"


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def mixer_paths(module):
    """The paths the token mixers in `module` (or `module` itself) took in their last forward."""
    return set(pv.backends(module)["mixers"].values())


def outputs_and_grads(module, inputs, dtype, kernels, monkeypatch, weights):
    """Output and the gradients of the inputs and of every parameter, in float64 for comparison."""
    monkeypatch.setattr(pv, "USE_KERNELS", kernels)
    module.zero_grad()
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    autocast = dtype in (torch.bfloat16, torch.float16)
    with torch.autocast(inputs[0].device.type, dtype=dtype, enabled=autocast):
        out = module(*inputs)
    (out.double() * weights).sum().backward()
    # a parameter that this path never reached gets zeros, so that the comparison names it
    grads = {"input": inputs[0].grad, **{n: torch.zeros_like(p) if p.grad is None else p.grad
                                         for n, p in module.named_parameters()}}
    return out.detach().double(), {k: v.double() for k, v in grads.items()}


def compare(module, inputs, dtype, monkeypatch, kernel_path, torch_path):
    """Kernel and PyTorch path at `dtype`, each against the PyTorch path in float64. `module` is a
    token mixer or holds them (an Adventurer block); its output has the shape of its first input."""
    weights = torch.randn(inputs[0].shape, dtype=torch.float64, device=inputs[0].device)   # out = in shape
    reference = outputs_and_grads(module.double(), [t.double() for t in inputs], torch.float64, False,
                                  monkeypatch, weights)
    module.float()
    fallback = outputs_and_grads(module, inputs, dtype, False, monkeypatch, weights)
    assert mixer_paths(module) == {torch_path}
    kernel = outputs_and_grads(module, inputs, dtype, True, monkeypatch, weights)
    assert mixer_paths(module) == {kernel_path}
    for name in ["output"] + list(reference[1]):
        pick = (lambda r: r[0]) if name == "output" else (lambda r, name=name: r[1][name])   # noqa: E731
        allowed = max(4 * relative_error(pick(fallback), pick(reference)), FLOOR[dtype])
        assert relative_error(pick(kernel), pick(reference)) <= allowed, name


DTYPES = dict(argnames="dtype", argvalues=[torch.float32, torch.bfloat16, torch.float16],
              ids=["float32", "bfloat16", "float16"])
TIERS = ["mamba_ssm_fused", "mamba_ssm_triton_ssd"]


@pytest.mark.parametrize(**DTYPES)
@pytest.mark.parametrize("tier", TIERS)
def test_mamba_kernel_matches_the_pytorch_path(tier, dtype, monkeypatch):
    # forward and every gradient: input, in_proj, conv weight and bias, dt_bias, A_log, D, norm, out_proj
    require(mamba=tier)
    monkeypatch.setattr(pv, "USE_FUSED_MAMBA", tier == "mamba_ssm_fused")
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(768).cuda()                     # Adventurer-B's mixer
    u = torch.randn(2, 56 * 56 + 2, 768, device="cuda")    # 224 px at patch 4
    compare(mixer, [u], dtype, monkeypatch, tier, "torch_chunked_ssd")


@pytest.mark.flash_attn
@pytest.mark.parametrize(**{**DTYPES, "argvalues": DTYPES["argvalues"][1:], "ids": DTYPES["ids"][1:]})
def test_flash_attention_matches_sdpa(dtype, monkeypatch):
    require(flash=True)
    torch.manual_seed(0)
    attention = pv.Attention(768, 12).cuda()               # DeiT-B's attention
    x = torch.randn(2, 56 * 56 + 1, 768, device="cuda")
    compare(attention, [x], dtype, monkeypatch, "flash_attn", "sdpa")


@pytest.mark.parametrize("tier", TIERS)
def test_int32_batch_split_at_adventurer_b_patch_1(tier, monkeypatch):
    # 14 images of Adventurer-B at 224 px, patch 1 exceed 2**31 in_proj elements: one kernel call
    # would corrupt memory. Images 0, 12 and 13 (both sides of the split at 13) against their own
    # batch-1 runs, forward and backward.
    require(mamba=tier)
    monkeypatch.setattr(pv, "USE_FUSED_MAMBA", tier == "mamba_ssm_fused")
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(768).cuda().bfloat16()
    assert pv.kernel_batch_limit(PIXELS_224, mixer.in_proj.out_features) == 13
    u = torch.randn(14, PIXELS_224, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.randn(14, PIXELS_224, 768, device="cuda", dtype=torch.bfloat16)
    together = mixer(u)
    (together * weights).float().sum().backward()
    assert mixer.last_path == tier
    together = together.detach()
    for i in (0, 12, 13):
        alone = u[i:i + 1].detach().requires_grad_(True)
        out = mixer(alone)
        (out * weights[i:i + 1]).float().sum().backward()
        # the same kernels on the same numbers; cuBLAS may tile out_proj differently per batch size
        assert relative_error(together[i:i + 1], out.detach()) < 1e-2, i
        assert relative_error(u.grad[i:i + 1], alone.grad) < 1e-2, i


@pytest.mark.parametrize("name", ["adv_b", pytest.param("deit_b", marks=pytest.mark.flash_attn)])
@pytest.mark.parametrize("patch", [16, 4])
def test_model_logits_kernels_against_the_pytorch_paths(name, patch, monkeypatch):
    # Adventurer-B with the best mamba-ssm tier there is, DeiT-B with FlashAttention
    require(mamba="any" if name.startswith("adv") else None, flash=name.startswith("deit"))
    torch.manual_seed(0)
    model = pv.create_model(name, patch=patch).cuda().eval()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        reference = model.double()(images.double())
        model.float()
        results = {}
        for kernels in (True, False):
            monkeypatch.setattr(pv, "USE_KERNELS", kernels)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                results[kernels] = model(images)
            results[kernels, "paths"] = mixer_paths(model)
    assert results[True, "paths"] == {best_mamba_tier() if name.startswith("adv") else "flash_attn"}
    allowed = max(4 * relative_error(results[False], reference), FLOOR[torch.bfloat16])
    assert relative_error(results[True], reference) <= allowed


def test_gpu_matches_cpu_on_a_small_model():
    require()
    torch.manual_seed(0)
    model = pv.create_model("adv_t", patch=4, res=32, depth=2).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cpu = model(x)
    gpu = model.cuda()(x.cuda()).cpu()      # float64: the PyTorch path on both
    assert relative_error(gpu, cpu) < 1e-12
