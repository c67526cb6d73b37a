"""Every documented command of Tables 2 and 3 (Figure 2 included), run as written at the paper's
input sizes: one training iteration and one evaluation on photos of real size written here.

The rows are read from the tables of docs/segmentation.md and docs/detection.md (linked from the
README's map), so a row added there is tested here. Each run goes through the script's own `main`
with the documented flags (`--data-path`, `--finetune` from a train.py-style ImageNet checkpoint of
the same patch, `--grad-ckpt` where the docs ask for it) and the default
input pipeline: ADE20k's 2048x512 resize, 512 crops and sliding-window evaluation; COCO's 800/1333
resize. What is shrunk, and only to fit two CPU cores inside CI's budget:
  * the backbone's depth (1 block; 2 for UperNet, so that its taps come from two depths);
  * the backbone's width where the token count makes the real width too slow on a CPU (64 wide
    above 1,100 tokens per image: Adventurer-T at patch 2 on 800x1344 is 268,800 tokens);
  * the widths of the heads, except in one row: they do not depend on the patch. The detector's
    pyramid and heads run at full width (256 channels, 4conv1fc 1024) in Adventurer-B's patch-64
    row, UperNet at full width (288 / 192 channels) at patch 16 of each model,
    and the other rows at 64 channels.
The batch is one GPU's share of the paper's 16 on 8 GPUs for ADE20k (2 crops), and 1 image for COCO.
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import eval_det
import eval_seg
import pixelvit as pv
from helpers import ROOT

FAST_TOKENS = 1_100        # above this many tokens per image the backbone runs 64 wide
PIXELS = {"seg": 512 * 512, "det": 800 * 1344}


def doc_rows(doc, patch_column):
    """The rows of the tables in docs/`doc`: their cells, for rows whose `patch_column` lists patch
    sizes."""
    body = open(os.path.join(ROOT, "docs", doc)).read()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("|")]
    return [(cells, [int(p) for p in cells[patch_column].split(",")]) for cells in rows
            if len(cells) > patch_column and re.fullmatch(r"\d+(, \d+)*", cells[patch_column])]


def segmentation_rows():
    """(model, head, patch) for Table 2's rows and Figure 2 (both heads on Adventurer-B)."""
    rows = set()
    for (model, head, *_), patches in doc_rows("segmentation.md", 2):
        models = ["adv_b"] if model == "Figure 2" else [model]
        heads = ["linear", "upernet"] if head == "both" else [head.lower()]
        rows |= {(m, h, p) for m in models for h in heads for p in patches}
    return sorted(rows, key=lambda r: (r[0], r[1], -r[2]))


SEG_ROWS = segmentation_rows()
DET_ROWS = [(cells[0], "cascade", p) for cells, patches in doc_rows("detection.md", 1) for p in patches]


def test_the_readme_tables_list_every_paper_row():
    assert ({(m, p) for m, h, p in SEG_ROWS if h == "linear"}
            == {(m, p) for m in ("adv_t", "adv_b") for p in (16, 8, 4, 2)})
    assert {(m, p) for m, h, p in SEG_ROWS if h == "upernet"} >= {("adv_t", 16), ("adv_b", 16), ("adv_b", 2)}
    assert [p for m, _, p in DET_ROWS if m == "adv_t"] == [32, 16, 8, 4, 2]
    assert [p for m, _, p in DET_ROWS if m == "adv_b"] == [64, 32, 16, 8, 4]


def backbone_flags(model, head, patch, task):
    depth = 2 if head == "upernet" else 1
    width = pv.MODEL_CONFIGS[model]["embed_dim"] if PIXELS[task] // patch**2 <= FAST_TOKENS else 64
    return dict(depth=depth, embed_dim=width)


def imagenet_checkpoint(folder, model, patch, size):
    """What `train.py --model M --patch P` leaves: a checkpoint at 224 px (256 when P does not divide 224)."""
    res = 224 if 224 % patch == 0 else 256
    torch.manual_seed(0)
    net = pv.create_model(model, patch=patch, res=res, num_classes=1000, **size)
    path = os.path.join(folder, f"{model}_p{patch}.pth")
    torch.save({"model": net.state_dict(), "epoch": 20}, path)
    return path


