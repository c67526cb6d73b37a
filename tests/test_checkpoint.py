"""load_checkpoint: containers, safe loading, resampling across resolution and patch size, errors."""
import argparse
import pickle

import pytest
import torch
import torch.nn.functional as F

import pixelvit as pv
from test_models import tiny


def outputs(model, seed=0):
    x = torch.randn(2, 3, model.cfg.res, model.cfg.res, generator=torch.Generator().manual_seed(seed))
    return model.eval()(x)


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd, "epoch": 3},
    lambda sd: {"state_dict": sd},
    lambda sd: {"model_ema": sd, "optimizer": {"state": {}}},
    lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
])
def test_containers(wrap):
    torch.manual_seed(0)
    source = tiny("adv_t")
    target = tiny("adv_t")
    assert pv.load_checkpoint(target, wrap(source.state_dict())) == ([], [])
    assert torch.equal(outputs(source), outputs(target))


def test_use_ema_picks_the_ema_weights():
    torch.manual_seed(0)
    model, ema = tiny("deit_t"), tiny("deit_t")
    target = tiny("deit_t")
    pv.load_checkpoint(target, {"model": model.state_dict(), "model_ema": ema.state_dict()}, use_ema=True)
    assert torch.equal(outputs(target), outputs(ema))


def test_official_checkpoint_file_with_pickled_args_loads_safely(tmp_path):
    # main.py saves argparse.Namespace args beside the weights; plain torch.load(weights_only=True)
    # refuses that file, load_checkpoint reads it without enabling arbitrary unpickling.
    torch.manual_seed(0)
    source = tiny("adv_t")
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(model="adventurer_tiny_patch16", lr=5e-4, opt_betas=None, input_size=16)
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 299, "args": args}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    target = tiny("adv_t")
    pv.load_checkpoint(target, str(path))
    assert torch.equal(outputs(source), outputs(target))


CODE_RAN = []


class Payload:
    def __reduce__(self):
        return (CODE_RAN.append, ("executed",))


