"""The segmentation models of eval_seg.py, importable without its flags: the paper's decoder-free linear
head on a pixelvit backbone (`pixelvit.DecoderFreeHead`) or UperNet with its auxiliary FCN head, mmseg's
metrics (IoUMetric), and its whole-image and sliding-window inference."""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import pixelvit as pv

IGNORE = 255   # the label of pixels that no loss or metric counts (mmseg's ignore_index)

# ----------------------------------------------------------------------------------------------
# Heads


def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UperNetHead(nn.Module):
    """UPerNet (Xiao et al. 2018) as mmseg's UPerHead: a pyramid pooling module (scales 1, 2, 3, 6) on
    the deepest map, a top-down FPN over all four, fused at the finest level."""

    def __init__(self, in_dim, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_dim, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_dim + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(in_dim, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, maps):  # four maps at strides 4, 8, 16, 32
        top = maps[3]
        pooled = [F.interpolate(p(top), top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        levels = [lat(m) for lat, m in zip(self.laterals, maps[:3])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in (2, 1, 0):  # top-down: add the upsampled coarser level
            levels[i] = levels[i] + F.interpolate(levels[i + 1], levels[i].shape[-2:], mode="bilinear",
                                                  align_corners=False)
        levels = [conv(level) for conv, level in zip(self.fpn_convs, levels[:3])] + [levels[3]]
        fused = torch.cat([levels[0]] + [F.interpolate(level, levels[0].shape[-2:], mode="bilinear",
                                                       align_corners=False)
                                         for level in levels[1:]], 1)
        return self.classifier(self.fpn_bottleneck(fused))


class FCNHead(nn.Module):
    """mmseg's auxiliary FCN head (one 3x3 conv, 256 channels), trained with weight 0.4."""

    def __init__(self, in_dim, num_classes, channels=256):
        super().__init__()
        self.layers = nn.Sequential(conv_bn_relu(in_dim, channels, 3), nn.Dropout2d(0.1),
                                    nn.Conv2d(channels, num_classes, 1))

    def forward(self, x):
        return self.layers(x)


def to_strides(maps, patch, strides=(4, 8, 16, 32)):
    """Rescale stride-p maps to strides 4/8/16/32 without parameters: bilinear up where p > s,
    max-pooling down where p < s, so one head serves every patch size."""
    out = []
    for m, s in zip(maps, strides):
        if patch > s:
            m = F.interpolate(m, scale_factor=patch // s, mode="bilinear", align_corners=False)
        elif patch < s:
            m = F.max_pool2d(m, s // patch)
        out.append(m)
    return out


# UperNet widths that make the head (with its auxiliary FCN) the size the paper reports:
# 5.10 M for Adventurer-T (Table 2: 17 - 12 M) and 13.61 M for Adventurer-B (Fig. 2: 13 M).
UPERNET_CHANNELS = {256: 192, 768: 288}


class Segmenter(nn.Module):
    """A pixelvit backbone with the decoder-free linear head or UperNet (+ auxiliary FCN)."""

    def __init__(self, backbone, head, num_classes, upernet_channels=None):
        super().__init__()
        self.backbone, self.head_kind = backbone, head
        d, depth = backbone.embed_dim, len(backbone.blocks)
        if head == "linear":
            self.head = pv.DecoderFreeHead(d, num_classes)
        else:
            self.taps = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]  # (2, 5, 8, 11) at 12
            self.head = UperNetHead(d, upernet_channels or UPERNET_CHANNELS.get(d, 256), num_classes)
            self.aux_head = FCNHead(d, num_classes)

    def forward(self, images):
        """Logits at the input size, and the auxiliary logits (UperNet, training only) or None."""
        size = images.shape[-2:]
        if self.head_kind == "linear":
            return self.head(self.backbone.forward_dense(images), size), None
        maps = self.backbone.forward_dense(images, layers=self.taps)
        # the deepest tap through the backbone's final norm, as mmseg's ViT does (final_norm=True)
        maps[-1] = self.backbone.final_norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        maps = to_strides(maps, self.backbone.patch_size)
        up = lambda x: F.interpolate(x, size, mode="bilinear", align_corners=False)  # noqa: E731
        return up(self.head(maps)), (up(self.aux_head(maps[2])) if self.training else None)

    def head_parameters(self):
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("backbone."))


# ----------------------------------------------------------------------------------------------
# Metrics (mmseg's IoUMetric)


class SegMetric:
    """Sums per-class intersection, union, prediction and label areas over the whole set; IoU and
    accuracy per class are ratios of the sums. Classes with no union are left out of the means."""

    def __init__(self, num_classes, device="cpu"):
        self.num_classes = num_classes
        self.areas = torch.zeros(4, num_classes, dtype=torch.float64, device=device)  # I, U, pred, label

    def update(self, pred, label):
        keep = label != IGNORE
        pred, label = pred[keep], label[keep]
        bins = lambda x: torch.bincount(x, minlength=self.num_classes)[: self.num_classes].double()  # noqa: E731
        inter, area_pred, area_label = bins(pred[pred == label]), bins(pred), bins(label)
        self.areas += torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])

    def reduce(self):
        if dist.is_initialized():
            dist.all_reduce(self.areas)

    def compute(self):
        inter, union, _, label = self.areas
        iou, acc = inter / union, inter / label  # 0/0 = nan: absent classes drop out of the nanmeans
        return dict(mIoU=100 * iou.nanmean().item(), mAcc=100 * acc.nanmean().item(),
                    aAcc=100 * (inter.sum() / label.sum()).item(), per_class_iou=(100 * iou).tolist())


# ----------------------------------------------------------------------------------------------
# Inference


def pad_to(x, multiple, value=0):
    h, w = x.shape[-2:]
    return F.pad(x, [0, -w % multiple, 0, -h % multiple], value=value)


def predict_whole(model, image, patch):
    h, w = image.shape[-2:]
    return model(pad_to(image, patch))[0][..., :h, :w]


def predict_slide(model, image, patch, crop=512, stride=341):
    """mmseg's sliding-window inference: overlapping crops, logits averaged where they overlap."""
    _, _, h, w = image.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    total, count = None, torch.zeros(1, 1, h, w, device=image.device)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits = predict_whole(model, image[..., y1:y2, x1:x2], patch)
            if total is None:
                total = image.new_zeros(image.shape[0], logits.shape[1], h, w)
            total[..., y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return total / count