def photo(height, width):
    from sklearn.datasets import load_sample_image
    return np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.BILINEAR))


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """An ADE20k-layout folder: 512 x 683 photos (ADE's typical size) with 150-class annotations."""
    root = tmp_path_factory.mktemp("ade")
    rng = np.random.default_rng(0)
    for split, count in (("training", 2), ("validation", 1)):
        for kind in ("images", "annotations"):
            os.makedirs(root / kind / split)
        for k in range(count):
            image = photo(512, 683)
            label = np.zeros((512, 683), np.uint8)   # 0 = unlabelled, regions of classes 1..150
            for top, left in rng.integers(0, 400, (6, 2)):
                label[top:top + 120, left:left + 200] = rng.integers(1, 151)
            name = f"ADE_{split[:5]}_{k:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=90)
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    return str(root)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO-layout folder: one 600 x 1000 photo per split (resized to 800 x 1333), two instances."""
    import pycocotools.mask as mask_util
    root = tmp_path_factory.mktemp("coco")
    os.makedirs(root / "annotations")
    for split in ("train2017", "val2017"):
        os.makedirs(root / split)
        Image.fromarray(photo(600, 1000)).save(root / split / "000000000001.jpg", quality=90)
        annotations = []
        for k, (top, left, bottom, right) in enumerate([(80, 120, 300, 380), (250, 500, 560, 930)]):
            mask = np.zeros((600, 1000), np.uint8)
            mask[top:bottom, left:right] = 1
            rle = mask_util.encode(np.asfortranarray(mask))
            annotations.append(dict(id=k + 1, image_id=1, category_id=[1, 18][k], iscrowd=0,
                                    area=float(mask_util.area(rle)), bbox=mask_util.toBbox(rle).tolist(),
                                    segmentation=dict(size=rle["size"], counts=rle["counts"].decode("ascii"))))
        json.dump(dict(images=[dict(id=1, file_name="000000000001.jpg", height=600, width=1000)],
                       annotations=annotations, categories=[dict(id=1, name="person"), dict(id=18, name="dog")]),
                  open(root / "annotations" / f"instances_{split}.json", "w"))
    return str(root)


def size_flags(size):
    return ["--depth", str(size["depth"]), "--embed-dim", str(size["embed_dim"])]


@pytest.mark.parametrize("model,head,patch", SEG_ROWS)
def test_segmentation_command_at_paper_size(model, head, patch, ade, tmp_path):
    size = backbone_flags(model, head, patch, "seg")
    argv = ["--model", model, "--patch", str(patch), "--head", head, "--data-path", ade,
            "--finetune", imagenet_checkpoint(str(tmp_path), model, patch, size)]
    argv += ["--grad-ckpt"] if patch <= 2 else []
    argv += ["--upernet-channels", "64"] if head == "upernet" and patch != 16 else []
    argv += size_flags(size) + ["--iters", "1", "--batch-size", "2", "--workers", "0",
                                "--output", str(tmp_path / "run")]
    args = eval_seg.parse_args(argv)
    assert (args.crop, args.stride, args.mode, args.num_classes, args.lr) == (512, 341, "slide", 150, 5e-5)
    metrics = eval_seg.main(args)
    assert metrics["iter"] == 1 and metrics["val_images"] == 1 and np.isfinite(metrics["train_loss"])
    assert 0 <= metrics["mIoU"] <= 100 and np.isfinite(metrics["val_loss"])
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["model"]
    assert state["backbone.patch_embed.proj.weight"].shape[-1] == patch
    assert state["backbone.pos_embed"].shape[1] == (224 // patch if 224 % patch == 0 else 256 // patch) ** 2 + 1


@pytest.mark.parametrize("model,head,patch", DET_ROWS)
def test_detection_command_at_paper_size(model, head, patch, coco, tmp_path):
    size = backbone_flags(model, head, patch, "det")
    full_heads = (model, patch) == ("adv_b", 64)
    argv = ["--model", model, "--patch", str(patch), "--data-path", coco,
            "--finetune", imagenet_checkpoint(str(tmp_path), model, patch, size), "--output", str(tmp_path / "run")]
    argv += ["--grad-ckpt"] if patch <= 4 else []
    argv += [] if full_heads else ["--channels", "64", "--head-dims", "64", "--fc-dim", "256"]
    argv += size_flags(size) + ["--max-iters", "1", "--batch-size", "1", "--workers", "0"]
    args = eval_det.parse_args(argv)
    assert (args.min_size, args.max_size, args.lr, args.epochs) == (800, 1333, 1e-4, 12)
    detector = eval_det.build(args, 2, torch.device("cpu")).eval()
    images, _ = detector.transform([torch.rand(3, 600, 1000)])
    assert images.tensors.shape[-2:] == (832 if patch == 64 else 800, 1344)   # padded to the patch and 32
    metrics = eval_det.main(args)
    assert metrics["iter"] == 1 and np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_loss"])
    assert {"bbox_AP", "segm_AP", "segm_APl"} <= set(metrics)
