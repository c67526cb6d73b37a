"""eval_det.py: the pyramid, the cascade head and its mmdet/detectron2 rules on hand-made cases, COCO
evaluation against pycocotools, the command line (training, resume, two processes, results files)."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

import demo_data
import detection
import engine
import eval_det as det
import pixelvit as pv
from helpers import (
    check_one_run_per_folder,
    check_refused,
    run_and_kill,
    run_script,
    same_run_without_and_with_context_parallel,
)


def tiny_backbone(patch, res=128):
    return pv.create_model("adv_t", patch=patch, res=res, embed_dim=32, depth=2, d_state=16, num_classes=0)


def tiny_detector(patch=4, classes=3):
    return detection.build_detector(tiny_backbone(patch), classes, channels=32, min_size=64, max_size=96,
                              rois_per_image=32, rpn_batch=32, head_dims=32, fc_dim=64)


@pytest.mark.parametrize("patch", [64, 32, 16, 8, 4, 2, 1])
def test_pyramid_strides_for_every_patch(patch):
    torch.manual_seed(0)
    backbone = detection.PyramidBackbone(tiny_backbone(patch), channels=32)
    levels = backbone(torch.randn(1, 3, 64, 128))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in levels.values()] == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    assert all(v.shape[1] == 32 for v in levels.values())


def test_matching_follows_each_stage_threshold():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    proposals = torch.tensor([[0.0, 0.0, 10.0, 5.5],    # IoU 0.55 with the ground truth
                              [0.0, 0.0, 10.0, 7.5],    # IoU 0.75
                              [20.0, 20.0, 30.0, 30.0]])  # IoU 0
    labels = torch.tensor([4])
    assert detection.match(proposals, gt, labels, 0.5)[0].tolist() == [4, 4, 0]
    assert detection.match(proposals, gt, labels, 0.6)[0].tolist() == [0, 4, 0]
    assert detection.match(proposals, gt, labels, 0.7)[0].tolist() == [0, 4, 0]
    empty = detection.match(proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty[0].tolist() == [0, 0, 0]


def test_stage_box_coders_by_hand():
    heads = detection.CascadeRoIHeads(32, 3, conv_dims=(32,), fc_dim=16, mask_dims=(32,))
    proposal, gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[1.0, 1.0, 11.0, 21.0]])
    # mmdet's cascade config, bbox_coder.target_stds of the three stages: deltas are divided by them.
    # Centre shift 1 px on a 10 px box (0.1) and 6 px in y (0.6), height ratio 2: (0.1, 0.6, 0, log 2) / std
    mmdet_stds = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
    for coder, (sx, sy, _, sh) in zip(heads.coders, mmdet_stds):
        expected = torch.tensor([[0.1 / sx, 0.6 / sy, 0.0, math.log(2) / sh]])
        assert torch.allclose(coder.encode_single(gt, proposal), expected, rtol=1e-6), coder.weights
    refined = heads.refine(1, heads.coders[1].encode_single(gt, proposal), [proposal], [(64, 64)])
    assert torch.allclose(refined[0], gt, atol=1e-4)   # decoding inverts encoding, clipped to the image
    # mmdet clamps the log size deltas both ways at log(1000 / 16): a 10 px box shrinks to 0.16 px at most
    shrunk = heads.coders[0].decode_single(torch.tensor([[0.0, 0.0, -5 * 10.0, 0.0]]), proposal)
    assert torch.allclose(shrunk, torch.tensor([[5 - 0.08, 0.0, 5 + 0.08, 10.0]]), atol=1e-5)


def test_anchors_lie_on_fixed_stride_grids_unrounded():
    # an 800 x 1216 input at patch 16: levels of 200 x 304 ... 25 x 38 and a 13 x 19 top level
    shapes = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]
    images = SimpleNamespace(image_sizes=[(800, 1216)])
    (anchors,) = detection.Anchors()(images, [torch.zeros(1, 8, *s, dtype=torch.bfloat16) for s in shapes])
    counts = [3 * h * w for h, w in shapes]
    assert anchors.dtype == torch.float32 and len(anchors) == sum(counts)
    top = anchors[sum(counts[:4]):].view(13, 19, 3, 4)
    centres = (top[..., :2] + top[..., 2:]) / 2
    assert torch.equal(centres[:, 0, 1, 1], torch.arange(13) * 64.0)      # 0, 64, ..., 768 (not 61 px apart)
    assert torch.equal(centres[0, :, 1, 0], torch.arange(19) * 64.0)      # (ratio 1: integer corners)
    # the first level's base anchors: area 32^2, h / w = 0.5, 1, 2, centred on (0, 0), not rounded
    half = [(16 * 2 ** 0.5, 8 * 2 ** 0.5), (16.0, 16.0), (8 * 2 ** 0.5, 16 * 2 ** 0.5)]
    expected = torch.tensor([[-w, -h, w, h] for w, h in half])
    assert torch.allclose(anchors[:3], expected, atol=1e-5)


def test_rpn_targets_follow_mmdet_assignment():
    anchors = torch.tensor([[0.0, 0, 10, 10],      # IoU 1 with gt 0: foreground
                            [-5.0, 0, 5, 10],      # crosses the left border: left out
                            [50.0, 50, 60, 60],    # best IoU 0.21 for gt 1: below min_pos_iou, background
                            [80.0, 80, 92, 92],    # IoU 0.64 with gt 2: between thresholds, but its best
                            [20.0, 20, 30, 30],    # IoU 0.71 with gts 3 and 4 alike: the later one takes it
                            [0.0, 90, 10, 100]])   # x2, y2 must be < the image size: left out
    gts = torch.tensor([[0.0, 0, 10, 10], [48.0, 48, 70, 70], [80.0, 80, 95, 95], [20.0, 20, 30, 34],
                        [20.0, 16, 30, 30]])
    labels, matched = detection.assign_anchors(anchors, gts, (100, 100))
    assert labels.tolist() == [1, -1, 0, 1, 1, -1]
    assert torch.equal(matched[[0, 3, 4]], gts[[0, 2, 4]])
    labels, _ = detection.assign_anchors(anchors, torch.zeros(0, 4), (100, 100))
    assert labels.tolist() == [0, -1, 0, 0, 0, -1]
    labels, _ = detection.assign_anchors(anchors, gts, (8, 8))   # no anchor fits inside: no targets at all
    assert labels.tolist() == [-1] * 6


def test_stage_weights_scale_each_stage_loss():
    torch.manual_seed(0)
    heads = detection.CascadeRoIHeads(32, 3, rois_per_image=16, conv_dims=(32,), fc_dim=16, mask_dims=(32,)).train()
    features = {str(i): torch.randn(1, 32, 32 // 2**i, 32 // 2**i) for i in range(4)}
    proposals = [torch.tensor([[2.0, 2, 30, 30], [0, 0, 60, 60], [10, 12, 40, 50], [5, 5, 20, 25]])]
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 4:30, 4:32] = 1
    targets = [dict(boxes=torch.tensor([[4.0, 4, 32, 30]]), labels=torch.tensor([2]), masks=masks)]

    def losses(weights):
        heads.stage_weights = weights
        torch.manual_seed(1)  # the same RoI sampling in both calls
        return heads(features, proposals, [(128, 128)], targets)[1]

    plain, weighted = losses((1.0, 1.0, 1.0)), losses((1.0, 0.5, 0.25))
    for t, w in enumerate((1.0, 0.5, 0.25)):
        for kind in ("classifier", "box_reg"):
            expected = w * plain[f"loss_{kind}_s{t}"].item()
            assert weighted[f"loss_{kind}_s{t}"].item() == pytest.approx(expected, rel=1e-5)
    for t, w in enumerate((1.0, 0.5, 0.25)):
        assert weighted[f"loss_mask_s{t}"].item() == pytest.approx(w * plain[f"loss_mask_s{t}"].item(), rel=1e-5)
        assert weighted[f"loss_mask_s{t}"].item() > 0


def test_images_without_objects_give_no_box_or_mask_loss():
    torch.manual_seed(0)
    model = tiny_detector().train()
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                 masks=torch.zeros(0, 64, 80, dtype=torch.uint8))
    losses = model([torch.rand(3, 64, 80)], [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[f"loss_mask_s{t}"] == 0 and losses[f"loss_box_reg_s{t}"] == 0 for t in range(3))
    sum(losses.values()).backward()


def test_detections_average_the_stage_logits():
    torch.manual_seed(0)
    heads = detection.CascadeRoIHeads(32, 3, conv_dims=(32,), fc_dim=16, mask_dims=(32,), score_thresh=0.0).eval()
    features = {str(i): torch.randn(1, 32, 32 // 2**i, 32 // 2**i) for i in range(4)}
    box = [torch.tensor([[10.0, 10, 50, 60]])]
    (result,), _ = heads(features, box, [(128, 128)])
    boxes, logits_sum = box, 0
    for t in range(3):  # by hand: every stage scores the boxes the previous stage refined
        logits, deltas = heads.stage(t, features, boxes)
        logits_sum = logits_sum + logits
        boxes = heads.refine(t, deltas, boxes, [(128, 128)])
    mean = (logits_sum / 3).softmax(-1)[0, 1:]   # mmdet: the stages' logits averaged, then softmax
    best = result["scores"].argmax()
    assert result["scores"][best] == pytest.approx(mean.max().item(), rel=1e-5)
    assert torch.allclose(result["boxes"][best], boxes[0][0], atol=1e-4)   # the last stage's box
    label = result["labels"][best:best + 1]
    probs = torch.stack([heads.mask_logits(t, features, [result["boxes"][best:best + 1]], [label]).sigmoid()
                         for t in range(3)]).mean(0)   # the three mask heads averaged
    assert result["mask_probs"].shape[1:] == (28, 28) and torch.allclose(result["mask_probs"][best], probs[0])


def test_training_step_and_inference_at_several_patches():
    torch.manual_seed(0)
    for patch in (64, 16, 2):
        model = tiny_detector(patch).train()
        masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
        masks[0, 10:30, 10:40] = 1
        target = dict(boxes=torch.tensor([[10.0, 10, 40, 30]]), labels=torch.tensor([1]), masks=masks)
        losses = model([torch.rand(3, 64, 80)], [target])
        assert set(losses) >= {"loss_objectness", "loss_rpn_box_reg", "loss_mask_s2", "loss_classifier_s2"}
        sum(losses.values()).backward()
        assert model.backbone.body.patch_embed.proj.weight.grad.abs().sum() > 0
        model.eval()
        with torch.no_grad():
            (out,) = model([torch.rand(3, 70, 90)])
        assert out["mask_probs"].shape[1:] == (28, 28) and len(out["boxes"]) <= 100
        assert (out["boxes"][:, 2:] <= torch.tensor([90, 70])).all()   # in the original image's coordinates


# --- COCO data and evaluation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = demo_data.write_digit_coco(str(tmp_path_factory.mktemp("coco")), n_train=6, n_val=10)
    ann = os.path.join(root, "annotations", "instances_val2017.json")
    return root, det.CocoInstances(os.path.join(root, "val2017"), ann)


def test_coco_dataset_maps_categories_and_filters(coco, tmp_path):
    root, _ = coco
    data = json.load(open(os.path.join(root, "annotations", "instances_val2017.json")))
    first = data["annotations"][0]
    data["annotations"] += [  # a crowd region and a box with no area: both left out of training targets
        dict(first, id=1000, iscrowd=1), dict(first, id=1001, bbox=[5.0, 5.0, 0.0, 3.0])]
    ann = str(tmp_path / "instances.json")
    json.dump(data, open(ann, "w"))
    ds = det.CocoInstances(os.path.join(root, "val2017"), ann)
    assert ds.category_ids == [1, 3, 7, 9] and ds.label_of == {1: 1, 3: 2, 7: 3, 9: 4}
    assert (ds.crowd, ds.degenerate) == (1, 1)
    image, target = ds[0]                     # every fifth image has no object
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 64, 64)
    for i in range(len(ds)):
        _, target = ds[i]
        anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"] and not a["iscrowd"]
                and a["bbox"][2] > 0]
        assert (sorted(ds.category_ids[k - 1] for k in target["labels"].tolist())
                == sorted(a["category_id"] for a in anns))
        assert torch.all(target["boxes"][:, 2:] > target["boxes"][:, :2])
        for box, mask in zip(target["boxes"], target["masks"]):   # each mask lies inside its box
            ys, xs = torch.where(mask > 0)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]


def test_results_writer_round_trips_through_pycocotools(coco):
    _, ds = coco
    results = []
    for i in range(len(ds)):   # the ground truth itself, as detections with score 1: AP must be 100
        image, target = ds[i]
        # each mask as the detector gives it: probabilities over its box, pasted back at full size
        probs = torch.stack([roi_align(m[None, None].float(), [b[None]], 56, aligned=True)[0, 0]
                             for m, b in zip(target["masks"], target["boxes"])]) if len(target["boxes"]) else None
        out = dict(boxes=target["boxes"], labels=target["labels"], scores=torch.ones(len(target["labels"])))
        if probs is not None:
            out["mask_probs"] = probs
        results += detection.to_coco_results(out, target["image_id"], ds.category_ids, image.shape[-2:])
    assert {r["category_id"] for r in results} <= {1, 3, 7, 9}
    scores = detection.coco_evaluate(ds.coco, results)
    assert scores["bbox"]["AP"] == pytest.approx(100) and scores["segm"]["AP"] > 95


def test_evaluation_equals_pycocotools_and_rejects_unknown_ids(coco, tmp_path):
    from pycocotools.cocoeval import COCOeval
    _, ds = coco
    gen = torch.Generator().manual_seed(0)
    results = []
    for image_id in ds.image_ids:   # a known, imperfect case: jittered GT boxes with random scores
        for a in ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=image_id)):
            jitter = (torch.rand(4, generator=gen) * 4 - 2).tolist()
            score = torch.rand(1, generator=gen).item()
            results.append(dict(image_id=image_id, category_id=a["category_id"], score=score,
                                bbox=[v + j for v, j in zip(a["bbox"], jitter)]))
    path = tmp_path / "results.json"
    json.dump(results, open(path, "w"))
    ours = detection.coco_evaluate(ds.coco, detection.load_results(str(path)), kinds=("bbox",))["bbox"]
    reference = COCOeval(ds.coco, ds.coco.loadRes(str(path)), "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    for name, v in zip(detection.STAT_NAMES, reference.stats[:6]):   # -1: no object of that size -> None
        assert ours[name] == (pytest.approx(100 * v) if v >= 0 else None), name
    assert 0 < ours["AP"] < 100
    with pytest.raises(ValueError, match=r"image ids \[999\]"):
        detection.coco_evaluate(ds.coco, [dict(results[0], image_id=999)])
    with pytest.raises(ValueError, match=r"category ids \[2\]"):
        detection.coco_evaluate(ds.coco, [dict(results[0], category_id=2)])


# --- the command line -----------------------------------------------------------------------------

CLI = ["--model", "adv_t", "--embed-dim", "32", "--depth", "2", "--d-state", "16", "--patch", "8", "--workers", "0",
       "--min-size", "64", "--max-size", "64", "--channels", "32", "--head-dims", "32", "--fc-dim", "64",
       "--rois-per-image", "32", "--batch-size", "2", "--warmup-iters", "2"]


def test_training_evaluation_and_results_file_round_trip(tmp_path):
    data = demo_data.write_digit_coco(str(tmp_path / "coco"), n_train=6, n_val=5)   # images with and without objects
    out, preds = str(tmp_path / "run"), str(tmp_path / "preds")
    run_script("eval_det.py", CLI + ["--data-path", data, "--output", out, "--max-iters", "4", "--save-predictions",
                                     preds, "--visualize", "2"], tmp_path)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["iter"] == 4 and {"bbox_AP", "segm_AP", "bbox_AP50", "segm_APl"} <= set(results)
    assert results["val_loss"] > 0 and results["segm_APl"] is None   # no large objects in 64 px images
    assert len(os.listdir(os.path.join(out, "visualize"))) == 2
    assert os.listdir(preds) == ["coco_results.json"]   # a folder, as in eval_seg.py
    written = json.load(open(os.path.join(preds, "coco_results.json")))
    assert written and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(written[0])
    assert {r["category_id"] for r in written} <= set(demo_data.DEMO_CATEGORIES)
    # scoring the written file without a model reproduces the run's numbers
    run_script("eval_det.py", ["--eval-results", os.path.join(preds, "coco_results.json"), "--data-path", data,
                               "--output", str(tmp_path / "rescored")], tmp_path)
    rescored = json.load(open(tmp_path / "rescored" / "results.json"))
    assert all(rescored[k] == pytest.approx(results[k]) for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75"))
    # a results file naming images the annotations lack is refused clearly
    json.dump([dict(written[0], image_id=4242)], open(tmp_path / "bad.json", "w"))
    proc = run_script("eval_det.py", ["--eval-results", str(tmp_path / "bad.json"), "--data-path", data, "--output",
                                      str(tmp_path / "bad")], tmp_path, check=False)
    assert proc.returncode != 0 and "image ids [4242]" in proc.stderr


def test_resume_after_a_kill_is_bit_exact(tmp_path):
    data = demo_data.write_digit_coco(str(tmp_path / "coco"), n_train=6, n_val=2)
    common = CLI + ["--data-path", data, "--max-iters", "8", "--save-every", "2"]
    run_script("eval_det.py", common + ["--output", str(tmp_path / "straight")], tmp_path)
    killed = str(tmp_path / "killed")
    state = run_and_kill("eval_det.py", common + ["--output", killed], tmp_path, os.path.join(killed, "checkpoint.pth"),
                         ready=lambda ckpt: True)
    assert state["iter"] < 8, "the run finished before it could be killed"
    check_refused("eval_det.py", common + ["--output", killed, "--lr", "0.5"], tmp_path, killed, "lr ")
    run_script("eval_det.py", common + ["--output", killed, "--workers", "1"], tmp_path)   # other loader processes
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(os.path.join(killed, "checkpoint.pth"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_run_gathers_every_rank_detections(tmp_path):
    data = demo_data.write_digit_coco(str(tmp_path / "coco"), n_train=6, n_val=5)   # 5 images: 3 + 2 over 2 ranks
    out = str(tmp_path / "ddp")
    run_script("eval_det.py", CLI + ["--data-path", data, "--output", out, "--max-iters", "3",
                                     "--save-predictions", str(tmp_path / "ddp")], tmp_path, nproc=2)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["run_state"]["world"] == 2
    log = open(os.path.join(out, "log.jsonl")).read()
    # one process evaluating the same checkpoint, in the run's folder, finds the same detections and the
    # same AP, written to eval.json: the training run's results and log stay as they were
    run_script("eval_det.py", CLI + ["--data-path", data, "--output", out, "--eval-only",
                                     "--save-predictions", str(tmp_path / "one")], tmp_path)
    single = json.load(open(os.path.join(out, "eval.json")))
    assert json.load(open(os.path.join(out, "results.json"))) == results
    assert open(os.path.join(out, "log.jsonl")).read() == log
    ddp_preds, one_preds = (json.load(open(tmp_path / name / "coco_results.json")) for name in ("ddp", "one"))
    assert sorted(p["image_id"] for p in ddp_preds) == sorted(p["image_id"] for p in one_preds)
    assert single["bbox_AP"] == pytest.approx(results["bbox_AP"])
    assert single["segm_AP"] == pytest.approx(results["segm_AP"])


# --- paper-scale fixes: each of these failed before its fix ----------------------------------------

@pytest.mark.parametrize("patch", [64, 32, 16, 8, 4, 2, 1])
def test_every_table3_patch_builds_at_the_default_800_1333_input(patch):
    # 800 is not a multiple of 64: the backbone used to be built at res 800 and refused patch 64
    args = det.parse_args(["--data-path", "unused", "--patch", str(patch), "--depth", "1", "--embed-dim", "32",
                           "--channels", "32", "--head-dims", "32", "--fc-dim", "64"])
    model = det.build(args, 80, torch.device("cpu"))
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    if patch >= 32:   # the others run in tests/test_paper_scale.py
        model.eval()
        images, _ = model.transform([torch.rand(3, 600, 1000)])
        levels = model.backbone(images.tensors)
        assert images.tensors.shape[-2:] == (832 if patch == 64 else 800, 1344)
        assert [v.shape[-1] for v in levels.values()] == [336, 168, 84, 42, 21]


MEMORY_PROBE = """
import resource, sys, torch
import engine, eval_det as det
from types import SimpleNamespace

