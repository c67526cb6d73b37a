"""COCO detection and instance segmentation: a Cascade Mask R-CNN on a plain pixelvit backbone (paper Table 3).

    python eval_det.py                      # a short demo on a tiny COCO-format set, CPU, 2 minutes
    torchrun --nproc_per_node 8 eval_det.py --model adv_b --patch 4 --data-path COCO --finetune imagenet.pth
    python eval_det.py --eval-only --resume runs/det_adv_b_p4/checkpoint.pth --model adv_b --patch 4 --data-path COCO
    python eval_det.py --eval-results results.json --data-path COCO   # score a results file, no model

The paper's recipe by default: AdamW lr 1e-4, weight decay 0.05, total batch 16, 12 epochs with the
lr divided by 10 at epochs 8 and 11 after a 500-iteration linear warm-up (mmdet's 1x), short side 800
and long side 1333, horizontal flips.

The detector is torchvision's GeneralizedRCNN machinery (transform, RPN, anchors, RoIAlign, box and
mask heads, mask losses) with what torchvision lacks written here:
  * `SimpleFeaturePyramid`: ViTDet's pyramid generalised to a stride-p backbone, strides 4..64 for any p.
  * `CascadeRoIHeads`: Cai & Vasconcelos' cascade with mmdet's training rules (re-assign and re-sample
    at every stage, IoU 0.5 / 0.6 / 0.7, box-coder weights (10,10,5,5) / (20,20,10,10) / (30,30,15,15),
    class-agnostic regression, stage loss weights 1 / 0.5 / 0.25) and detectron2's test rule (class
    scores averaged over the stages' softmax outputs, boxes from the last stage), one mask head as in
    detectron2's cascade, trained on the last stage's positives.
"""
import argparse
import json
import math
import os
from collections import OrderedDict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from tqdm import tqdm

import pixelvit as pv
import train

