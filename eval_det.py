"""COCO detection and instance segmentation: a Cascade Mask R-CNN on a plain pixelvit backbone (paper Table 3).

    python eval_det.py                      # a short demo on a tiny COCO-format set, CPU, 2 minutes
    torchrun --nproc_per_node 8 eval_det.py --model adv_b --patch 4 --data-path COCO --finetune imagenet.pth
    python eval_det.py --eval-only --resume runs/det_adv_b_p4/checkpoint.pth --model adv_b --patch 4 --data-path COCO
    python eval_det.py --eval-results results.json --data-path COCO   # score a results file, no model

The paper's recipe by default: AdamW lr 1e-4, weight decay 0.05, total batch 16, 12 epochs with the
lr divided by 10 at epochs 8 and 11 after a 500-iteration linear warm-up (mmdet's 1x), short side 800
and long side 1333, horizontal flips.

The detector follows mmdet's `configs/cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py` (the 1x
schedule the paper's 12 epochs are), built on torchvision's GeneralizedRCNN machinery (transform, RPN,
anchors), with what torchvision lacks written here:
  * `SimpleFeaturePyramid`: ViTDet's pyramid generalised to a stride-p backbone, strides 4..64 for any p.
  * `RoIPool`: multi-level RoIAlign with aligned=True and adaptive sampling (mmcv's RoIAlign,
    detectron2's ROIAlignV2); torchvision's MultiScaleRoIAlign hard-codes aligned=False.
  * `Anchors`, `assign_anchors`, `MMDetRPN`: mmdet's anchors (fixed strides, unrounded) and RPN
    targets (border anchors left out, low-quality matches from IoU 0.3) inside torchvision's RPN.
  * `CascadeRoIHeads`: mmdet's CascadeRoIHead: three stages at IoU 0.5 / 0.6 / 0.7, box deltas scaled by
    mmdet's target_stds (`DeltaCoder`), class-agnostic regression, re-assignment and
    re-sampling at every stage, stage loss weights 1 / 0.5 / 0.25, smooth-L1 (beta 1) box loss over the
    sampled RoIs, one mask head per stage; at test, class logits averaged over the stages, boxes from
    the last stage, masks averaged over the three mask heads.
  * `paste_mask`: detectron2's / mmdet's mask pasting (bilinear grid sampling of the 28 x 28 mask onto
    the real-valued box), one mask at a time, RLE-encoded as soon as it is pasted.
"""
import argparse
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, roi_align
from tqdm import tqdm

import demo_data
import engine
import pixelvit as pv

# ----------------------------------------------------------------------------------------------
# COCO data and evaluation


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances: (image in [0, 1], target) with boxes (x1, y1, x2, y2), contiguous labels 1..K,
    uint8 masks and the image id. Category ids with gaps map to 1..K in sorted order and back
    (`category_ids`). Crowd regions and boxes with no area are left out of the targets, and counted.
    For training (`train=True`), images without any annotation are left out, as mmdet's
    filter_empty_gt and detectron2's FILTER_EMPTY_ANNOTATIONS do, and horizontal flips are drawn."""

    def __init__(self, img_dir, ann_file, train=False):
        from pycocotools.coco import COCO
        if not os.path.isfile(ann_file) or not os.path.isdir(img_dir):
            raise SystemExit(f"expected COCO images in {img_dir} and annotations in {ann_file}")
        self.coco, self.img_dir, self.flip = COCO(ann_file), img_dir, train
        self.image_ids = sorted(self.coco.getImgIds())
        if train:
            self.image_ids = [i for i in self.image_ids if self.coco.getAnnIds(imgIds=i)]
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
        target = dict(boxes=boxes,
                      labels=torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.long),
                      masks=masks, image_id=image_id)
        if self.flip and torch.rand(()) < 0.5:
            image, target["masks"] = image.flip(-1), masks.flip(-1)
            target["boxes"] = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1],
                                           image.shape[-1] - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, target