class Photos:   # n images of 800 x 1333
    category_ids = [1, 3]
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        return torch.rand(3, 800, 1333), dict(image_id=i + 1)

class Detector(torch.nn.Module):   # 100 large detections per image, as an untrained detector gives
    def forward(self, images):
        g = torch.Generator().manual_seed(0)
        x1y1 = torch.rand(100, 2, generator=g) * 500
        boxes = torch.cat([x1y1, x1y1 + 300 + torch.rand(100, 2, generator=g) * 400], 1).clamp(max=800)
        return [dict(boxes=boxes, scores=torch.rand(100, generator=g), labels=torch.ones(100, dtype=torch.long),
                     mask_probs=torch.rand(100, 28, 28, generator=g))]

args = SimpleNamespace(visualize=0, output=".")
results = det.detect_and_encode(Detector(), Photos(int(sys.argv[1])), args, engine.Run())
assert len(results) == 100 * int(sys.argv[1])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_evaluation_memory_does_not_grow_with_the_number_of_images(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT, clean_env
    peak = {}
    for n in (1, 6):   # holding each image's pasted masks would be 100 x 800 x 1333 bytes (107 MB) per image
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n)], cwd=ROOT, env=clean_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peak[n] = int(proc.stdout.split()[-1])
    assert peak[6] - peak[1] < 60, peak   # MB