# ----------------------------------------------------------------------------------------------
# COCO data and evaluation


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances: (image in [0, 1], target) with boxes (x1, y1, x2, y2), contiguous labels 1..K,
    uint8 masks and the image id. Category ids with gaps map to 1..K in sorted order and back
    (`category_ids`). Crowd regions and boxes with no area are left out, and counted."""

    def __init__(self, img_dir, ann_file, flip=False):
        from pycocotools.coco import COCO
        if not os.path.isfile(ann_file) or not os.path.isdir(img_dir):
            raise SystemExit(f"expected COCO images in {img_dir} and annotations in {ann_file}")
        self.coco, self.img_dir, self.flip = COCO(ann_file), img_dir, flip
        self.image_ids = sorted(self.coco.getImgIds())
        self.category_ids = sorted(self.coco.getCatIds())  # label k is category_ids[k - 1]
        self.label_of = {c: k + 1 for k, c in enumerate(self.category_ids)}
        anns = self.coco.loadAnns(self.coco.getAnnIds())
        self.crowd = sum(a.get("iscrowd", 0) for a in anns)
        self.degenerate = sum(1 for a in anns if not a.get("iscrowd", 0) and not self._usable(a))

    @staticmethod
    def _usable(ann):
        x, y, w, h = ann["bbox"]
        return w > 0 and h > 0

    def __len__(self):
        return len(self.image_ids)

    def __getitem__(self, i):
        from PIL import Image
        image_id = self.image_ids[i]
        info = self.coco.loadImgs(image_id)[0]
        image = torch.from_numpy(np.array(Image.open(os.path.join(self.img_dir, info["file_name"])).convert("RGB")))
        image = image.permute(2, 0, 1).float() / 255
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
                if not a.get("iscrowd", 0) and self._usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros(0, info["height"], info["width"], dtype=torch.uint8)
        target = dict(boxes=boxes, labels=torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.long),
                      masks=masks, image_id=image_id)
        if self.flip and torch.rand(()) < 0.5:
            image, target["masks"] = image.flip(-1), masks.flip(-1)
            target["boxes"] = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1],
                                           image.shape[-1] - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, target


def to_coco_results(outputs, image_ids, category_ids, mask_threshold=0.5):
    """Detections in the COCO results format (the test-dev submission format): xywh boxes, scores,
    the original category ids and RLE-encoded masks."""
    import pycocotools.mask as mask_util
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].tolist()
        masks = (out["masks"][:, 0] > mask_threshold).cpu().numpy() if "masks" in out else None
        for k, (box, score, label) in enumerate(zip(boxes, out["scores"].tolist(), out["labels"].tolist())):
            entry = dict(image_id=int(image_id), category_id=category_ids[label - 1], score=float(score),
                         bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]])
            if masks is not None:
                rle = mask_util.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                entry["segmentation"] = dict(size=rle["size"], counts=rle["counts"].decode("ascii"))
            results.append(entry)
    return results


DEMO_CATEGORIES = {1: "red", 3: "green", 7: "blue", 9: "yellow"}  # ids with gaps, as COCO's have


def write_digit_coco(root, n_train=120, n_val=20, size=64, seed=0):
    """A tiny COCO-format set (train2017/, val2017/, annotations/instances_*.json) of real scanned
    digits in four ink colours: one instance per digit, its category the colour, an RLE mask of its
    ink; every fifth image holds no object."""
    import pycocotools.mask as mask_util
    from PIL import Image
    from sklearn.datasets import load_digits

    from eval_seg import render_digit_scene
    digits, rng = load_digits(), np.random.default_rng(seed)
    category_ids = sorted(DEMO_CATEGORIES)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count in (("train2017", n_train), ("val2017", n_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for k in range(count):
            rgb, instances = render_digit_scene(rng, digits, size, 0 if k % 5 == 0 else int(rng.integers(1, 4)))
            name = f"{k:012d}.jpg"
            Image.fromarray(rgb).save(os.path.join(root, split, name), quality=95)
            images.append(dict(id=k + 1, file_name=name, height=size, width=size))
            for mask, colour in instances:
                if not mask.any():
                    continue
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append(dict(id=len(annotations) + 1, image_id=k + 1, category_id=category_ids[colour],
                                        iscrowd=0, area=float(mask_util.area(rle)), bbox=mask_util.toBbox(rle).tolist(),
                                        segmentation=dict(size=rle["size"], counts=rle["counts"].decode("ascii"))))
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(dict(images=images, annotations=annotations,
                           categories=[dict(id=c, name=n) for c, n in DEMO_CATEGORIES.items()]), f)
    return root


STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def coco_evaluate(coco_gt, results, kinds=("bbox", "segm")):
    """pycocotools' COCOeval on a list of results; {kind: {AP, AP50, AP75, APs, APm, APl}} in %."""
    from pycocotools.cocoeval import COCOeval
    known_images, known_categories = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    unknown_images = sorted({r["image_id"] for r in results} - known_images)
    unknown_categories = sorted({r["category_id"] for r in results} - known_categories)
    if unknown_images or unknown_categories:
        raise ValueError(f"results refer to image ids {unknown_images[:5]} and category ids {unknown_categories[:5]} "
                         f"that the annotations do not have")
    scores = {}
    for kind in kinds:
        if not results or (kind == "segm" and "segmentation" not in results[0]):
            scores[kind] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        # pycocotools gives -1 where no object of that size exists: None (null in JSON)
        scores[kind] = {name: 100 * float(v) if v >= 0 else None for name, v in zip(STAT_NAMES, evaluator.stats[:6])}
    return scores


def load_results(path):
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, list) or any(not {"image_id", "category_id", "score"} <= set(r) for r in results):
        raise ValueError(f"{path}: expected a COCO results list of dicts with image_id, category_id, score, bbox")
    return results

