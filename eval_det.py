"""COCO detection and instance segmentation: a Cascade Mask R-CNN on a plain pixelvit backbone (paper Table 3).

Work in progress (issue 5): the detector is complete and tested (the simple feature pyramid for any patch
size and the 3-stage cascade RoI head); the COCO data pipeline, pycocotools evaluation and the torchrun
command line follow.

The detector is torchvision's GeneralizedRCNN machinery (transform, RPN, anchors, RoIAlign, box and
mask heads, mask losses) with what torchvision lacks written here:
  * `SimpleFeaturePyramid`: ViTDet's pyramid generalised to a stride-p backbone, strides 4..64 for any p.
  * `CascadeRoIHeads`: Cai & Vasconcelos' cascade with mmdet's training rules (re-assign and re-sample
    at every stage, IoU 0.5 / 0.6 / 0.7, box-coder weights (10,10,5,5) / (20,20,10,10) / (30,30,15,15),
    class-agnostic regression, stage loss weights 1 / 0.5 / 0.25) and detectron2's test rule (class
    scores averaged over the stages' softmax outputs, boxes from the last stage), one mask head as in
    detectron2's cascade, trained on the last stage's positives.
"""
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
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

import pixelvit as pv

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
    transform = GeneralizedRCNNTransform(min_size, max_size, pv.IMAGENET_MEAN, pv.IMAGENET_STD, size_divisible=32)
    return GeneralizedRCNN(backbone, rpn, heads, transform)