def paste_mask(probs, box, height, width, threshold=0.5):
    """One M x M mask of probabilities pasted into a height x width image at the real-valued box
    (x1, y1, x2, y2), as detectron2's and mmdet's `_do_paste_mask` do: each pixel centre inside or
    next to the box is mapped into the mask and sampled bilinearly (zero outside), then thresholded
    (>= 0.5). Returns a Fortran-ordered uint8 array, ready for RLE encoding."""
    full = np.zeros((height, width), dtype=np.uint8, order="F")
    x1, y1, x2, y2 = box.tolist()
    if not (x2 > x1 and y2 > y1):
        return full
    left, top = max(math.floor(x1) - 1, 0), max(math.floor(y1) - 1, 0)
    right, bottom = min(math.ceil(x2) + 1, width), min(math.ceil(y2) + 1, height)
    if right <= left or bottom <= top:
        return full
    xs = (torch.arange(left, right, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
    ys = (torch.arange(top, bottom, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)     # [h, w, (x, y)]
    sampled = F.grid_sample(probs.float()[None, None], grid[None], align_corners=False)[0, 0]
    full[top:bottom, left:right] = (sampled >= threshold).numpy()
    return full


def to_coco_results(out, image_id, category_ids, image_size):
    """One image's detections in the COCO results format (the test-dev submission format): xywh
    boxes, scores, the original category ids and, when the detector gives masks, RLE-encoded masks,
    pasted one at a time so that memory does not grow with the number of detections."""
    import pycocotools.mask as mask_util
    results = []
    for k, (box, score, label) in enumerate(zip(out["boxes"], out["scores"].tolist(), out["labels"].tolist())):
        x1, y1, x2, y2 = box.tolist()
        entry = dict(image_id=int(image_id), category_id=category_ids[label - 1], score=float(score),
                     bbox=[x1, y1, x2 - x1, y2 - y1])
        if "mask_probs" in out:
            rle = mask_util.encode(paste_mask(out["mask_probs"][k], box, *image_size))
            entry["segmentation"] = dict(size=rle["size"], counts=rle["counts"].decode("ascii"))
        results.append(entry)
    return results


STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def result_kinds(results):
    """The kinds of evaluation a results list supports: "bbox" if every entry has a box, "segm" if
    every entry has a segmentation (a segm-only file is a standard COCO results format)."""
    return [kind for kind, key in (("bbox", "bbox"), ("segm", "segmentation"))
            if results and all(key in r for r in results)]


def coco_evaluate(coco_gt, results, kinds=None):
    """pycocotools' COCOeval on a list of results; {kind: {AP, AP50, AP75, APs, APm, APl}} in %.

    Each kind is scored on its own copy of the results, because `loadRes` adds fields to the dicts it
    is given. For "segm" the boxes are dropped first, as detectron2's COCOEvaluator does: `loadRes`
    otherwise takes each detection's area from its box, not its mask, and APs/m/l sort detections
    into the wrong size ranges."""
    from pycocotools.cocoeval import COCOeval
    known_images, known_categories = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    unknown_images = sorted({r["image_id"] for r in results} - known_images)
    unknown_categories = sorted({r["category_id"] for r in results} - known_categories)
    if unknown_images or unknown_categories:
        raise ValueError(f"results refer to image ids {unknown_images[:5]} and category ids {unknown_categories[:5]} "
                         f"that the annotations do not have")
    scores = {}
    for kind in kinds or result_kinds(results):
        drop = {"bbox"} if kind == "segm" else set()
        own = [{k: v for k, v in r.items() if k not in drop} for r in results]
        if not own:
            scores[kind] = dict.fromkeys(STAT_NAMES, 0.0)
            continue
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(own), kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        # pycocotools gives -1 where no object of that size exists: None (null in JSON)
        scores[kind] = {name: 100 * float(v) if v >= 0 else None for name, v in zip(STAT_NAMES, evaluator.stats[:6])}
    return scores


def load_results(path):
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, list) or any(not isinstance(r, dict)
                                            or not {"image_id", "category_id", "score"} <= set(r)
                                            for r in results):
        raise ValueError(f"{path}: expected a COCO results list of dicts with image_id, category_id, score, "
                         f"and bbox or segmentation")
    if results and not result_kinds(results):
        raise ValueError(f"{path}: expected every result to have a bbox, or every result a segmentation")
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


class RoIPool(nn.Module):
    """Multi-level RoIAlign as mmdet's SingleRoIExtractor does it: each box is pooled from level
    k = floor(log2(sqrt(area) / 56)), clamped to the levels (the FPN paper's rule, canonical box 224 at
    stride 16), by RoIAlign with aligned=True (pixel centres at +0.5) and adaptive sampling
    (sampling_ratio 0): mmcv's RoIAlign defaults, detectron2's ROIAlignV2."""

    def __init__(self, output_size, strides=(4, 8, 16, 32), finest_scale=56):
        super().__init__()
        self.output_size, self.strides, self.finest_scale = output_size, strides, finest_scale

    def forward(self, features, boxes):  # features: the pyramid's levels, boxes: one [n_i, 4] per image
        maps = list(features.values())[:len(self.strides)]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        if len(rois) == 0:
            return maps[0].new_zeros(0, maps[0].shape[1], self.output_size, self.output_size)
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).clamp(min=0).sqrt()
        level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(maps) - 1).long()
        order, pooled = [], []
        for k, (feature, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(level == k)[0]
            order.append(index)
            pooled.append(roi_align(feature.float(), rois[index], self.output_size, spatial_scale=1 / stride,
                                    sampling_ratio=0, aligned=True))
        pooled = torch.cat(pooled)
        out = torch.empty_like(pooled)
        out[torch.cat(order)] = pooled
        return out


def match(proposals, gt_boxes, gt_labels, iou_threshold):
    """Label each proposal with its best-overlapping ground truth at IoU >= threshold, else background
    (0) (mmdet's MaxIoUAssigner with pos = neg threshold). Images without objects make every proposal
    background (torchvision's Matcher would raise)."""
    if gt_boxes.numel() == 0:
        nothing = torch.zeros(len(proposals), dtype=torch.long, device=proposals.device)
        return nothing, proposals.new_zeros(len(proposals), 4), nothing
    best_iou, best = box_iou(gt_boxes, proposals).max(dim=0)
    labels = torch.where(best_iou >= iou_threshold, gt_labels[best], torch.zeros_like(best))
    return labels, gt_boxes[best], best


def box_regression_loss(deltas, targets, num_sampled):
    """mmdet's cascade box loss: smooth-L1 with beta 1.0, summed over the positives' deltas and
    divided by the number of sampled RoIs (positives and negatives)."""
    return F.smooth_l1_loss(deltas, targets, beta=1.0, reduction="sum") / max(num_sampled, 1)


def mask_targets(boxes, gt_masks, matched, size):
    """mmdet's mask_target: each positive box's ground-truth mask cropped and resized to size x size
    by RoIAlign (aligned, adaptive sampling), binarised at 0.5."""
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    return (roi_align(gt_masks[:, None].float(), rois, size, 1.0, sampling_ratio=0, aligned=True)[:, 0] >= 0.5).float()


# mmdet's cascade config, bbox_coder.target_stds per stage: deltas are divided by them (torchvision's
# BoxCoder multiplies by weights = 1 / std; the third stage's are 30.30 and 14.93, not 30 and 15).
STAGE_TARGET_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


class CascadeRoIHeads(nn.Module):
    """Three box stages of rising IoU, each refining the previous stage's boxes, each with a mask head.

    Plugs into torchvision's GeneralizedRCNN in place of its RoIHeads. Labels are 1..K, 0 is
    background. In inference each image's result holds boxes, scores, labels and `mask_probs`
    [n, M, M] (the stages' mask probabilities averaged); `paste_mask` places them in the image."""

    def __init__(self, channels, num_classes, stage_ious=(0.5, 0.6, 0.7), stage_weights=(1.0, 0.5, 0.25),
                 target_stds=STAGE_TARGET_STDS, rois_per_image=512,
                 positive_fraction=0.25, score_thresh=0.05, nms_thresh=0.5, detections_per_image=100,
                 conv_dims=(256,) * 4, fc_dim=1024, mask_dims=(256,) * 4):
        super().__init__()
        self.stage_ious, self.stage_weights = stage_ious, stage_weights
        self.coders = [DeltaCoder(tuple(1 / s for s in stds)) for stds in target_stds]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(rois_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image
        self.box_pool, self.mask_pool = RoIPool(7), RoIPool(14)
        norm = partial(nn.GroupNorm, 32)  # 4conv1fc box heads with GN (mmdet's gn-all heads)
        stages = range(len(stage_ious))
        self.box_heads = nn.ModuleList(FastRCNNConvFCHead((channels, 7, 7), list(conv_dims), [fc_dim], norm_layer=norm)
                                       for _ in stages)
        self.classifiers = nn.ModuleList(nn.Linear(fc_dim, num_classes + 1) for _ in stages)
        self.regressors = nn.ModuleList(nn.Linear(fc_dim, 4) for _ in stages)  # class-agnostic
        # mmdet's FCNMaskHead per stage: 4 x (3x3 conv + ReLU), 2x deconv, one mask per class (1..K)
        self.mask_heads = nn.ModuleList(nn.Sequential(MaskRCNNHeads(channels, list(mask_dims), 1),
                                                      MaskRCNNPredictor(mask_dims[-1], mask_dims[-1], num_classes))
                                        for _ in stages)

    def stage(self, t, features, boxes):
        """Class logits and box deltas of stage t for lists of boxes, in float32 (under bf16 autocast,
        decoding bf16 deltas would round the boxes to 8 px at 1,000 px)."""
        x = self.box_heads[t](self.box_pool(features, boxes))
        return self.classifiers[t](x).float(), self.regressors[t](x).float()

    def mask_logits(self, t, features, boxes, labels):
        """Stage t's mask logits [n, M, M] for the boxes, each for its own class."""
        logits = self.mask_heads[t](self.mask_pool(features, boxes))
        return logits[torch.arange(len(logits), device=logits.device), torch.cat(labels) - 1]

    def refine(self, t, deltas, boxes, image_shapes):
        """Stage t's boxes, decoded, clipped to the image and detached: the next stage's input."""
        decoded = self.coders[t].decode_single(deltas.detach(), torch.cat(boxes))
        return [clip_boxes_to_image(b, shape) for b, shape in zip(decoded.split([len(b) for b in boxes]), image_shapes)]

    def sample(self, t, boxes, targets):
        """Add the ground truth to the boxes, label them at stage t's IoU and draw the RoIs to train on.
        Returns per image: RoIs, labels, matched ground-truth boxes and indices, and which RoIs are the
        added ground truth."""
        is_gt = [torch.arange(len(b) + len(tgt["boxes"]), device=b.device) >= len(b) for b, tgt in zip(boxes, targets)]
        boxes = [torch.cat([b, tgt["boxes"]]) for b, tgt in zip(boxes, targets)]
        assigned = [match(b, tgt["boxes"], tgt["labels"], self.stage_ious[t]) for b, tgt in zip(boxes, targets)]
        positives, negatives = self.sampler([labels for labels, _, _ in assigned])
        keep = [torch.where(pos | neg)[0] for pos, neg in zip(positives, negatives)]
        picked = [[a[i][k] for a, k in zip(assigned, keep)] for i in range(3)]
        return [b[k] for b, k in zip(boxes, keep)], *picked, [g[k] for g, k in zip(is_gt, keep)]

    def forward(self, features, proposals, image_shapes, targets=None):
        return self.losses(features, proposals, image_shapes, targets) if self.training else \
            (self.detect(features, proposals, image_shapes), {})

    def losses(self, features, proposals, image_shapes, targets):
        losses, boxes = {}, proposals
        for t, weight in enumerate(self.stage_weights):
            boxes, labels, matched_boxes, matched, is_gt = self.sample(t, boxes, targets)
            logits, deltas = self.stage(t, features, boxes)
            labels_all, rois = torch.cat(labels), torch.cat(boxes)
            positive = labels_all > 0
            regression = self.coders[t].encode_single(torch.cat(matched_boxes)[positive], rois[positive])
            losses[f"loss_classifier_s{t}"] = weight * F.cross_entropy(logits, labels_all)
            losses[f"loss_box_reg_s{t}"] = weight * box_regression_loss(deltas[positive], regression, len(labels_all))
            losses[f"loss_mask_s{t}"] = weight * self.mask_loss(t, features, boxes, labels, matched, targets)
            # the next stage starts from this stage's refined RoIs, less the ground truth added here
            boxes = [b[~g] for b, g in zip(self.refine(t, deltas, boxes, image_shapes), is_gt)]
        return [], losses

    def mask_loss(self, t, features, boxes, labels, matched, targets):
        """Binary cross-entropy of stage t's masks on its positive RoIs, averaged over their pixels."""
        pos = [lab > 0 for lab in labels]
        pos_boxes, pos_labels = [b[p] for b, p in zip(boxes, pos)], [lab[p] for lab, p in zip(labels, pos)]
        if not any(len(lab) for lab in pos_labels):  # no positives: zero, but keep the graph for DDP
            return sum(p.sum() for p in self.mask_heads[t].parameters()) * 0
        logits = self.mask_logits(t, features, pos_boxes, pos_labels)
        target = torch.cat([mask_targets(b, tgt["masks"], m[p], logits.shape[-1])
                            for b, tgt, m, p in zip(pos_boxes, targets, matched, pos)])
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    @torch.no_grad()
    def detect(self, features, proposals, image_shapes):
        boxes, stage_logits = proposals, []
        for t in range(len(self.stage_weights)):
            logits, deltas = self.stage(t, features, boxes)
            stage_logits.append(logits.float())
            if t < len(self.stage_weights) - 1:
                boxes = self.refine(t, deltas, boxes, image_shapes)
        # mmdet's test rule: the stages' logits averaged, then softmax; boxes from the last stage
        scores = torch.stack(stage_logits).mean(0).softmax(-1)[:, 1:]
        boxes = self.refine(len(self.stage_weights) - 1, deltas, boxes, image_shapes)
        results = []
        for b, s in zip(boxes, scores.split([len(b) for b in boxes])):
            k = s.shape[1]
            b, s = b[:, None].expand(-1, k, 4).reshape(-1, 4), s.reshape(-1)
            labels = torch.arange(1, k + 1, device=s.device).repeat(len(s) // k)
            keep = torch.where(s > self.score_thresh)[0]
            keep = keep[batched_nms(b[keep], s[keep], labels[keep], self.nms_thresh)][: self.detections_per_image]
            results.append(dict(boxes=b[keep], scores=s[keep], labels=labels[keep]))
        final_boxes, final_labels = [r["boxes"] for r in results], [r["labels"] for r in results]
        probs = torch.stack([self.mask_logits(t, features, final_boxes, final_labels).float().sigmoid()
                             for t in range(len(self.stage_weights))]).mean(0)
        for r, p in zip(results, probs.split([len(b) for b in final_boxes])):
            r["mask_probs"] = p
        return results


# ----------------------------------------------------------------------------------------------
# The detector


class Anchors(nn.Module):
    """mmdet's AnchorGenerator for the RPN: at every level's grid point (x, y) = stride x (column, row)
    one anchor per ratio h / w in (0.5, 1, 2), of area (8 x stride)^2, centred on the point; float32
    corners, not rounded. The strides are fixed (4 to 64), not derived from the padded image's size
    as torchvision's AnchorGenerator does (an 800-px-high image gives 61 px at the 13-row top level)."""

    def __init__(self, strides=(4, 8, 16, 32, 64), scale=8, ratios=(0.5, 1.0, 2.0)):
        super().__init__()
        self.strides = strides
        h = torch.tensor(ratios, dtype=torch.float64).sqrt()
        w = 1 / h
        self.base = [(torch.stack([-w, -h, w, h], dim=1) * stride * scale / 2).float() for stride in strides]

    def forward(self, images, features):
        anchors = []
        for feature, stride, base in zip(features, self.strides, self.base):
            rows, cols = feature.shape[-2:]
            y, x = torch.meshgrid(torch.arange(rows, device=feature.device, dtype=torch.float32) * stride,
                                  torch.arange(cols, device=feature.device, dtype=torch.float32) * stride,
                                  indexing="ij")
            centres = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
            anchors.append((centres + base.to(feature.device)).reshape(-1, 4))   # point-major, ratio-minor
        return [torch.cat(anchors)] * len(images.image_sizes)


def assign_anchors(anchors, gt_boxes, image_size, pos_iou=0.7, neg_iou=0.3, min_pos_iou=0.3):
    """mmdet's RPN targets: 1 foreground, 0 background, -1 left out, and the matched boxes.

    Anchors crossing the image's border are left out (`allowed_border=0`); the others follow
    MaxIoUAssigner: background below IoU 0.3, foreground from 0.7, and every ground truth whose best
    IoU reaches `min_pos_iou` also takes all the anchors at that best IoU (`match_low_quality`,
    `gt_max_assign_all`; a later ground truth takes a shared anchor)."""
    h, w = image_size
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < w) & (anchors[:, 3] < h)
    labels = torch.full((len(anchors),), -1.0, device=anchors.device)
    matched = torch.zeros_like(anchors)
    if gt_boxes.numel() == 0:
        labels[inside] = 0.0
        return labels, matched
    if not inside.any():   # an image smaller than every anchor: no targets, as mmdet skips it
        return labels, matched
    iou = box_iou(gt_boxes, anchors[inside])                        # [ground truths, inside anchors]
    best_iou, best_gt = iou.max(dim=0)
    gt_index = torch.full_like(best_gt, -1)                         # -1 ignored, 0 background, k + 1
    gt_index[best_iou < neg_iou] = 0
    gt_index[best_iou >= pos_iou] = best_gt[best_iou >= pos_iou] + 1
    gt_best = iou.max(dim=1).values
    low_quality = (iou == gt_best[:, None]) & (gt_best[:, None] >= min_pos_iou)
    number = torch.arange(1, len(gt_boxes) + 1, device=anchors.device)[:, None]
    last = (low_quality * number).max(dim=0).values                 # the last ground truth taking it
    gt_index = torch.where(last > 0, last, gt_index)
    labels[inside] = torch.where(gt_index > 0, 1.0, torch.where(gt_index == 0, 0.0, -1.0))
    matched[inside] = gt_boxes[(gt_index - 1).clamp(min=0)]
    return labels, matched


class DeltaCoder(det_utils.BoxCoder):
    """mmdet's DeltaXYWHBBoxCoder decoding: the log width and height deltas are clamped to
    +-log(1000 / 16) both ways, where torchvision's BoxCoder clamps them from above only."""

    def decode_single(self, rel_codes, boxes):
        weights = rel_codes.new_tensor(self.weights).repeat(rel_codes.shape[1] // 4)
        is_size = torch.arange(rel_codes.shape[1], device=rel_codes.device) % 4 >= 2
        lowest = torch.where(is_size, -self.bbox_xform_clip * weights, torch.full_like(weights, -math.inf))
        return super().decode_single(torch.maximum(rel_codes, lowest), boxes)


class MMDetRPN(RegionProposalNetwork):
    """torchvision's RPN (proposals, sampling, losses) with mmdet's training targets (`assign_anchors`)
    and decoding (`DeltaCoder`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_coder = DeltaCoder((1.0, 1.0, 1.0, 1.0))

    def forward(self, images, features, targets=None):
        self.image_sizes = images.image_sizes   # each image's size before padding, for the border rule
        return super().forward(images, features, targets)

    def assign_targets_to_anchors(self, anchors, targets):
        pairs = [assign_anchors(a, t["boxes"], size) for a, t, size in zip(anchors, targets, self.image_sizes)]
        return [labels for labels, _ in pairs], [boxes for _, boxes in pairs]


class RPNHead32(RPNHead):
    """torchvision's RPN head with float32 outputs: its box decoding casts the anchors to the
    deltas' dtype, which under bf16 autocast would round proposals to 8 px at 1,000 px."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


def build_detector(backbone_model, num_classes, channels=256, min_size=800, max_size=1333, rois_per_image=512,
                   rpn_batch=256, head_dims=256, fc_dim=1024):
    """Cascade Mask R-CNN on a pixelvit backbone, at the paper's input size (short side 800, long 1333)."""
    backbone = PyramidBackbone(backbone_model, channels)
    rpn = MMDetRPN(Anchors(), RPNHead32(channels, 3), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                                batch_size_per_image=rpn_batch, positive_fraction=0.5,
                                pre_nms_top_n=dict(training=2000, testing=1000),
                                post_nms_top_n=dict(training=2000, testing=1000), nms_thresh=0.7)
    heads = CascadeRoIHeads(channels, num_classes, rois_per_image=rois_per_image, conv_dims=(head_dims,) * 4,
                            fc_dim=fc_dim, mask_dims=(head_dims,) * 4)
    # padded sizes must divide by 32 (the pyramid's coarsest level) and by the patch (64 for Table 3's top row)
    transform = GeneralizedRCNNTransform(min_size, max_size, pv.IMAGENET_MEAN, pv.IMAGENET_STD,
                                         size_divisible=max(32, backbone_model.patch_size))
    return GeneralizedRCNN(backbone, rpn, heads, transform)


def build(cfg, num_classes, device):
    """The detector that the settings describe, its backbone from --finetune."""
    body = engine.dense_backbone(cfg.model, cfg.patch, cfg.min_size, cfg.drop_path, cfg.finetune, cfg.grad_ckpt,
                                 cfg.compile, embed_dim=cfg.embed_dim, depth=cfg.depth, d_state=cfg.d_state,
                                 num_heads=cfg.num_heads)
    return build_detector(body, num_classes, cfg.channels, cfg.min_size, cfg.max_size, cfg.rois_per_image,
                          head_dims=cfg.head_dims, fc_dim=cfg.fc_dim).to(device)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


class TrainImages(torch.utils.data.Dataset):
    """Training samples asked for as (draw, index): the draw seeds the flip (exact resume)."""

    def __init__(self, base, seed):
        self.base, self.seed = base, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        draw, index = key
        engine.seed_host(self.seed, "flip", draw)
        return self.base[index]


def collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def to_device(targets, device):
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def detection_loss(model, batch, device):
    images, targets = batch
    return sum(model([image.to(device) for image in images], to_device(targets, device)).values())


def lr_factor(it, cfg, iters_per_epoch):
    """mmdet's 1x schedule: linear warm-up from 0.001, then x0.1 at each of --lr-steps (in epochs)."""
    warm = min(1.0, 0.001 + (1 - 0.001) * it / max(cfg.warmup_iters, 1))
    return warm * 0.1 ** sum(it >= step * iters_per_epoch for step in cfg.lr_steps)


@torch.no_grad()
def detect_and_encode(model, dataset, cfg, run):
    """This rank's share of the validation images through the detector, each image's detections
    encoded as COCO results (masks as RLE) as soon as they are made: what is held grows with the
    number of detections, not with the images' size. The ranks of a context-parallel group detect
    the same images, and one of them keeps the results."""
    detector = engine.unwrap(model).eval()
    results = []
    with_objects = [i for i, image_id in enumerate(dataset.image_ids)
                    if dataset.coco.getAnnIds(imgIds=image_id)] if cfg.visualize else []
    drawn = set(with_objects[:cfg.visualize])   # the first N images that hold objects, whichever rank has them
    for i in tqdm(range(run.replica, len(dataset), run.replicas), desc="eval", leave=False, disable=not run.is_main):
        image, target = dataset[i]
        with run.autocast():
            (out,) = detector([image.to(run.device)])
        if not run.counts_its_images:
            continue
        out = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()}
        results += to_coco_results(out, target["image_id"], dataset.category_ids, image.shape[-2:])
        if i in drawn:
            draw_detections(image, out, target, dataset,
                            os.path.join(cfg.output, "visualize", f"{target['image_id']}.png"))
    return results


def evaluate(model, dataset, cfg, run):
    """COCO box and mask AP on the validation set, every rank's detections gathered to rank 0."""
    results = detect_and_encode(model, dataset, cfg, run)
    if dist.is_initialized():
        gathered = [None] * run.world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if not run.is_main:
        return {}
    if cfg.save_predictions:
        with open(cfg.save_predictions, "w") as f:
            json.dump(results, f)
    scores = coco_evaluate(dataset.coco, results, kinds=("bbox", "segm"))
    print_scores(scores)
    return flatten(scores)


@torch.no_grad()
def validation_loss(model, dataset, cfg, run):
    """The training objective on the validation set (the paper's Figure 1 "test loss"): losses in
    training mode, with the backbone in eval mode (no drop path), seeded RoI sampling, no gradients."""
    detector = engine.unwrap(model).train()
    detector.backbone.body.eval()
    total, indices = 0.0, range(run.replica, len(dataset), run.replicas)
    for i in indices:
        image, target = dataset[i]
        engine.seed_everything(cfg.seed, "val", i)
        with run.autocast():
            total += float(sum(detector([image.to(run.device)], to_device([target], run.device)).values()))
    counted = run.counts_its_images   # a context-parallel group's images once
    total, count = engine.all_reduce([total * counted, len(indices) * counted], run.device)
    detector.eval()
    return total / max(count, 1)


def draw_detections(image, out, target, dataset, path, score_thresh=0.5):
    """One PNG: the image | its ground truth (green) | the detections scoring over 0.5 (orange), each
    object's mask, box and category name (with the score for detections)."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scale = max(1, 256 // max(image.shape[-2:]))   # small images drawn larger, so that the names stay readable
    pixels = F.interpolate((image * 255).byte()[None], scale_factor=scale, mode="nearest")[0]

    def names(labels):
        return [c["name"] for c in dataset.coco.loadCats([dataset.category_ids[k - 1] for k in labels.tolist()])]

    def panel(boxes, masks, captions, colour):
        if not len(boxes):
            return pixels
        masks = F.interpolate(masks[None].float(), scale_factor=scale, mode="nearest")[0] > 0
        canvas = draw_segmentation_masks(pixels, masks, alpha=0.45, colors=colour)
        return draw_bounding_boxes(canvas, boxes * scale, captions, colors=colour, width=max(1, scale // 2))

    keep = torch.where(out["scores"] > score_thresh)[0].tolist()
    masks = torch.from_numpy(np.stack([paste_mask(out["mask_probs"][k], out["boxes"][k], *image.shape[-2:])
                                       for k in keep])) if keep else None
    captions = [f"{name} {score:.2f}" for name, score in zip(names(out["labels"][keep]), out["scores"][keep].tolist())]
    gap = torch.full((3, pixels.shape[1], 4), 255, dtype=torch.uint8)
    panels = [pixels, gap, panel(target["boxes"], target["masks"], names(target["labels"]), "lime"), gap,
              panel(out["boxes"][keep], masks, captions, "orange")]
    Image.fromarray(torch.cat(panels, dim=2).permute(1, 2, 0).numpy()).save(path)


def flatten(scores):
    return {f"{kind}_{name}": v for kind, row in scores.items() for name, v in row.items()}


def print_scores(scores):
    print(f"{'':6s}" + "".join(f"{name:>8s}" for name in STAT_NAMES))
    for kind, row in scores.items():
        print(f"{kind:6s}" + "".join(f"{row[name]:8.2f}" if row[name] is not None else f"{'n/a':>8s}"
                                     for name in STAT_NAMES))


# The paper's recipe (Sec. 4.3: mmdet's Cascade Mask R-CNN 1x) and the CPU demo's; each typed flag wins.
PAPER = dict(model="adv_t", patch=16, drop_path=0.1, min_size=800, max_size=1333, channels=256, head_dims=256,
             fc_dim=1024, rois_per_image=512, epochs=12, lr_steps=[8, 11], batch_size=16, lr=1e-4, warmup_iters=500,
             save_every=2000)
DEMO = dict(min_size=64, max_size=64, channels=32, head_dims=32, fc_dim=128, rois_per_image=64, epochs=8,
            lr_steps=[6, 7], batch_size=4, lr=3e-4, warmup_iters=50, embed_dim=64, depth=4, d_state=16, patch=4,
            drop_path=0.0)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_dense_task_args(p)
    g = p.add_argument_group("detection")
    g.add_argument("--data-path", help="COCO folder: train2017/, val2017/, annotations/instances_{train,val}2017.json "
                                       "(default: a demo set written to --output)")
    g.add_argument("--ann-file", help="validation annotations (default: DATA/annotations/instances_val2017.json)")
    g.add_argument("--img-dir", help="validation images (default: DATA/val2017)")
    g.add_argument("--min-size", type=int, help="short side (default: the paper's 800)")
    g.add_argument("--max-size", type=int, help="long side cap (default: the paper's 1333)")
    g.add_argument("--channels", type=int, help="pyramid and RPN width (default 256)")
    g.add_argument("--head-dims", type=int, help="box and mask head convolution width (default 256)")
    g.add_argument("--fc-dim", type=int, help="box head fully connected width (default 1024)")
    g.add_argument("--rois-per-image", type=int, help="RoIs sampled per image and stage (default 512)")
    g = p.add_argument_group("schedule (the paper's recipe by default)")
    g.add_argument("--epochs", type=int, help="training epochs (default 12)")
    g.add_argument("--lr-steps", type=int, nargs="*", help="epochs where the lr drops 10x (default 8 11)")
    g.add_argument("--max-iters", type=int, help="stop after this many iterations (short runs)")
    g.add_argument("--batch-size", type=int, help="global batch (default 16)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--warmup-iters", type=int, help="linear warm-up from 0.001 x lr (default 500)")
    g.add_argument("--eval-every", type=int, default=4, help="evaluate every N epochs and at the end")
    g.add_argument("--save-every", type=int,
                   help="checkpoint every N optimiser steps (iterations), and at the end (default 2,000; 0: at the "
                        "end only)")
    engine.add_run_args(p, "run folder (default: runs/det_<model>_p<patch>)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-results", help="evaluate an existing COCO results file; no model is run")
    g.add_argument("--save-predictions", help="write the COCO results file (test-dev format) here")
    g.add_argument("--visualize", type=int, default=0,
                   help="draw image | truth | detections for the first N validation images that hold objects")
    return p


@dataclass(frozen=True)
class DetConfig(engine.DenseTaskSettings):
    """Every setting of a run (those of the shared run and backbone flags in `engine.DenseTaskSettings`),
    resolved once from the flags, the paper's recipe and the demo (`resolve`)."""
    # detection
    data_path: str | None           # None only with --eval-results and --ann-file
    demo: bool                      # data_path is the demo's, written on first use
    ann_file: str | None            # validation annotations and images
    img_dir: str | None
    min_size: int
    max_size: int
    channels: int
    head_dims: int
    fc_dim: int
    rois_per_image: int
    # schedule
    epochs: int
    lr_steps: tuple
    max_iters: int | None
    batch_size: int                 # global: world x accum_steps x micro-batch
    lr: float
    weight_decay: float
    warmup_iters: int
    eval_every: int                 # epochs
    save_every: int                 # optimiser steps
    # evaluation
    eval_results: str | None
    save_predictions: str | None
    visualize: int


def resolve(args):
    """The frozen settings of a command line: the typed flags, then (with no --data-path and no
    --eval-results) the demo's values, then the paper's recipe."""
    flags = vars(args)
    demo = flags["data_path"] is None and not flags["eval_results"]
    if demo:
        engine.refuse_model_run_without_data(flags, "eval_det.py", "the COCO folder")
    s = engine.merge_recipe(flags, DEMO if demo else {}, PAPER)
    s["output"] = s["output"] or os.path.join("runs", f"det_{s['model']}_p{s['patch']}")
    data_path = os.path.join(s["output"], "demo_data") if demo else s["data_path"]
    if data_path:
        s["ann_file"] = s["ann_file"] or os.path.join(data_path, "annotations", "instances_val2017.json")
        s["img_dir"] = s["img_dir"] or os.path.join(data_path, "val2017")
    elif not s["ann_file"]:
        engine.flag_error("eval_det.py", "--eval-results needs the annotations: --ann-file FILE or --data-path COCO")
    s.update(demo=demo, data_path=data_path, lr_steps=tuple(s["lr_steps"]))
    return engine.settings_of(DetConfig, s)


def parse_args(argv=None):
    """The frozen settings of a command line (sys.argv when None)."""
    return resolve(get_args_parser().parse_args(argv))


def score_results_file(cfg):
    """--eval-results: pycocotools on a results file (boxes, masks or both), no model."""
    from pycocotools.coco import COCO
    try:
        scores = coco_evaluate(COCO(cfg.ann_file), load_results(cfg.eval_results))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print_scores(scores)
    return engine.report(engine.Run(), cfg.output, cfg, flatten(scores), results_file=cfg.eval_results)


def main(cfg):
    os.makedirs(cfg.output, exist_ok=True)
    if cfg.eval_results:
        return score_results_file(cfg)
    run = engine.context_parallel(engine.setup(cfg.amp), cfg.context_parallel, "eval_det.py")
    if cfg.demo:
        engine.write_demo_data(run, cfg.data_path, demo_data.write_digit_coco)
    val_set = CocoInstances(cfg.img_dir, cfg.ann_file)

    # build
    engine.seed_everything(cfg.seed, "init")
    model = build(cfg, len(val_set.category_ids), run.device)
    engine.share_images(model.backbone.body, run, "eval_det.py")   # the pyramid runs on the whole map, gathered
    resume = engine.resume_path(cfg.output, cfg.resume, cfg.no_resume)
    if cfg.eval_only:
        if not resume:
            raise SystemExit("--eval-only needs weights: --resume CHECKPOINT, or a run in --output")
        engine.load_model_weights(model, resume)
        wrapped = engine.data_parallel(model, run)
        metrics = dict(evaluate(wrapped, val_set, cfg, run), val_loss=validation_loss(wrapped, val_set, cfg, run))
        metrics = engine.write_eval(run, cfg.output, cfg, dict(metrics, weights=resume))
        engine.finish()
        return metrics
    optimizer = torch.optim.AdamW(engine.backbone_and_head_groups(model, model.backbone.body, cfg.weight_decay,
                                                                  cfg.layer_decay), lr=cfg.lr)
    scaler = run.grad_scaler()
    train_set = CocoInstances(os.path.join(cfg.data_path, "train2017"),
                              os.path.join(cfg.data_path, "annotations", "instances_train2017.json"), train=True)
    if run.is_main and (train_set.crowd or train_set.degenerate):
        print(f"training set: {train_set.crowd} crowd regions ignored, {train_set.degenerate} boxes without "
              f"area dropped")
    iters_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = min(cfg.epochs * iters_per_epoch, cfg.max_iters or float("inf"))

    # resume: evaluations logged after the checkpoint run again; a fresh start drops an old log
    start = engine.load_training_state(resume, model, optimizer, scaler)["iter"] if resume else 0
    if run.is_main:
        if resume:
            print(f"resumed from {resume} at iteration {start}")
        engine.keep_log_lines(os.path.join(cfg.output, "log.jsonl"), start + 1 if resume else 0, key="iter")
    if start >= total:
        engine.finish()
        return engine.finished_results(run, cfg.output)
    run.start = start
    run.micro_batch = engine.micro_batch(cfg.batch_size, run, cfg.accum_steps)
    batches = iter(engine.draw_loader(TrainImages(train_set, cfg.seed), run.micro_batch, run, cfg.seed,
                                      start * cfg.accum_steps, cfg.workers, collate_fn=collate))
    wrapped = engine.data_parallel(model, run)

    # the loop: one optimiser step per iteration; evaluate, report and save when due
    metrics = {}
    bar = tqdm(range(start, total), initial=start, total=total, disable=not run.is_main, desc="train")
    for it in bar:
        wrapped.train()
        lr = cfg.lr * lr_factor(it, cfg, iters_per_epoch)
        engine.set_lr(optimizer, lr)
        loss = torch.zeros((), device=run.device)
        for micro in range(cfg.accum_steps):
            batch = next(batches)   # first: loading in this process (--workers 0) seeds the flips
            # drop path and RoI sampling: a function of the slice of the global batch, not of how it is split
            engine.seed_everything(cfg.seed, "step", it, micro * run.replicas + run.replica)
            with engine.gradient_sync(wrapped, micro == cfg.accum_steps - 1):
                with run.autocast():
                    micro_loss = detection_loss(wrapped, batch, run.device) / cfg.accum_steps
                engine.backward(micro_loss, scaler)
            loss += micro_loss.detach()
        engine.optimizer_step(wrapped, optimizer, scaler)
        done = it + 1
        if it % cfg.log_every == 0 or done == total:
            engine.check_finite(loss, f"iteration {it}", cfg.output)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if done % (cfg.eval_every * iters_per_epoch) == 0 or done == total:   # before the checkpoint
            train_loss = engine.all_reduce([loss.item()], run.device)[0] / run.world
            metrics = dict(evaluate(wrapped, val_set, cfg, run), val_loss=validation_loss(wrapped, val_set, cfg, run))
            metrics = engine.report(run, cfg.output, cfg, metrics, iter=done, train_loss=train_loss)
        if (cfg.save_every and done % cfg.save_every == 0) or done == total:
            engine.save_training_state(os.path.join(cfg.output, "checkpoint.pth"), run, cfg, wrapped, optimizer,
                                       scaler, iter=done)
    engine.finish()
    return metrics


if __name__ == "__main__":
    main(parse_args())