# ----------------------------------------------------------------------------------------------
# Backbone and pyramid


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid for a backbone of any stride p: from one stride-p map, levels at
    strides 4, 8, 16 and 32 (transposed convolutions halving the width where p > stride, max-pooling
    where p < stride), each then a 1x1 and a 3x3 convolution to `channels` with LayerNorm, plus a
    stride-64 level max-pooled from stride 32. The output is what torchvision's RPN and RoI pooling read."""

    def __init__(self, dim, patch, channels=256, strides=(4, 8, 16, 32)):
        super().__init__()
        self.out_channels = channels
        self.levels = nn.ModuleList()
        for stride in strides:
            layers, width = [], dim
            if patch > stride:
                ups = (patch // stride).bit_length() - 1
                for k in range(ups):
                    layers.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
                    width //= 2
                    if k < ups - 1:
                        layers += [LayerNorm2d(width, eps=1e-6), nn.GELU()]
            elif patch < stride:
                layers.append(nn.MaxPool2d(stride // patch))
            layers += [nn.Conv2d(width, channels, 1, bias=False), LayerNorm2d(channels, eps=1e-6),
                       nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels, eps=1e-6)]
            self.levels.append(nn.Sequential(*layers))

    def forward(self, x):
        out = OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))
        out["pool"] = F.max_pool2d(out[str(len(self.levels) - 1)], kernel_size=1, stride=2)
        return out


class PyramidBackbone(nn.Module):
    """A pixelvit model's final dense map (any input size divisible by its patch) through the pyramid."""

    def __init__(self, model, channels=256):
        super().__init__()
        self.body = model
        self.fpn = SimpleFeaturePyramid(model.embed_dim, model.patch_size, channels)
        self.out_channels = channels

    def forward(self, images):
        return self.fpn(self.body.forward_dense(images))


# ----------------------------------------------------------------------------------------------
# Cascade RoI heads


def match(proposals, gt_boxes, gt_labels, iou_threshold):
    """Label each proposal with its best-overlapping ground truth at IoU >= threshold, else background
    (0). Images without objects make every proposal background (torchvision's Matcher would raise)."""
    if gt_boxes.numel() == 0:
        nothing = torch.zeros(len(proposals), dtype=torch.long, device=proposals.device)
        return nothing, proposals.new_zeros(len(proposals), 4), nothing
    best_iou, best = box_iou(gt_boxes, proposals).max(dim=0)
    labels = torch.where(best_iou >= iou_threshold, gt_labels[best], torch.zeros_like(best))
    return labels, gt_boxes[best], best


