"""eval_seg.py: mmseg's metrics by hand, the pipeline's alignment, head sizes, runs on an ADE-format folder."""
import colorsys
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import demo_data
import engine
import eval_seg as seg
import pixelvit as pv
import segmentation
from helpers import (
    check_one_run_per_folder,
    check_refused,
    run_and_kill,
    run_elastic_and_kill,
    run_script,
    same_run_without_and_with_context_parallel,
)

TINY = ["--model", "adv_t", "--embed-dim", "32", "--depth", "4", "--d-state", "16", "--patch", "4",
        "--workers", "0", "--crop", "32", "--stride", "21", "--batch-size", "4", "--warmup-iters", "2"]


# --- metrics ----------------------------------------------------------------------------------------

def test_metrics_by_hand():
    # two images, 3 classes, 255 ignored. Class 2 never appears (absent from both: left out).
    m = segmentation.SegMetric(3)
    m.update(torch.tensor([0, 0, 1, 1, 0]), torch.tensor([0, 1, 1, 255, 0]))
    m.update(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 255]))
    # kept pixels (pred, label): (0,0) (0,1) (1,1) (0,0) | (1,1) (1,0)
    # class 0: I 2, pred 3, label 3 -> U 4; class 1: I 2, pred 3, label 3 -> U 4
    r = m.compute()
    assert r["mIoU"] == pytest.approx(100 * (2 / 4 + 2 / 4) / 2)
    assert r["mAcc"] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)
    assert r["aAcc"] == pytest.approx(100 * 4 / 6)
    assert np.isnan(r["per_class_iou"][2])


def test_a_class_predicted_but_never_labelled_counts_as_zero():
    m = segmentation.SegMetric(3)
    m.update(torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]))
    # class 0: I 1, U 2; class 1: I 1, U 1; class 2: I 0, U 1 -> IoU 0, counted
    assert m.compute()["mIoU"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)


def test_metric_sums_over_the_set_not_per_image_means():
    m = segmentation.SegMetric(2)
    m.update(torch.tensor([0] * 9 + [1]), torch.tensor([0] * 10))   # big image: class 0, I 9 U 10
    m.update(torch.tensor([1]), torch.tensor([0]))                  # small image: class 0, I 0 U 1
    assert m.compute()["per_class_iou"][0] == pytest.approx(100 * 9 / 11)


# --- pipeline ---------------------------------------------------------------------------------------

def test_train_pipeline_keeps_image_and_mask_aligned():
    torch.manual_seed(0)
    image = torch.zeros(3, 120, 200, dtype=torch.uint8)
    label = torch.zeros(120, 200, dtype=torch.long)
    image[0, 30:90, 50:170] = 255   # a red rectangle ...
    label[30:90, 50:170] = 1         # ... is class 1; the rest is class 0
    for trial in range(10):
        seg.random.seed(trial)
        x, y = seg.train_pipeline(image, label, crop=64, short_side=96, photometric=False)
        assert x.shape == (3, 64, 64) and y.shape == (64, 64)
        red = x[0] > x[1] + 1.0          # normalised red channel well above green
        valid = y != segmentation.IGNORE
        agree = (red == (y == 1))[valid].float().mean()
        assert agree > 0.97, trial       # only resampling at the rectangle's border may differ


def test_a_small_crop_is_padded_after_normalisation_at_the_bottom_and_right():
    # mmseg's data preprocessor pads the normalised crop with 0 (the mean colour) and the label with
    # the ignore index, after the flip and the photometric distortion
    image = torch.full((3, 20, 30), 7, dtype=torch.uint8)
    label = torch.zeros(20, 30, dtype=torch.long)
    seven = seg.normalize(image[:, :1, :1])[:, 0, 0]
    for trial in range(6):
        seg.random.seed(trial)
        x, y = seg.train_pipeline(image, label, crop=64, short_side=16, photometric=False)  # short side 8..32
        h, w = int((y[:, 0] == 0).sum()), int((y[0] == 0).sum())
        assert 0 < h < 64 and 0 < w < 64 and (y[:h, :w] == 0).all()
        assert (y[h:] == segmentation.IGNORE).all() and (y[:, w:] == segmentation.IGNORE).all()
        assert (x[:, h:] == 0).all() and (x[:, :, w:] == 0).all()
        assert torch.allclose(x[:, :h, :w], seven[:, None, None].expand(3, h, w))


def test_the_crop_is_drawn_an_eleventh_time_unchecked():
    draws = []
    real = seg.random.randint
    seg.random.randint = lambda a, b: draws.append((a, b)) or real(a, b)
    try:
        seg.random_crop(torch.zeros(3, 40, 40, dtype=torch.uint8), torch.zeros(40, 40, dtype=torch.long), 16)
    finally:
        seg.random.randint = real
    assert draws == [(0, 24), (0, 24)] * 11   # one class only: every check fails, then one more draw