def test_pickled_code_is_refused_with_a_conversion_hint(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny("adv_t").state_dict(), "extra": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only=False") as err:
        pv.load_checkpoint(tiny("adv_t"), path)
    assert "torch.save" in str(err.value)
    assert CODE_RAN == []


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(tiny("adv_t").state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        pv.load_checkpoint(tiny("adv_t"), path)


def test_container_without_weights():
    with pytest.raises(ValueError, match="no weights under"):
        pv.load_checkpoint(tiny("adv_t"), {"epoch": 3, "args": None})


# --- position embeddings across resolutions --------------------------------------------------

@pytest.mark.parametrize("name,cls_row", [("adv_t", -1), ("deit_t", 0)])
def test_pos_embed_resample_keeps_the_cls_row_apart(name, cls_row):
    small, big = tiny(name, res=16), tiny(name, res=32)     # 4x4 -> 8x8 grid
    sd = small.state_dict()
    pos = torch.full_like(sd["pos_embed"], 3.0)
    pos[:, cls_row] = 1000.0
    sd["pos_embed"] = pos
    pv.load_checkpoint(big, sd)
    new = big.pos_embed.detach()
    assert new.shape == (1, 65, 64)
    assert torch.equal(new[:, cls_row], pos[:, cls_row])
    grid = new[:, 1:] if cls_row == 0 else new[:, :-1]
    # a constant grid stays constant: no CLS value leaks into patch rows (the official
    # --finetune treats row 0 as CLS and would mix the 1000s of a CLS-last table into the grid)
    assert torch.allclose(grid, torch.full_like(grid, 3.0), atol=1e-5)


def test_pos_embed_resample_follows_the_grid_axes():
    # a table that varies along x only must vary along x only after resizing
    x_ramp = torch.arange(4.0).repeat(4)                    # raster order, 4x4, value = column
    pos = torch.cat([x_ramp[None, :, None].expand(1, 16, 2), torch.zeros(1, 1, 2)], dim=1)
    out = pv.resample_pos_embed(pos, (6, 8), cls_first=False)[0, :-1, 0].view(6, 8)
    assert torch.allclose(out, out[:1].expand(6, 8))        # all rows equal
    assert (out[0, 1:] >= out[0, :-1]).all()                 # increasing along x
    assert pv.resample_pos_embed(pos, (4, 4), cls_first=False) is pos


# --- tokenizer across patch sizes (FlexiViT PI-resize) ----------------------------------------

def test_patch_embed_upsized_by_pi_resize_gives_the_same_tokens_on_resized_patches():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    w4 = pv.resample_patch_embed(w, 4)
    patches = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    resized = F.interpolate(patches, size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(F.conv2d(patches, w), F.conv2d(resized, w4), atol=1e-10)


def test_pi_resize_hand_computed_cases():
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    # 1 -> 4: a pixel becomes a constant 4x4 patch, so each of the 16 weights is w / 16
    assert torch.allclose(pv.resample_patch_embed(w, 4), (w / 16).expand(4, 3, 4, 4))
    # 2 -> 1: downsizing 2x2 averages, so the pixel weight is the sum of the four weights
    w2 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(pv.resample_patch_embed(w2, 1), w2.sum((2, 3), keepdim=True))


def test_checkpoint_across_patch_sizes():
    torch.manual_seed(0)
    p4 = tiny("adv_t", patch=4, res=16)
    p2 = tiny("adv_t", patch=2, res=16)                      # 4x4 -> 8x8 grid, 4x4 -> 2x2 kernel
    assert pv.load_checkpoint(p2, p4.state_dict()) == ([], [])
    assert p2.patch_embed.proj.weight.shape == (64, 3, 2, 2) and p2.pos_embed.shape == (1, 65, 64)
    assert torch.isfinite(outputs(p2)).all()


# --- mismatches ----------------------------------------------------------------------------------

def test_head_for_another_class_count_is_replaced_with_a_warning():
    torch.manual_seed(0)
    source = tiny("adv_t", num_classes=1000)
    target = tiny("adv_t", num_classes=10)
    head_before = target.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="1000 classes, the model 10"):
        pv.load_checkpoint(target, source.state_dict())
    assert torch.equal(target.head.weight, head_before)
    assert torch.equal(target.layers[0].mixer.in_proj.weight, source.layers[0].mixer.in_proj.weight)


def test_checkpoint_of_another_family_names_the_keys():
    deit = tiny("deit_t").state_dict()
    with pytest.raises(KeyError) as err:
        pv.load_checkpoint(tiny("adv_t"), deit)
    assert "layers.0.mixer.A_log" in str(err.value) and "blocks.0.attn.proj.bias" in str(err.value)
    missing, unexpected = pv.load_checkpoint(tiny("adv_t"), deit, strict=False)
    assert "layers.0.mixer.in_proj.weight" in missing and "blocks.0.attn.qkv.weight" in unexpected


def test_checkpoint_of_another_size_names_the_shapes():
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.in_proj\.weight: checkpoint \(\d+, 96\)"):
        pv.load_checkpoint(tiny("adv_t"), tiny("adv_t", embed_dim=96).state_dict())


@pytest.mark.parametrize("name,patch,res,classes",
                         [("adv_s", 8, 64, 10), ("deit_t", 4, 32, 0), ("adv_b", 16, 48, 1000)])
def test_model_arguments_are_read_off_a_checkpoint(tmp_path, name, patch, res, classes):
    with torch.device("meta"):
        model = pv.create_model(name, patch=patch, res=res, num_classes=classes)
    state = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    torch.save({"model": state}, tmp_path / "w.pth")
    assert pv.infer_model_args(str(tmp_path / "w.pth")) == dict(name=name, patch=patch, res=res, num_classes=classes)


def test_model_arguments_of_an_unknown_size_name_width_and_depth():
    state = tiny("adv_t", embed_dim=48).state_dict()
    with pytest.raises(ValueError, match="width 48 and depth"):
        pv.infer_model_args(state)
