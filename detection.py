"""Cascade Mask R-CNN on a plain pixelvit backbone (paper Table 3), and COCO scoring: the model code of
eval_det.py, importable without its flags.

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
  * `to_coco_results`, `coco_evaluate`: detections as COCO results files, scored by pycocotools.
"""
import json
import math
from collections import OrderedDict
from functools import partial

import numpy as np
import torch
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

import pixelvit as pv

# ----------------------------------------------------------------------------------------------
# COCO results and scoring


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