def test_photometric_steps_truncate_to_uint8_and_saturation_scales_in_hsv():
    assert seg.to_uint8(torch.tensor([-3.0, 7.9, 254.99, 300.0])).tolist() == [0, 7, 254, 255]
    rgb = torch.randint(0, 256, (3, 40, 25), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for factor in (0.6, 1.3, 3.0):
        ours = seg.scale_saturation(rgb, factor)
        reference = torch.tensor([[colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)
                                   for h, s, v in [colorsys.rgb_to_hsv(*(rgb[:, i, j].double() / 255).tolist())]][0]
                                  for i in range(40) for j in range(25)]) * 255
        assert (ours.permute(1, 2, 0).reshape(-1, 3).double() - reference).abs().max() <= 0.5 + 1e-6, factor
    gray = torch.full((3, 4, 4), 90, dtype=torch.uint8)
    assert torch.equal(seg.scale_saturation(gray, 1.5), gray)


def test_mmseg_resize_rule():
    assert seg.rescale_size(480, 640) == (512, 683)          # short side to 512
    assert seg.rescale_size(300, 3000) == (205, 2048)        # long side capped at 2048
    assert seg.rescale_size(512, 512, ratio=0.5) == (256, 256)
    assert seg.rescale_size(480, 640, ratio=0.7) == (358, 477)   # bounds int(358.4), int(1433.6): 640 x 358 / 480


# --- heads ------------------------------------------------------------------------------------------

def upernet_formula(C, ch, classes=150):
    """mmseg 1.x `UPerHead` parameters (counted from its layers), 16 C ch + 99 ch^2 + 174 ch + classes (BN affine)."""
    return 16 * C * ch + 99 * ch * ch + 174 * ch + classes


def aux_formula(C, classes=150):
    return 9 * C * 256 + 2 * 256 + 256 * classes + classes


@pytest.mark.parametrize("name,paper_head_m", [("adv_t", 5), ("adv_b", 13)])  # Table 2 / Fig. 2
def test_head_sizes(name, paper_head_m):
    with torch.device("meta"):
        backbone = pv.create_model(name, patch=16, res=512, num_classes=0)
        upernet = segmentation.Segmenter(backbone, "upernet", 150)
        linear = segmentation.Segmenter(backbone, "linear", 150)
    C = backbone.embed_dim
    ch = segmentation.UPERNET_CHANNELS[C]
    assert upernet.head_parameters() == upernet_formula(C, ch) + aux_formula(C)
    assert upernet.head_parameters() / 1e6 == pytest.approx(paper_head_m, rel=0.06)
    assert linear.head_parameters() == C * 150 + 150   # 0.115 M for B: the paper's "0.2 M" is rounded up