def test_paste_mask_as_detectron2_by_hand():
    # a mask of ones pasted at a real-valued box covers exactly the pixels whose centres lie in the box:
    # centres x + 0.5 in [10.3, 30.2] -> columns 10..29; y + 0.5 in [20.6, 40.1] -> rows 21..39
    pasted = detection.paste_mask(torch.ones(28, 28), torch.tensor([10.3, 20.6, 30.2, 40.1]), 64, 48)
    expected = np.zeros((64, 48), np.uint8)
    expected[21:40, 10:30] = 1
    assert pasted.shape == (64, 48) and np.array_equal(pasted, expected)
    # the left half of the mask, pasted at twice its size: columns 0..27 of 56 (the sampled value at
    # column 27's centre is 0.75, at column 28's 0.25)
    half = torch.zeros(28, 28)
    half[:, :14] = 1
    pasted = detection.paste_mask(half, torch.tensor([0.0, 0.0, 56.0, 56.0]), 56, 56)
    assert pasted[:, :28].all() and not pasted[:, 28:].any()
    assert not detection.paste_mask(torch.ones(28, 28), torch.tensor([5.0, 5.0, 5.0, 9.0]), 16, 16).any()  # empty box


def test_roi_pool_is_aligned_and_picks_the_fpn_level():
    # features whose value is the column index: RoIAlign with aligned=True gives, per output bin, the
    # bin centre in feature coordinates minus the half-pixel offset: (x1 + (j + 0.5) w / 7) / stride - 0.5
    pool = detection.RoIPool(7)
    features = {str(k): torch.arange(512 // s, dtype=torch.float32).expand(1, 1, 512 // s, 512 // s).clone()
                for k, s in enumerate((4, 8, 16, 32))}
    for side, stride in ((40, 4), (112, 8), (250, 16), (460, 32)):   # floor(log2(side / 56)) picks the level
        box = torch.tensor([[6.0, 6.0, 6.0 + side, 6.0 + side]])
        out = pool(features, [box])[0, 0]
        expected = (6.0 + (torch.arange(7) + 0.5) * side / 7) / stride - 0.5
        assert torch.allclose(out[3], expected, atol=1e-4), (side, stride)


def test_mask_targets_are_aligned_crops_binarised():
    gt = torch.zeros(1, 40, 40, dtype=torch.uint8)
    gt[0, 8:24, 8:16] = 1   # an object 8 wide and 16 tall
    exact = detection.mask_targets(torch.tensor([[8.0, 8.0, 16.0, 24.0]]), gt, torch.tensor([0]), 28)
    assert exact.shape == (1, 28, 28) and exact.all()
    wide = detection.mask_targets(torch.tensor([[8.0, 8.0, 24.0, 24.0]]), gt, torch.tensor([0]), 28)
    assert wide[0, :, :14].all() and not wide[0, :, 14:].any()   # the box is twice the object's width


def test_box_loss_is_smooth_l1_beta_1_over_the_sampled_rois():
    deltas, targets = torch.tensor([[0.5, 2.0, 0.0, -1.0]]), torch.zeros(1, 4)
    # 0.5 * 0.5^2 + (2 - 0.5) + 0 + 0.5 * 1^2 = 0.125 + 1.5 + 0.5, over 4 sampled RoIs
    assert detection.box_regression_loss(deltas, targets, 4).item() == pytest.approx(2.125 / 4)


def test_later_stages_start_from_refined_rois_without_the_added_ground_truth():
    torch.manual_seed(0)
    heads = detection.CascadeRoIHeads(32, 3, rois_per_image=16, conv_dims=(32,), fc_dim=16, mask_dims=(32,)).train()
    features = {str(i): torch.randn(1, 32, 32 // 2**i, 32 // 2**i) for i in range(4)}
    proposals = [torch.tensor([[2.0, 2, 30, 30], [0, 0, 60, 60], [10, 12, 40, 50]])]
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 4:30, 4:32] = 1
    targets = [dict(boxes=torch.tensor([[4.0, 4, 32, 30]]), labels=torch.tensor([2]), masks=masks)]
    inputs, sampled, refined = [], [], []
    sample, refine = heads.sample, heads.refine
    heads.sample = (lambda t, boxes, targets:
                    inputs.append(boxes) or sampled.append(sample(t, boxes, targets)) or sampled[-1])
    heads.refine = lambda *a: refined.append(refine(*a)) or refined[-1]
    heads(features, proposals, [(128, 128)], targets)
    assert len(inputs[0][0]) == 3     # stage 0: the proposals; the sampler then adds the ground truth
    for t in (1, 2):   # stage t starts from stage t-1's sampled RoIs, refined, less the one ground truth added
        is_gt = sampled[t - 1][-1][0]
        assert is_gt.sum() == 1 and torch.equal(sampled[t - 1][0][0][is_gt], targets[0]["boxes"])
        assert len(inputs[t][0]) == len(sampled[t - 1][0][0]) - 1
        assert torch.equal(inputs[t][0], refined[t - 1][0][~is_gt])


def test_boxes_are_decoded_in_float32_under_bf16_autocast():
    # a proposal at real-valued coordinates near 1,000 px through a stage that predicts no change:
    # bf16 (8 bits of mantissa) would round it to multiples of 4-8 px
    heads = detection.CascadeRoIHeads(32, 3, conv_dims=(32,), fc_dim=16, mask_dims=(32,)).eval()
    for regressor in heads.regressors:
        torch.nn.init.zeros_(regressor.weight), torch.nn.init.zeros_(regressor.bias)
    features = {str(i): torch.randn(1, 32, 320 // 2**i, 320 // 2**i) for i in range(4)}
    box = torch.tensor([[901.3, 700.7, 1201.9, 1100.2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, deltas = heads.stage(0, features, [box])
        refined = heads.refine(0, deltas, [box], [(1280, 1280)])
    assert deltas.dtype == torch.float32 and torch.allclose(refined[0], box, atol=1e-3)
    rpn = detection.RPNHead32(32, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objectness, rpn_deltas = rpn([features["0"]])
    assert objectness[0].dtype == rpn_deltas[0].dtype == torch.float32


def test_layer_decay_reaches_the_detection_backbone():
    args = det.parse_args(["--data-path", "unused", "--depth", "2", "--embed-dim", "32", "--channels", "32",
                           "--head-dims", "32", "--fc-dim", "64", "--layer-decay", "0.5"])
    model = det.build(args, 3, torch.device("cpu"))
    groups = engine.backbone_and_head_groups(model, model.backbone.body, args.weight_decay, args.layer_decay)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["backbone.body.patch_embed.proj.weight"])] == 0.5 ** 3   # layer 0 of depth 2
    assert scale[id(named["backbone.body.layers.1.mixer.in_proj.weight"])] == 0.5
    assert scale[id(named["roi_heads.classifiers.0.weight"])] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert det.parse_args(["--data-path", "x"]).layer_decay == 1.0   # the paper's stated recipe has none


def segm_by_area_case(tmp_path):
    """One small object (20 x 20), detected exactly, and a higher-scored false positive: a thin
    L-shaped mask (small by its mask area, 236 px) in a 60 x 60 box (medium by its box area)."""
    import pycocotools.mask as mask_util
    from pycocotools.coco import COCO

    def rle(mask):
        r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return dict(size=r["size"], counts=r["counts"].decode("ascii"))
    obj = np.zeros((100, 100), bool)
    obj[10:30, 10:30] = True
    ell = np.zeros((100, 100), bool)
    ell[38:40, 38:98] = True
    ell[38:98, 38:40] = True
    gt = dict(images=[dict(id=1, width=100, height=100)], categories=[dict(id=1, name="thing")],
              annotations=[dict(id=1, image_id=1, category_id=1, iscrowd=0, area=400.0, bbox=[10, 10, 20, 20],
                                segmentation=rle(obj))])
    path = tmp_path / "gt.json"
    json.dump(gt, open(path, "w"))
    results = [dict(image_id=1, category_id=1, score=0.9, bbox=[10.0, 10.0, 20.0, 20.0], segmentation=rle(obj)),
               dict(image_id=1, category_id=1, score=0.95, bbox=[38.0, 38.0, 60.0, 60.0], segmentation=rle(ell))]
    return COCO(str(path)), results


def test_mask_ap_by_size_uses_mask_areas(tmp_path):
    coco_gt, results = segm_by_area_case(tmp_path)
    before = json.loads(json.dumps(results))
    scores = detection.coco_evaluate(coco_gt, results)
    # by mask area the false positive is small: ranked first, it halves precision at full recall
    assert scores["segm"]["APs"] == pytest.approx(50.0)
    # by box area (the box kind's rule) it is medium and ignored among small objects
    assert scores["bbox"]["APs"] == pytest.approx(100.0)
    assert results == before   # the caller's results are not modified by loadRes


def test_segm_only_results_file(tmp_path):
    from pycocotools.cocoeval import COCOeval
    coco_gt, results = segm_by_area_case(tmp_path)
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    path = tmp_path / "segm.json"
    json.dump(segm_only, open(path, "w"))
    folder = tmp_path / "scored"
    run_script("eval_det.py", ["--eval-results", str(path), "--ann-file", str(tmp_path / "gt.json"), "--output",
                               str(folder)], tmp_path)
    scored = json.load(open(folder / "results.json"))
    assert not any(k.startswith("bbox_") for k in scored)
    reference = COCOeval(coco_gt, coco_gt.loadRes(str(path)), "segm")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    for name, v in zip(detection.STAT_NAMES, reference.stats[:6]):
        assert scored[f"segm_{name}"] == (pytest.approx(100 * v) if v >= 0 else None), name


def test_demo_defaults_never_override_typed_flags():
    assert det.parse_args(["--patch", "16"]).patch == 16            # 16 is the default; the demo's is 4
    assert det.parse_args(["--lr", "1e-4", "--epochs", "12"]).lr == 1e-4
    assert det.parse_args([]).patch == det.DEMO["patch"]              # untyped: the demo's values
    full = det.parse_args(["--data-path", "COCO"])
    assert (full.patch, full.min_size, full.lr) == (16, 800, 1e-4)   # with data: the paper's defaults


def test_resume_keeps_one_log_line_per_evaluation(tmp_path):
    data = demo_data.write_digit_coco(str(tmp_path / "coco"), n_train=6, n_val=1)
    out = str(tmp_path / "run")
    run_script("eval_det.py", CLI + ["--data-path", data, "--max-iters", "1", "--output", out], tmp_path)
    # what a run of 2 iterations killed after logging its second evaluation leaves: the checkpoint of
    # iteration 1 (its settings those of the 2-iteration run), a log line after it, no results
    checkpoint = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    checkpoint["args"]["max_iters"] = 2
    torch.save(checkpoint, os.path.join(out, "checkpoint.pth"))
    os.remove(os.path.join(out, "results.json"))
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(dict(iter=2, bbox_AP=0.0)) + "\n")
    run_script("eval_det.py", CLI + ["--data-path", data, "--max-iters", "2", "--output", out], tmp_path)
    assert [json.loads(line)["iter"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2]


def test_context_parallel_trains_as_one_process(tmp_path):
    """--context-parallel 2: each image's tokens split over 2 processes, the detector on the gathered map, RoI
    sampling drawn alike on both: the same weights as one process to float32 rounding, detections once."""
    data = demo_data.write_digit_coco(str(tmp_path / "coco"), n_train=6, n_val=5)
    common = CLI + ["--data-path", data, "--max-iters", "2"]
    run_script("eval_det.py", common + ["--output", str(tmp_path / "one")], tmp_path)
    run_script("eval_det.py", common + ["--output", str(tmp_path / "cp"), "--context-parallel", "2"], tmp_path,
               nproc=2)
    one, cp = same_run_without_and_with_context_parallel(tmp_path)
    assert cp["bbox_AP"] == pytest.approx(one["bbox_AP"], abs=0.05)
    assert cp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-3)


def test_a_run_folder_holds_one_run(tmp_path):
    data = demo_data.write_digit_coco(str(tmp_path / "coco"), n_train=4, n_val=2)
    out = str(tmp_path / "run")
    args = CLI + ["--data-path", data, "--output", out, "--max-iters", "2"]
    run_script("eval_det.py", args, tmp_path)
    check_one_run_per_folder("eval_det.py", args, tmp_path, out, lr="0.5")