class CascadeRoIHeads(nn.Module):
    """Three box stages of rising IoU, each refining the previous stage's boxes, and a mask head.

    Plugs into torchvision's GeneralizedRCNN in place of its RoIHeads. Labels are 1..K, 0 is background.
    """

    def __init__(self, channels, num_classes, stage_ious=(0.5, 0.6, 0.7), stage_weights=(1.0, 0.5, 0.25),
                 coder_weights=((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)), rois_per_image=512,
                 positive_fraction=0.25, score_thresh=0.05, nms_thresh=0.5, detections_per_image=100,
                 conv_dims=(256,) * 4, fc_dim=1024, mask_dims=(256,) * 4):
        super().__init__()
        self.stage_ious, self.stage_weights = stage_ious, stage_weights
        self.coders = [det_utils.BoxCoder(w) for w in coder_weights]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(rois_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image
        levels = ["0", "1", "2", "3"]
        self.box_pool = MultiScaleRoIAlign(levels, 7, sampling_ratio=2)
        self.mask_pool = MultiScaleRoIAlign(levels, 14, sampling_ratio=2)
        norm = partial(nn.GroupNorm, 32)  # mmdet's "4conv1fc with GN" box head
        self.box_heads = nn.ModuleList(FastRCNNConvFCHead((channels, 7, 7), list(conv_dims), [fc_dim], norm_layer=norm)
                                       for _ in stage_ious)
        self.classifiers = nn.ModuleList(nn.Linear(fc_dim, num_classes + 1) for _ in stage_ious)
        self.regressors = nn.ModuleList(nn.Linear(fc_dim, 4) for _ in stage_ious)  # class-agnostic
        self.mask_head = MaskRCNNHeads(channels, list(mask_dims), 1, norm_layer=norm)
        self.mask_predictor = MaskRCNNPredictor(mask_dims[-1], mask_dims[-1], num_classes + 1)

    def stage(self, t, features, boxes, image_shapes):
        """Class logits and box deltas of stage t for lists of boxes."""
        x = self.box_heads[t](self.box_pool(features, boxes, image_shapes))
        return self.classifiers[t](x), self.regressors[t](x)

    def refine(self, t, deltas, boxes, image_shapes):
        """Stage t's boxes, decoded, clipped to the image and detached: the next stage's input."""
        decoded = self.coders[t].decode_single(deltas.detach(), torch.cat(boxes))
        return [clip_boxes_to_image(b, shape) for b, shape in zip(decoded.split([len(b) for b in boxes]), image_shapes)]

    def sample(self, t, boxes, targets):
        """Add the ground truth to the boxes, label them at stage t's IoU and draw the RoIs to train on."""
        boxes = [torch.cat([b, tgt["boxes"]]) for b, tgt in zip(boxes, targets)]
        assigned = [match(b, tgt["boxes"], tgt["labels"], self.stage_ious[t]) for b, tgt in zip(boxes, targets)]
        positives, negatives = self.sampler([labels for labels, _, _ in assigned])
        keep = [torch.where(pos | neg)[0] for pos, neg in zip(positives, negatives)]
        return ([b[k] for b, k in zip(boxes, keep)], *[[a[i][k] for a, k in zip(assigned, keep)] for i in range(3)])

    def forward(self, features, proposals, image_shapes, targets=None):
        return self.train_forward(features, proposals, image_shapes, targets) if self.training else \
            (self.detect(features, proposals, image_shapes), {})

    def train_forward(self, features, proposals, image_shapes, targets):
        losses, boxes = {}, proposals
        for t, weight in enumerate(self.stage_weights):
            boxes, labels, matched_boxes, matched_idx = self.sample(t, boxes, targets)
            logits, deltas = self.stage(t, features, boxes, image_shapes)
            labels_all, rois = torch.cat(labels), torch.cat(boxes)
            positive = labels_all > 0
            regression = self.coders[t].encode_single(torch.cat(matched_boxes)[positive], rois[positive])
            box_loss = F.smooth_l1_loss(deltas[positive], regression, beta=1 / 9, reduction="sum")
            losses[f"loss_classifier_s{t}"] = weight * F.cross_entropy(logits, labels_all)
            losses[f"loss_box_reg_s{t}"] = weight * box_loss / max(labels_all.numel(), 1)
            if t == len(self.stage_weights) - 1:  # the mask head learns from the last stage's positives
                pos = [lab > 0 for lab in labels]
                mask_logits = self.mask_predictor(self.mask_head(self.mask_pool(
                    features, [b[p] for b, p in zip(boxes, pos)], image_shapes)))
                if positive.any():
                    losses["loss_mask"] = maskrcnn_loss(
                        mask_logits, [b[p] for b, p in zip(boxes, pos)], [tgt["masks"] for tgt in targets],
                        [lab[p] for lab, p in zip(labels, pos)], [m[p] for m, p in zip(matched_idx, pos)])
                else:  # no positives (images without objects): zero, but keep the graph for DDP
                    losses["loss_mask"] = mask_logits.sum() * 0
            boxes = self.refine(t, deltas, boxes, image_shapes)
            boxes = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in boxes]  # drop collapsed boxes
        return [], losses

    @torch.no_grad()
    def detect(self, features, proposals, image_shapes):
        boxes, probabilities = proposals, []
        for t in range(len(self.stage_weights)):
            logits, deltas = self.stage(t, features, boxes, image_shapes)
            probabilities.append(F.softmax(logits, -1))
            boxes = self.refine(t, deltas, boxes, image_shapes)
        scores = torch.stack(probabilities).mean(0)[:, 1:]  # mean over stages, background dropped
        results = []
        for b, s in zip(boxes, scores.split([len(b) for b in boxes])):
            k = s.shape[1]
            b, s = b[:, None].expand(-1, k, 4).reshape(-1, 4), s.reshape(-1)
            labels = torch.arange(1, k + 1, device=s.device).repeat(len(s) // k)
            keep = torch.where(s > self.score_thresh)[0]
            keep = keep[remove_small_boxes(b[keep], 1e-2)]
            keep = keep[batched_nms(b[keep], s[keep], labels[keep], self.nms_thresh)][: self.detections_per_image]
            results.append(dict(boxes=b[keep], scores=s[keep], labels=labels[keep]))
        if results and sum(len(r["boxes"]) for r in results):
            mask_logits = self.mask_predictor(self.mask_head(self.mask_pool(
                features, [r["boxes"] for r in results], image_shapes)))
            for r, m in zip(results, maskrcnn_inference(mask_logits, [r["labels"] for r in results])):
                r["masks"] = m
        else:
            for r in results:
                r["masks"] = r["boxes"].new_zeros(0, 1, 28, 28)
        return results


# ----------------------------------------------------------------------------------------------
# The detector


def build_detector(backbone_model, num_classes, channels=256, min_size=800, max_size=1333, rois_per_image=512,
                   rpn_batch=256, head_dims=256, fc_dim=1024):
    """Cascade Mask R-CNN on a pixelvit backbone, at the paper's input size (short side 800, long 1333)."""
    backbone = PyramidBackbone(backbone_model, channels)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    rpn = RegionProposalNetwork(anchors, RPNHead(channels, 3, conv_depth=2), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                                batch_size_per_image=rpn_batch, positive_fraction=0.5,
                                pre_nms_top_n=dict(training=2000, testing=1000),
                                post_nms_top_n=dict(training=2000, testing=1000), nms_thresh=0.7)
    heads = CascadeRoIHeads(channels, num_classes, rois_per_image=rois_per_image, conv_dims=(head_dims,) * 4,
                            fc_dim=fc_dim, mask_dims=(head_dims,) * 4)
    # padded sizes must divide by 32 (the pyramid's coarsest level) and by the patch (64 for Table 3's top row)
    transform = GeneralizedRCNNTransform(min_size, max_size, pv.IMAGENET_MEAN, pv.IMAGENET_STD,
                                         size_divisible=max(32, backbone_model.patch_size))
    return GeneralizedRCNN(backbone, rpn, heads, transform)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


class TrainImages(torch.utils.data.Dataset):
    """Training samples asked for as (draw, index): the draw seeds the flip (exact resume, as in train.py)."""

    def __init__(self, base, seed):
        self.base, self.seed = base, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        draw, index = key
        train.seed_everything(self.seed, "flip", draw)
        return self.base[index]


def collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_dense_task_args(p)
    p.add_argument("--data-path", help="COCO folder: train2017/, val2017/, annotations/instances_{train,val}2017.json "
                                       "(default: a demo set written to --output)")
    p.add_argument("--ann-file", help="validation annotations (default: DATA/annotations/instances_val2017.json)")
    p.add_argument("--img-dir", help="validation images (default: DATA/val2017)")
    p.add_argument("--min-size", type=int, default=800, help="short side (the paper: 800)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--channels", type=int, default=256, help="pyramid and head width")
    p.add_argument("--head-dims", type=int, default=256)
    p.add_argument("--fc-dim", type=int, default=1024)
    p.add_argument("--rois-per-image", type=int, default=512)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr-steps", type=int, nargs="*", default=[8, 11], help="epochs where lr drops 10x")
    p.add_argument("--max-iters", type=int, help="stop after this many iterations (short runs)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-iters", type=int, default=500)
    p.add_argument("--resume", help="detection checkpoint (default: OUTPUT/checkpoint.pth if present)")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--eval-results", help="evaluate an existing COCO results file; no model is run")
    p.add_argument("--save-predictions", help="write the COCO results file (test-dev format) here")
    p.add_argument("--visualize", type=int, default=0, help="draw boxes and masks on N validation images")
    p.add_argument("--save-every", type=int, default=2000)
    p.add_argument("--output", help="default: runs/det_<model>_p<patch>")
    args = p.parse_args(argv)
    if args.data_path is None and not args.eval_results:  # the demo: 64 px scenes, a small detector
        demo = dict(min_size=64, max_size=64, channels=32, head_dims=32, fc_dim=128, rois_per_image=64, epochs=8,
                    lr_steps=[6, 7], batch_size=4, lr=3e-4, warmup_iters=50, embed_dim=64, depth=4, d_state=16,
                    patch=4, drop_path=0.0)
        defaults = vars(p.parse_args([]))
        for key, value in demo.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    args.output = args.output or os.path.join("runs", f"det_{args.model}_p{args.patch}")
    return args


def lr_factor(it, args):
    """mmdet's 1x schedule: linear warm-up from 0.001, then x0.1 at each of --lr-steps (in epochs)."""
    warm = min(1.0, 0.001 + (1 - 0.001) * it / max(args.warmup_iters, 1))
    return warm * 0.1 ** sum(it >= step * args.iters_per_epoch for step in args.lr_steps)


@torch.no_grad()
def evaluate(model, dataset, args, device):
    """COCO box and mask AP of the model on the validation set, gathered from all ranks to rank 0."""
    detector = train.unwrap(model).eval()
    outputs, image_ids = [], []
    for i in tqdm(range(args.rank, len(dataset), args.world), desc="eval", leave=False, disable=not args.is_main):
        image, target = dataset[i]
        with train.autocast(args, device):
            (out,) = detector([image.to(device)])
        outputs.append({k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()})
        image_ids.append(target["image_id"])
        if i < args.visualize:
            draw_detections(image, out, dataset, os.path.join(args.output, "visualize", f"{target['image_id']}.png"))
    results = to_coco_results(outputs, image_ids, dataset.category_ids)
    if dist.is_initialized():
        gathered = [None] * args.world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if not args.is_main:
        return {}
    if args.save_predictions:
        with open(args.save_predictions, "w") as f:
            json.dump(results, f)
    return coco_evaluate(dataset.coco, results)


@torch.no_grad()
def validation_loss(model, dataset, args, device):
    """The training objective on the validation set (the paper's Figure 1 "test loss"): losses in
    training mode, with the backbone in eval mode (no drop path), seeded RoI sampling, no gradients."""
    detector = train.unwrap(model).train()
    detector.backbone.body.eval()
    total = 0.0
    for i in range(args.rank, len(dataset), args.world):
        image, target = dataset[i]
        train.seed_everything(args.seed, "val", i)
        with train.autocast(args, device):
            losses = detector([image.to(device)], [{k: v.to(device) if torch.is_tensor(v) else v
                                                   for k, v in target.items()}])
        total += float(sum(losses.values()))
    total, count = train.all_reduce([total, len(range(args.rank, len(dataset), args.world))], device)
    detector.eval()
    return total / max(count, 1)


def draw_detections(image, out, dataset, path, score_thresh=0.5):
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keep = out["scores"] > score_thresh
    canvas = (image * 255).byte()
    if keep.any():
        canvas = draw_segmentation_masks(canvas, out["masks"][keep, 0].cpu() > 0.5, alpha=0.4)
        names = dataset.coco.loadCats([dataset.category_ids[k - 1] for k in out["labels"][keep].tolist()])
        canvas = draw_bounding_boxes(canvas, out["boxes"][keep].cpu(), [n["name"] for n in names], width=1)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)