@pytest.mark.parametrize("patch", [16, 8, 4, 2, 1])
@pytest.mark.parametrize("head", ["linear", "upernet"])
def test_segmenter_outputs_at_every_patch(head, patch):
    torch.manual_seed(0)
    backbone = pv.create_model("adv_t", patch=patch, res=32, embed_dim=32, depth=4, d_state=16, num_classes=0)
    model = segmentation.Segmenter(backbone, head, 11).train()
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 11, 32, 32)
    assert (aux is None) == (head == "linear")
    maps = segmentation.to_strides([torch.zeros(1, 8, 32 // patch, 32 // patch)] * 4, patch)
    assert [m.shape[-1] for m in maps] == [8, 4, 2, 1]   # strides 4, 8, 16, 32 of a 32 px input


def test_slide_inference_covers_every_pixel_once_averaged():
    class Ones(torch.nn.Module):  # a "model" whose logits are its input's first channel
        def forward(self, x):
            return x[:, :1], None
    image = torch.arange(50 * 70, dtype=torch.float32).view(1, 1, 50, 70).expand(1, 3, 50, 70)
    out = segmentation.predict_slide(Ones(), image, patch=1, crop=32, stride=21)
    assert torch.allclose(out, image[:, :1])  # overlapping windows average to the same values


# --- runs -------------------------------------------------------------------------------------------

def run(args, cwd, nproc=1, check=True):
    return run_script("eval_seg.py", args, cwd, nproc, check)


def rescore(pred_dir, data):
    """mIoU from the saved PNGs and the raw annotations, with numpy only."""
    inter, union = np.zeros(5), np.zeros(5)
    ann_dir = os.path.join(data, "annotations", "validation")
    for name in os.listdir(ann_dir):
        gt = np.asarray(Image.open(os.path.join(ann_dir, name))).astype(int) - 1
        pred = np.asarray(Image.open(os.path.join(pred_dir, name))).astype(int) - 1
        keep = gt >= 0
        for c in range(5):
            p, g = (pred == c) & keep, (gt == c) & keep
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    present = union > 0
    return 100 * (inter[present] / union[present]).mean()


def test_two_process_run_and_saved_predictions(tmp_path):
    data = demo_data.write_digit_scenes(str(tmp_path / "ade"), n_train=8, n_val=5, size=32)
    out, preds = str(tmp_path / "run"), str(tmp_path / "preds")
    run(TINY + ["--data-path", data, "--num-classes", "5", "--iters", "4", "--eval-every", "4", "--output", out,
                "--head", "upernet"], tmp_path, nproc=2)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["val_images"] == 5 and results["iter"] == 4 and results["run_state"]["world"] == 2
    # one process evaluates the same checkpoint to the same numbers, and its PNGs re-score to them
    run(TINY + ["--data-path", data, "--num-classes", "5", "--eval-only",
                "--resume", os.path.join(out, "checkpoint.pth"),
                "--output", str(tmp_path / "eval"), "--save-predictions", preds, "--head", "upernet"], tmp_path)
    single = json.load(open(tmp_path / "eval" / "eval.json"))
    assert not os.path.exists(tmp_path / "eval" / "log.jsonl")
    assert single["mIoU"] == pytest.approx(results["mIoU"]) and single["val_loss"] == pytest.approx(results["val_loss"])
    assert sorted(os.listdir(preds)) == sorted(os.listdir(os.path.join(data, "annotations", "validation")))
    assert rescore(preds, data) == pytest.approx(single["mIoU"])
    # one process accumulating two micro-batches per step draws the same images and the same dropout
    # as the two processes: the same weights (BatchNorm's running statistics aside: rank 0's in DDP)
    run(TINY + ["--data-path", data, "--num-classes", "5", "--iters", "4", "--eval-every", "4", "--accum-steps", "2",
                "--output", str(tmp_path / "accum"), "--head", "upernet"], tmp_path)
    ddp, accum = (torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=True)["model"]
                  for folder in (out, tmp_path / "accum"))
    weights = [k for k in ddp if "running_" not in k and "num_batches" not in k]
    assert all(torch.allclose(ddp[k], accum[k], rtol=1e-5, atol=1e-7) for k in weights), \
        max((ddp[k] - accum[k]).abs().max().item() for k in weights)
    # torchrun --max-restarts 1 restarts both processes after rank 1 is killed; they resume from the
    # checkpoint and end with the uninterrupted run's weights, bit for bit
    elastic = str(tmp_path / "elastic")
    status, output, state = run_elastic_and_kill(
        "eval_seg.py", TINY + ["--data-path", data, "--num-classes", "5", "--iters", "4", "--eval-every", "4",
                               "--output", elastic, "--head", "upernet", "--save-every", "1"],
        tmp_path, os.path.join(elastic, "checkpoint.pth"), ready=lambda ckpt: ckpt["iter"] >= 1)
    assert status == 0 and state["iter"] < 4, output[-3000:]
    assert f"resumed from {elastic}/checkpoint.pth" in output, output[-3000:]
    restarted = torch.load(os.path.join(elastic, "checkpoint.pth"), weights_only=True)["model"]
    assert all(torch.equal(ddp[k], restarted[k]) for k in ddp)


def test_resume_after_a_kill_is_bit_exact(tmp_path):
    data = demo_data.write_digit_scenes(str(tmp_path / "ade"), n_train=8, n_val=2, size=32)
    common = TINY + ["--data-path", data, "--num-classes", "5", "--iters", "12", "--save-every", "3",
                     "--eval-every", "100", "--drop-path", "0.1"]
    run(common + ["--output", str(tmp_path / "straight")], tmp_path)
    killed = str(tmp_path / "killed")
    state = run_and_kill("eval_seg.py", common + ["--output", killed], tmp_path, os.path.join(killed, "checkpoint.pth"),
                         ready=lambda ckpt: True)
    assert state["iter"] < 12, "the run finished before it could be killed"
    check_refused("eval_seg.py", common + ["--output", killed, "--lr", "0.5"], tmp_path, killed, "lr ")
    run(common + ["--output", killed, "--workers", "1"], tmp_path)   # the same run, other loader processes
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(os.path.join(killed, "checkpoint.pth"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the logged train_loss, a mean over the 12 iterations since the start, the killed run's included
    assert log_lines(tmp_path / "straight")[-1]["train_loss"] == log_lines(killed)[-1]["train_loss"]


def log_lines(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]


def test_the_logged_train_loss_is_the_mean_since_the_previous_evaluation(tmp_path):
    # evaluating does not change training (each step seeds its own draws): a run that evaluates after
    # every iteration logs each iteration's loss, and one that evaluates every 2 logs their pair means
    data = demo_data.write_digit_scenes(str(tmp_path / "ade"), n_train=8, n_val=2, size=32)
    common = TINY + ["--data-path", data, "--num-classes", "5", "--iters", "4"]
    for every in ("1", "2"):
        run(common + ["--eval-every", every, "--output", str(tmp_path / every)], tmp_path)
    each, pairs = (log_lines(tmp_path / every) for every in ("1", "2"))
    losses = [line["train_loss"] for line in each]
    assert [line["iter"] for line in pairs] == [2, 4] and len(set(losses)) == 4
    assert [line["train_loss"] for line in pairs] == pytest.approx([(losses[0] + losses[1]) / 2,
                                                                     (losses[2] + losses[3]) / 2], rel=1e-12)


def test_bad_folders_and_annotations(tmp_path):
    data = demo_data.write_digit_scenes(str(tmp_path / "ade"), n_train=2, n_val=2, size=32)
    os.remove(os.path.join(data, "annotations", "validation", "ADE_val_00000001.png"))
    proc = run(TINY + ["--data-path", data, "--num-classes", "5"], tmp_path, check=False)
    assert proc.returncode != 0 and "images without annotations ['ADE_val_00000001']" in proc.stderr
    bad = demo_data.write_digit_scenes(str(tmp_path / "ade2"), n_train=2, n_val=2, size=32)
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(os.path.join(bad, "annotations", "validation",
                                                                        "ADE_val_00000000.png"))
    with pytest.raises(ValueError, match="ADE_val_00000000.png: expected one channel of values 0..5"):
        seg.ADESegmentation(bad, "validation", 5).read(0)
    proc = run(TINY + ["--data-path", str(tmp_path / "nowhere")], tmp_path, check=False)
    assert proc.returncode != 0 and "images/validation" in proc.stderr


def test_backbone_from_another_patch_size_and_resolution(tmp_path):
    torch.manual_seed(0)
    imagenet = pv.create_model("adv_t", patch=8, res=64, embed_dim=32, depth=4, d_state=16, num_classes=10)
    path = str(tmp_path / "imagenet.pth")
    torch.save({"model": imagenet.state_dict(), "epoch": 3}, path)
    args = seg.parse_args(TINY + ["--data-path", "unused", "--finetune", path, "--num-classes", "5"])
    model = seg.build(args, engine.Run())   # patch 8 -> 4, 64 px -> 32 px crops, head dropped
    backbone = model.backbone
    assert backbone.patch_embed.proj.weight.shape[-1] == 4 and backbone.pos_embed.shape[1] == 8 * 8 + 1
    assert torch.equal(backbone.layers[2].mixer.in_proj.weight, imagenet.layers[2].mixer.in_proj.weight)
    assert torch.equal(backbone.pos_embed[:, -1], imagenet.pos_embed[:, -1])  # CLS row (last) kept apart


def test_demo_defaults_never_override_typed_flags():
    typed = seg.parse_args(["--patch", "16", "--lr", "5e-5"])   # both equal the defaults the demo replaces
    assert (typed.patch, typed.lr, typed.crop) == (16, 5e-5, seg.DEMO["crop"])
    assert seg.parse_args([]).patch == seg.DEMO["patch"]
    full = seg.parse_args(["--data-path", "ADEChallengeData2016"])
    assert (full.patch, full.lr, full.crop, full.num_classes, full.iters) == (16, 5e-5, 512, 150, 160_000)


def test_context_parallel_trains_and_scores_as_one_process(tmp_path):
    """--context-parallel 2: each 32 px crop's 64 tokens split over 2 processes, UperNet on the gathered
    map; the same weights as one process to float32 rounding, each validation image counted once."""
    data = demo_data.write_digit_scenes(str(tmp_path / "ade"), n_train=8, n_val=5, size=32)
    common = TINY + ["--data-path", data, "--num-classes", "5", "--iters", "3", "--eval-every", "3", "--head",
                     "upernet", "--drop-path", "0.1"]
    run(common + ["--output", str(tmp_path / "one")], tmp_path)
    run(common + ["--output", str(tmp_path / "cp"), "--context-parallel", "2"], tmp_path, nproc=2)
    one, cp = same_run_without_and_with_context_parallel(tmp_path)
    assert cp["val_images"] == 5 and cp["mIoU"] == pytest.approx(one["mIoU"], abs=1e-3)


def test_a_run_folder_holds_one_run(tmp_path):
    data = demo_data.write_digit_scenes(str(tmp_path / "ade"), n_train=4, n_val=2, size=32)
    out = str(tmp_path / "run")
    args = TINY + ["--data-path", data, "--num-classes", "5", "--iters", "2", "--output", out]
    run(args, tmp_path)
    check_one_run_per_folder("eval_seg.py", args, tmp_path, out, lr="0.5")
