"""Models: official key layout and sizes, equivalence with independent references, the API."""
import dataclasses
import os
import re

import pytest
import torch
import torch.nn.functional as F

import pixelvit as pv
from reference import adventurer_reference, mixer_after_in_proj


def tiny(name, **kw):
    """A small model for CPU tests; any option can be overridden."""
    size = dict(embed_dim=64, depth=4, patch=4, res=16, num_classes=7)
    if name.startswith("deit"):
        size["num_heads"] = 4
    else:
        size.update(d_state=16, headdim=32, chunk_size=8)
    return pv.create_model(name, **{**size, **kw})


def perturb_norm_weights(model, seed=0):
    """Norm weights start at 1; make them random so that the tests see their effect."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --- layout and sizes against the official code ------------------------------------------------

def official_adventurer_keys(D=256, depth=12, classes=1000, patch=16, res=224):
    """The state dict of wangf3014/Patch_Scaling's adventurer_tiny_patch16 (`models_mamba.py`), in order."""
    d_inner, nheads, hidden = 2 * D, 2 * D // 64, int(2.5 * D)
    conv = d_inner + 128
    keys = [("cls_token", (1, 1, D)), ("pos_embed", (1, (res // patch) ** 2 + 1, D)),
            ("patch_embed.proj.weight", (D, 3, patch, patch)), ("patch_embed.proj.bias", (D,)),
            ("head.weight", (classes, D)), ("head.bias", (classes,))]
    for i in range(depth):
        m = f"layers.{i}.mixer."
        keys += [(m + "dt_bias", (nheads,)), (m + "A_log", (nheads,)), (m + "D", (nheads,)),
                 (m + "in_proj.weight", (2 * d_inner + 128 + nheads, D)),
                 (m + "conv1d.weight", (conv, 1, 4)), (m + "conv1d.bias", (conv,)),
                 (m + "norm.weight", (d_inner,)), (m + "out_proj.weight", (D, d_inner)),
                 (f"layers.{i}.norm.weight", (D,))]
        for w in ("w1", "w2"):
            keys += [(f"layers.{i}.mlp.{w}.weight", (hidden, D)), (f"layers.{i}.mlp.{w}.bias", (hidden,))]
        keys += [(f"layers.{i}.mlp.w3.weight", (D, hidden)), (f"layers.{i}.mlp.w3.bias", (D,)),
                 (f"layers.{i}.norm_mlp.weight", (D,))]
    return keys + [("norm_f.weight", (D,))]


def test_adventurer_tiny_state_dict_is_the_official_one():
    with torch.device("meta"):
        sd = pv.create_model("adventurer_tiny_patch16").state_dict()
    got = [(k, tuple(v.shape)) for k, v in sd.items()]
    assert got == official_adventurer_keys()
    assert len(got) == 199  # the official model: 7 + 16 x 12 tensors, no buffers
    assert sum(v.numel() for v in sd.values()) == 11_608_840
    # the in_proj split of Tiny is [z 512 | x 512 | B 64 | C 64 | dt 8]
    assert sd["layers.0.mixer.in_proj.weight"].shape[0] == 512 + 512 + 64 + 64 + 8


def test_deit_state_dict_is_timms():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = pv.create_model("deit_tiny_patch16_224").state_dict()
        theirs = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in theirs.items()]
    assert len(ours) == 152


# Counted by instantiating the official Patch_Scaling modules (`models_mamba.py`), millions.
PARAMS_BY_PATCH = {  # p16, p8, p4, p2, p1 at 224 px, 1000 classes
    "adv_t": (11.61, 11.61, 12.18, 14.58, 24.21),
    "adv_s": (44.49, 44.50, 45.63, 50.43, 69.69),
    "adv_b": (98.66, 98.67, 100.36, 107.56, 136.45),
    "adv_l": (346.20, 346.21, 348.47, 358.07, 396.59),
    "adv_h": (718.03, 718.05, 720.88, 732.87, 781.03),  # the paper's Table 7 says 759 M
    "deit_t": (5.72, 5.72, 6.14, 7.94, 15.17),
    "deit_s": (22.05, 22.06, 22.90, 26.50, 40.95),
    "deit_b": (86.57, 86.58, 88.27, 95.47, 124.36),
    "deit_l": (304.33, 304.34, 306.60, 316.20, 354.72),
    "deit_h": (632.20, 632.21, 635.04, 647.04, 695.19),  # the paper's Table 7 says 631 M
}


@pytest.mark.parametrize("name", sorted(PARAMS_BY_PATCH))
def test_parameter_counts(name):
    for patch, expected in zip((16, 8, 4, 2, 1), PARAMS_BY_PATCH[name]):
        with torch.device("meta"):
            model = pv.create_model(name, patch=patch)
        assert n_params(model) / 1e6 == pytest.approx(expected, abs=0.005), (name, patch)


# Table 7 of the paper (millions, as printed) at patch 16: equal to ours after rounding, except
# where the paper itself is inconsistent (DeiT-T printed as 5 for 5.72; Huge sizes, see above).
@pytest.mark.parametrize("name,paper", [("adv_t", 12), ("adv_s", 44), ("adv_b", 99), ("adv_l", 346),
                                        ("deit_s", 22), ("deit_b", 86), ("deit_l", 304)])
def test_table7_sizes(name, paper):
    with torch.device("meta"):
        model = pv.create_model(name)
    assert round(n_params(model) / 1e6) == pytest.approx(paper, abs=1)
    cfg = pv.MODEL_CONFIGS[name]
    mlp = int(cfg["embed_dim"] * cfg.get("mlp_ratio", 4.0))
    table = {"adv_t": (256, 640, 12), "adv_s": (512, 1280, 12), "adv_b": (768, 1920, 12),
             "adv_l": (1024, 2560, 24), "deit_s": (384, 1536, 12), "deit_b": (768, 3072, 12),
             "deit_l": (1024, 4096, 24)}
    assert (cfg["embed_dim"], mlp, cfg["depth"]) == table[name]


@pytest.mark.parametrize("name,res,expected", [  # the released checkpoints' tensors, summed
    ("adventurer_tiny_patch1", 64, 12.41), ("adventurer_small_patch1", 128, 52.39),
    ("adventurer_base_patch1", 128, 110.50), ("adventurer_base_patch16", 448, 99.11),
    ("adventurer_base_patch8", 448, 100.47)])
def test_released_checkpoint_sizes(name, res, expected):
    with torch.device("meta"):
        model = pv.create_model(name, res=res)
    assert n_params(model) / 1e6 == pytest.approx(expected, abs=0.005)


# --- equivalence with independent implementations (float64) ----------------------------------

@pytest.mark.parametrize("schedule", ["official", "alternate", "pairs"])
def test_adventurer_matches_reference(schedule):
    torch.manual_seed(0)
    model = perturb_norm_weights(tiny("adv_t", depth=6, flip_schedule=schedule)).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    flips = {"official": {2, 3}, "alternate": {1, 3, 5}, "pairs": {2, 3}}[schedule]
    expected = adventurer_reference(model.state_dict(), x, 4, flips)
    assert torch.allclose(model(x), expected, rtol=0, atol=1e-10)


def test_adventurer_default_mixer_sizes_match_reference():
    torch.manual_seed(1)
    model = pv.create_model("adv_t", embed_dim=128, depth=2, patch=8, res=32, num_classes=5).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = adventurer_reference(model.state_dict(), x, 8, set())
    assert torch.allclose(model(x), expected, rtol=0, atol=1e-10)


def blocks_of_16_tokens(monkeypatch, shape, **changes):
    """Force the PyTorch path's `shape` ("cpu" or "accelerator"), cut into blocks of 16 tokens."""
    monkeypatch.setitem(pv.SCAN_PLANS, shape, dataclasses.replace(pv.SCAN_PLANS[shape], block=16, **changes))
    monkeypatch.setattr(pv, "SCAN_PLAN", shape)


@pytest.mark.parametrize("shape", ["cpu", "accelerator"])
@pytest.mark.parametrize("recompute_from", [1, 10**9])   # the mixer recomputed in backward, or not
def test_adventurer_gradients_match_the_reference(monkeypatch, recompute_from, shape):
    # every parameter's gradient through the mixer and a multi-block SSD (blocks of 16 tokens: 18
    # tokens with CLS and the mean token), against autograd of the functional reference
    blocks_of_16_tokens(monkeypatch, shape, recompute_from=recompute_from)
    torch.manual_seed(0)
    model = perturb_norm_weights(tiny("adv_t", depth=4)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    weights = torch.randn(2, 7, dtype=torch.float64)
    (model(x) * weights).sum().backward()
    state = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    (adventurer_reference(state, x, 4, {2, 3}) * weights).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, state[name].grad, rtol=1e-8, atol=1e-10), name


@pytest.mark.parametrize("shape", ["cpu", "accelerator"])
def test_adventurer_inference_in_blocks_matches_the_reference(monkeypatch, shape):
    # without autograd the mixer and the MLP go through the sequence in blocks (here of 16 tokens:
    # 17 tokens with CLS, 18 with the mean token)
    blocks_of_16_tokens(monkeypatch, shape)
    torch.manual_seed(0)
    model = perturb_norm_weights(tiny("adv_t", depth=4)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    assert torch.allclose(logits, adventurer_reference(model.state_dict(), x, 4, {2, 3}), rtol=0, atol=1e-10)


def test_flip_schedule_changes_the_function():
    torch.manual_seed(0)
    a = tiny("adv_t", depth=6).double().eval()
    b = tiny("adv_t", depth=6, flip_schedule="alternate").double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert (a(x) - b(x)).abs().max() > 1e-4


@pytest.mark.parametrize("depth,schedule,flipped", [
    (12, "official", [2, 3]), (24, "official", [2, 3]),
    (12, "alternate", [1, 3, 5, 7, 9, 11]), (12, "pairs", [2, 3, 6, 7, 10, 11])])
def test_flip_schedules(depth, schedule, flipped):
    with torch.device("meta"):
        model = pv.create_model("adv_t", depth=depth, flip_schedule=schedule)
    assert [i for i, block in enumerate(model.layers) if block.flip] == flipped


def test_deit_matches_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = perturb_norm_weights(tiny("deit_t", depth=3)).double().eval()
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=4, num_classes=7).double().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(ours(x), theirs(x), rtol=0, atol=1e-10)
    assert torch.allclose(ours.forward_features(x), theirs.forward_features(x), rtol=0, atol=1e-10)


# --- the API -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adv_t", "deit_t"])
@pytest.mark.parametrize("patch", [16, 8, 4, 2, 1])
def test_every_patch_size(name, patch):
    torch.manual_seed(0)
    model = tiny(name, patch=patch).eval()
    x = torch.randn(2, 3, 16, 16)
    grid = 16 // patch
    tokens = model.forward_features(x)
    assert tokens.shape == (2, grid * grid + 1, 64)
    cls = 0 if name.startswith("deit") else -1  # CLS first for DeiT, last for Adventurer
    assert torch.allclose(model(x), model.head(tokens[:, cls]))
    assert torch.allclose(model.forward_head(tokens, pre_logits=True), tokens[:, cls])
    dense = model.forward_dense(x)
    assert dense.shape == (2, 64, grid, grid)
    patch_tokens = tokens[:, 1:] if cls == 0 else tokens[:, :-1]
    assert torch.allclose(dense.flatten(2).transpose(1, 2), patch_tokens)  # raster order


@pytest.mark.parametrize("name", ["adv_t", "deit_t"])
def test_intermediate_maps(name):
    torch.manual_seed(0)
    model = perturb_norm_weights(tiny(name)).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = model.forward_dense(x, layers=[0, 2, -1])
    assert [m.shape for m in maps] == [(2, 64, 4, 4)] * 3
    # the last block's residual stream, normed per token, is the final dense map
    normed = model.final_norm(maps[2].flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 64, 4, 4)
    assert torch.allclose(normed, model.forward_dense(x), atol=1e-6)
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="block indices"):
        model.forward_dense(x, layers=[4])


@pytest.mark.parametrize("name", ["adv_t", "deit_t"])
def test_other_input_sizes_resample_pos_embed(name):
    torch.manual_seed(0)
    model = tiny(name).eval()
    x = torch.randn(1, 3, 24, 24)
    # A model laid out for 24 px and loaded from the 16 px weights computes the same function.
    big = tiny(name, res=24).eval()
    pv.load_checkpoint(big, model.state_dict())
    assert torch.allclose(model(x), big(x), atol=1e-6)
    assert model.forward_dense(torch.randn(1, 3, 16, 28)).shape == (1, 64, 4, 7)


def test_extend_interpolates_tokens_without_new_information():
    # Table 5 "by extending": patch 4 tokens, grid interpolated 2x per axis (the length of patch 2).
    model = tiny("adv_t", patch=4, res=8, extend=2).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.fill_(0).select(1, 0).fill_(1 / 16)  # token = patch mean, ch 0
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.zero_()
    a, b = 1.0, 5.0
    x = torch.zeros(1, 3, 8, 8)
    x[:, 0, :, :4], x[:, 0, :, 4:] = a, b  # two patch columns: a | b
    tokens, grid, _ = model._tokens(x)
    assert tuple(grid) == (4, 4) and model.pos_embed.shape[1] == 17
    row = tokens[0, :4, 0]  # first token row (CLS is last)
    # bilinear x2 upsampling of [a, b] with half-pixel centres: [a, 3/4 a + 1/4 b, 1/4 a + 3/4 b, b]
    assert torch.allclose(row, torch.tensor([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]))
    assert model.forward_dense(x).shape == (1, 64, 4, 4)
    assert model(x).shape == (1, 7)


def test_extend_1_is_the_plain_model():
    torch.manual_seed(0)
    plain = tiny("deit_t").eval()
    extended = tiny("deit_t", extend=1).eval()
    extended.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(plain(x), extended(x))


@pytest.mark.parametrize("name", ["adv_t", "deit_t"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = tiny(name, drop_path=0.3).double().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def grads():
        model.zero_grad()
        torch.manual_seed(123)  # same drop-path masks in both runs
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(plain, checkpointed))


def test_drop_path_rates():
    with torch.device("meta"):
        adv = pv.create_model("adv_t", drop_path=0.1)
        deit = pv.create_model("deit_t", drop_path=0.1)
    # Patch_Scaling `models_mamba.py`: the official Adventurer rule [0] + linspace(0, rate, depth) per block index
    rates = [block.drop_path.p for block in adv.layers]
    assert rates[:2] == [0.0, 0.0] and rates[2] == pytest.approx(0.1 / 11) and rates[11] == pytest.approx(1 / 11)
    assert [b.drop_path.p for b in deit.blocks] == pytest.approx([0.1 * i / 11 for i in range(12)])


def test_drop_path_is_identity_in_eval_and_random_in_train():
    torch.manual_seed(0)
    model = tiny("adv_t", drop_path=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_no_weight_decay_names_parameters():
    model = tiny("adv_t")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed", "cls_token"} and model.no_weight_decay() <= set(names)


def test_decoder_free_head():
    torch.manual_seed(0)
    model = tiny("adv_t", patch=1).eval()
    head = pv.DecoderFreeHead(64, 150)
    assert n_params(head) == 64 * 150 + 150  # Adventurer-B: 768*150+150 = 0.115 M
    x = torch.randn(2, 3, 16, 16)
    features = model.forward_dense(x)
    logits = head(features, x.shape[-2:])
    assert logits.shape == (2, 150, 16, 16)
    # a per-token linear map: pixel (i, j) of the logits is W @ feature(i, j) + b
    expected = head.proj.weight[:, :, 0, 0] @ features[0, :, 5, 9] + head.proj.bias
    assert torch.allclose(logits[0, :, 5, 9], expected, atol=1e-6)
    coarse = tiny("adv_t", patch=4).eval()
    assert head(coarse.forward_dense(x), (16, 16)).shape == (2, 150, 16, 16)


def test_aliases_and_names():
    assert pv.list_models() == sorted(["deit_t", "deit_s", "deit_b", "deit_l", "deit_h",
                                        "adv_t", "adv_s", "adv_b", "adv_l", "adv_h"])
    with torch.device("meta"):
        m = pv.create_model("adventurer_base_patch1")
        d = pv.create_model("deit_small_patch16_224")
    assert (m.patch_size, m.embed_dim, len(m.layers), type(m).__name__) == (1, 768, 12, "Adventurer")
    assert (d.patch_size, d.embed_dim, len(d.blocks), type(d).__name__) == (16, 384, 12, "DeiT")


def test_create_model_takes_timms_keyword_names():
    with torch.device("meta"):
        ours = pv.create_model("adv_t", patch=8, res=64, drop_path=0.1)
        timms = pv.create_model("adv_t", patch_size=8, img_size=(64, 64), drop_path_rate=0.1)
        assert pv.create_model("deit_t", img_size=96).cfg.res == 96
    assert ours.cfg == timms.cfg and (timms.patch_size, timms.cfg.res, timms.cfg.drop_path) == (8, 64, 0.1)
    with pytest.raises(ValueError, match=r"patch=8 and patch_size=4 were both given"):
        pv.create_model("adv_t", patch=8, patch_size=4)
    with pytest.raises(ValueError, match=r"img_size must be an int or a square \(h, w\), got \(64, 32\)"):
        pv.create_model("adv_t", img_size=(64, 32))


def test_all_is_the_readmes_api():
    # every public name is shown in the README, and every `pv.` name the README uses is public
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    api = readme[readme.index("```python"):readme.index("## Past one GPU")]
    assert [name for name in pv.__all__ if f"`{name}" not in api and f"pv.{name}" not in api] == []
    used = set(re.findall(r"\bpv\.([A-Za-z_]\w*)", api))
    assert used <= set(pv.__all__), used - set(pv.__all__)


def test_backends_reports_the_path_taken():
    model = tiny("deit_t")
    assert set(pv.backends(model)["mixers"].values()) == {"not run yet"}
    model(torch.randn(1, 3, 16, 16))
    report = pv.backends(model)
    assert report["mixers"]["blocks.0.attn"] == "sdpa"  # CPU: no flash-attn
    assert set(report) >= {"flash_attn", "mamba_ssm_fused", "mamba_ssm_triton_ssd", "kernels_enabled"}


# --- the int32 limit of the mamba-ssm kernels ---------------------------------------------------

def test_kernel_batch_limit_matches_the_known_figures():
    # state-spaces/mamba #1015 (int32 offsets): Adventurer-B (in_proj width 3224), seqlen N+2
    assert pv.kernel_batch_limit(224 * 224 + 2, 3224) == 13
    assert pv.kernel_batch_limit(112 * 112 + 2, 3224) == 53
    assert pv.kernel_batch_limit(56 * 56 + 2, 3224) == 212


def test_kernel_path_splits_the_batch(monkeypatch):
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(32, d_state=8, headdim=16, chunk_size=8).double()
    calls = []

    def fake_kernel(zxbcdt, **kwargs):  # stands in for the CUDA op: same math, records batch sizes
        calls.append(zxbcdt.shape[0])
        return mixer_after_in_proj(mixer.state_dict(), "", zxbcdt)

    monkeypatch.setattr(pv, "_mamba_fused_scan", lambda: fake_kernel)
    u = torch.randn(7, 20, 32, dtype=torch.float64)
    zxbcdt = mixer.in_proj(u)
    width = zxbcdt.shape[-1]
    monkeypatch.setattr(pv, "INT32_LIMIT", 3 * 20 * width + 5)  # room for 3 sequences per call
    assert torch.allclose(mixer._fused(zxbcdt), mixer._torch(u), rtol=0, atol=1e-10)
    assert calls == [3, 3, 1]
    monkeypatch.setattr(pv, "INT32_LIMIT", 10)
    with pytest.raises(ValueError, match="int32"):
        mixer._fused(zxbcdt)


def test_triton_ssd_path_splits_the_batch(monkeypatch):
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(32, d_state=8, headdim=16, chunk_size=8).double()
    calls = []

    def fake_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus):   # the Triton scan's math
        calls.append(x.shape[0])
        y = pv.ssd_recurrent(x, F.softplus(dt + dt_bias), A, B, C)
        return y + D[:, None] * x

    monkeypatch.setattr(pv, "_mamba_chunk_scan", lambda: fake_scan)
    u = torch.randn(7, 20, 32, dtype=torch.float64)
    monkeypatch.setattr(pv, "INT32_LIMIT", 3 * 20 * mixer.in_proj.out_features + 5)
    # A reaches the scan in float32, as the kernels take it: equal up to that rounding
    assert torch.allclose(mixer._triton_ssd(u), mixer._torch(u), rtol=1e-5, atol=1e-6)
    assert calls == [3, 3, 1]


# --- bad input -------------------------------------------------------------------------------------

def test_bad_input_errors():
    model = tiny("adv_t")
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        model(torch.randn(1, 3, 16, 18))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="must divide the resolution"):
        pv.create_model("adv_t", patch=16, res=200)
    with pytest.raises(ValueError, match="valid names: adv_b"):
        pv.create_model("adventurer_gigantic")
    with pytest.raises(ValueError, match="unknown option"):
        pv.create_model("adv_t", mlp_dim=3)
    with pytest.raises(ValueError, match="flip_schedule must be one of"):
        pv.create_model("adv_t", flip_schedule="sometimes")
    with pytest.raises(ValueError, match="patch 1"):
        pv.create_model("adventurer_tiny_patch1", patch=16)
    with pytest.raises(ValueError, match="DeiT option"):
        pv.create_model("adv_t", num_heads=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        pv.create_model("deit_t", embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="extend must be an integer"):
        pv.create_model("deit_t", extend=1.5)


def test_readme_example_at_its_real_size():
    # `python pixelvit.py adv_b --patch 1 --res 224` (the README's example), one block deep:
    # 50,176 pixel tokens + CLS at Adventurer-B's width
    logits, tokens = pv.main(["adv_b", "--patch", "1", "--res", "224", "--depth", "1"])
    assert logits.shape == (1, 1000) and tokens.shape == (1, 224 * 224 + 1, 768)
    assert torch.isfinite(logits).all() and torch.isfinite(tokens).all()


@pytest.mark.parametrize("shape", ["cpu", "accelerator"])
@pytest.mark.parametrize("grad", [True, False])
def test_adventurer_traces_without_graph_breaks(monkeypatch, grad, shape):
    # torch.compile(fullgraph=True) needs one graph: the PyTorch Mamba-2 path with several mixer
    # blocks, recomputed in backward (grad) or not, and the flipped blocks, in both shapes (on ROCm
    # and MPS the compiled accelerator shape is the fast path)
    blocks_of_16_tokens(monkeypatch, shape, recompute_from=1)
    model = tiny("adv_t", depth=4)
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