def report(scores, args, extra=None):
    """Print the AP table and write OUTPUT/results.json (and a line of OUTPUT/log.jsonl)."""
    print(f"{'':6s}" + "".join(f"{name:>8s}" for name in STAT_NAMES))
    for kind, row in scores.items():
        print(f"{kind:6s}" + "".join(f"{row[name]:8.2f}" if row[name] is not None else f"{'n/a':>8s}"
                                     for name in STAT_NAMES))
    summary = dict(**{f"{kind}_{k}": v for kind, row in scores.items() for k, v in row.items()}, **(extra or {}))
    with open(os.path.join(args.output, "log.jsonl"), "a") as f:
        f.write(json.dumps(summary) + "\n")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(dict(summary, args=train.jsonable(args)), f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    if args.eval_results:  # no model: score an existing results file
        if not (args.ann_file or args.data_path):
            raise SystemExit("--eval-results needs the annotations: --ann-file FILE or --data-path COCO")
        ann = args.ann_file or os.path.join(args.data_path, "annotations", "instances_val2017.json")
        from pycocotools.coco import COCO
        try:
            scores = coco_evaluate(COCO(ann), load_results(args.eval_results))
        except ValueError as e:
            raise SystemExit(str(e)) from None
        args.rank, args.world = 0, 1
        report(scores, args)
        return scores

    device = train.setup_run(args)
    if args.data_path is None:
        train.prepare_demo_data(args, write_digit_coco)
    val_set = CocoInstances(args.img_dir or os.path.join(args.data_path, "val2017"),
                            args.ann_file or os.path.join(args.data_path, "annotations", "instances_val2017.json"))

    train.seed_everything(args.seed, "init")
    body = train.dense_backbone(args, args.min_size)
    model = build_detector(body, len(val_set.category_ids), args.channels, args.min_size, args.max_size,
                           args.rois_per_image, head_dims=args.head_dims, fc_dim=args.fc_dim).to(device)
    latest = os.path.join(args.output, "checkpoint.pth")
    resume = args.resume or (latest if os.path.exists(latest) else None)
    if args.eval_only:
        if not resume:
            raise SystemExit("--eval-only needs --resume CHECKPOINT")
        model.load_state_dict(torch.load(resume, map_location="cpu", weights_only=True)["model"])
        scores = evaluate(model, val_set, args, device)
        if args.is_main:
            report(scores, args)
        return scores

    train_base = CocoInstances(os.path.join(args.data_path, "train2017"),
                               os.path.join(args.data_path, "annotations", "instances_train2017.json"), flip=True)
    if args.is_main and (train_base.crowd or train_base.degenerate):
        print(f"training set: {train_base.crowd} crowd regions ignored, {train_base.degenerate} boxes without area dropped")
    if args.batch_size % args.world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the {args.world} processes")
    micro = args.batch_size // args.world
    args.iters_per_epoch = math.ceil(len(train_base) / args.batch_size)
    total = min(args.epochs * args.iters_per_epoch, args.max_iters or float("inf"))
    if args.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    detector = train.unwrap(model)
    groups = train.param_groups(detector.backbone.body, args.weight_decay, 1.0)
    rest = [p for n, p in detector.named_parameters() if not n.startswith("backbone.body.")]
    groups += [dict(params=[p for p in rest if p.ndim > 1], weight_decay=args.weight_decay, lr_scale=1.0),
               dict(params=[p for p in rest if p.ndim <= 1], weight_decay=0.0, lr_scale=1.0)]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    start = 0
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        detector.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start = ckpt["iter"]
    loader = DataLoader(TrainImages(train_base, args.seed), batch_size=micro, collate_fn=collate,
                        num_workers=args.workers, sampler=train.Draws(len(train_base), micro, args.rank, args.world,
                                                                      args.seed, start))
    batches, scores = iter(loader), {}
    bar = tqdm(range(start, total), initial=start, total=total, disable=not args.is_main, desc="train")
    for it in bar:
        model.train()
        images, targets = next(batches)
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        train.seed_everything(args.seed, "step", it, args.rank)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(it, args) * group["lr_scale"]
        with train.autocast(args, device):
            losses = model(images, targets)
        loss = sum(losses.values())
        (scaler.scale(loss) if scaler else loss).backward()
        train.optimizer_step(model, optimizer, scaler)
        done = it + 1
        if it % args.log_every == 0 or done == total:
            train.check_finite(loss.detach(), f"iteration {it}", args)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{args.lr * lr_factor(it, args):.2e}")
        if done % args.save_every == 0 or done == total:
            if args.is_main:
                train.save_checkpoint(latest, dict(model=detector.state_dict(), optimizer=optimizer.state_dict(),
                                                   iter=done, args=train.jsonable(args)))
        if done % (args.iters_per_epoch * 4) == 0 or done == total:  # evaluate every 4 epochs and at the end
            scores = evaluate(model, val_set, args, device)
            val_loss = validation_loss(model, val_set, args, device)
            if args.is_main:
                report(scores, args, dict(iter=done, epoch=done / args.iters_per_epoch, train_loss=loss.item(),
                                          val_loss=val_loss))
    if dist.is_initialized():
        dist.destroy_process_group()
    return scores


if __name__ == "__main__":
    main()
