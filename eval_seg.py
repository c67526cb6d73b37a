"""ADE20k semantic segmentation: the paper's decoder-free linear head against UperNet (Table 2, Fig. 2).

    python eval_seg.py                       # a short demo on a tiny ADE-format folder, CPU, minutes
    torchrun --nproc_per_node 8 eval_seg.py --model adv_b --patch 4 --head linear \\
        --data-path ADEChallengeData2016 --finetune imagenet_ckpt.pth
    python eval_seg.py --eval-only --resume runs/seg/checkpoint.pth --model adv_b --patch 4 --data-path ADE...

The paper's recipe by default: AdamW lr 5e-5, weight decay 0.01, total batch 16, 160k iterations,
linear warm-up over 1,500 iterations from 1e-6 x lr, then polynomial (power 1) decay to 0 (mmseg's
ViT-UperNet schedule, which the paper's numbers match). mIoU, mAcc and aAcc are computed as mmseg does.
"""
import argparse
import json
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import demo_data
import engine
import pixelvit as pv
import segmentation

IGNORE = segmentation.IGNORE
ADE_CLASSES = 150


# ----------------------------------------------------------------------------------------------
# Data: the ADEChallengeData2016 layout, and mmseg's pipelines on image and mask together


class ADESegmentation(Dataset):
    """images/<split>/*.jpg with annotations/<split>/*.png holding 0 (unlabelled) .. num_classes.
    Labels are returned reduced (mmseg's reduce_zero_label): 0 -> 255 (ignored), k -> k - 1."""

    def __init__(self, root, split, num_classes=ADE_CLASSES):
        self.images_dir, self.labels_dir = (os.path.join(root, kind, split) for kind in ("images", "annotations"))
        for d in (self.images_dir, self.labels_dir):
            if not os.path.isdir(d):
                raise SystemExit(f"{root}: expected the ADEChallengeData2016 layout images/{split}/*.jpg and "
                                 f"annotations/{split}/*.png, but {d} does not exist")
        stems = lambda d: {os.path.splitext(f)[0] for f in os.listdir(d)}  # noqa: E731
        images, labels = stems(self.images_dir), stems(self.labels_dir)
        if images != labels:
            raise SystemExit(f"{root} {split}: images without annotations {sorted(images - labels)[:5]}, "
                             f"annotations without images {sorted(labels - images)[:5]}")
        self.stems = sorted(images)
        self.extension = {os.path.splitext(f)[0]: f for f in os.listdir(self.images_dir)}
        self.num_classes = num_classes
        names = os.path.join(root, "objectInfo150.txt")
        self.class_names = (read_class_names(names) if os.path.exists(names) and num_classes == ADE_CLASSES
                            else [f"class_{i}" for i in range(num_classes)])

    def __len__(self):
        return len(self.stems)

    def read(self, i):
        """(uint8 image [3, H, W], int64 reduced label [H, W], stem)."""
        stem = self.stems[i]
        image = torch.from_numpy(np.array(Image.open(os.path.join(self.images_dir, self.extension[stem]))
                                            .convert("RGB"))).permute(2, 0, 1).contiguous()
        raw = np.asarray(Image.open(os.path.join(self.labels_dir, stem + ".png")))
        if raw.ndim != 2 or raw.max() > self.num_classes:
            raise ValueError(f"{stem}.png: expected one channel of values 0..{self.num_classes}, got shape "
                             f"{raw.shape} with values up to {raw.max()}")
        label = torch.from_numpy(raw.astype(np.int64)) - 1
        label[label < 0] = IGNORE
        if image.shape[1:] != label.shape:
            raise ValueError(f"{stem}: image {tuple(image.shape[1:])} and annotation {tuple(label.shape)} "
                             "differ in size")
        return image, label, stem


def read_class_names(path):
    """Class names from ADE's objectInfo150.txt (tab-separated, the name column last)."""
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [row[-1].split(";")[0].strip() for row in rows]


def rescale_size(h, w, long_side=2048, short_side=512, ratio=1.0):
    """mmseg's keep-ratio Resize to (2048, 512) x ratio: the largest size within both bounds. The
    bounds are truncated to integers first, as mmcv's RandomResize does with its drawn ratio."""
    long_side, short_side = int(long_side * ratio), int(short_side * ratio)
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def to_uint8(x):
    """Clip to [0, 255] and truncate, as mmseg's PhotoMetricDistortion.convert does (numpy astype)."""
    return x.clamp(0, 255).to(torch.uint8)


def scale_saturation(image, factor):
    """Scale the saturation of uint8 RGB by `factor` in HSV space, clipped to 1, hue and value kept.
    In HSV a channel is c = V (1 - S f_c) with V the largest channel and f_c set by the hue, so
    scaling S moves every channel along its own line to V: c' = V - (V - c) S'/S."""
    x = image.float()
    value, low = x.amax(0), x.amin(0)
    saturation = torch.where(value > 0, (value - low) / value.clamp(min=1), torch.zeros_like(value))
    ratio = torch.where(saturation > 0, (saturation * factor).clamp(max=1) / saturation.clamp(min=1e-12),
                        torch.ones_like(saturation))
    return to_uint8((value - (value - x) * ratio).round())


def photometric_distortion(image):
    """mmseg's PhotoMetricDistortion on uint8 RGB, step by step: brightness +-32, contrast x[0.5, 1.5]
    (first or last), saturation x[0.5, 1.5] in HSV space, hue shifted by an integer in [-18, 17] of
    OpenCV's 180 steps; each with a coin flip, each ending in uint8."""
    if random.random() < 0.5:
        image = to_uint8(image.float() + random.uniform(-32, 32))
    contrast_first = random.random() < 0.5

    def contrast(x):
        return to_uint8(x.float() * random.uniform(0.5, 1.5)) if random.random() < 0.5 else x

    image = contrast(image) if contrast_first else image
    if random.random() < 0.5:
        image = scale_saturation(image, random.uniform(0.5, 1.5))
    if random.random() < 0.5:
        image = TF.adjust_hue(image, random.randint(-18, 17) / 180)
    return image if contrast_first else contrast(image)


def random_crop(image, label, size, cat_max_ratio=0.75, tries=10):
    """mmseg's RandomCrop: a random size x size crop (smaller where the image is), redrawn up to 10
    times while its largest class covers 75 % or more of its labelled pixels; after 10 failed checks
    the 11th draw is taken unchecked."""
    h, w = label.shape

    def draw():
        top, left = random.randint(0, max(h - size, 0)), random.randint(0, max(w - size, 0))
        return slice(top, top + size), slice(left, left + size)

    rows, cols = draw()
    for _ in range(tries):
        crop = label[rows, cols]
        counts = torch.bincount(crop[crop != IGNORE].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        rows, cols = draw()
    return image[:, rows, cols], label[rows, cols]


def train_pipeline(image, label, crop, short_side=512, photometric=True):
    """mmseg's ADE20k training pipeline: random resize x[0.5, 2] of (2048, short_side), a cat-max-ratio
    crop, a flip and photometric distortion, on image (bilinear) and mask (nearest) together; then, as
    mmseg's data preprocessor does, normalisation and padding to crop x crop at the bottom and right
    with 0 (the mean colour, after normalisation) and the ignore label."""
    size = rescale_size(*label.shape, long_side=4 * short_side, short_side=short_side, ratio=random.uniform(0.5, 2.0))
    image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    label = TF.resize(label[None], list(size), interpolation=TF.InterpolationMode.NEAREST)[0]
    image, label = random_crop(image, label, crop)
    if random.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    if photometric:
        image = photometric_distortion(image)
    pad = [0, crop - label.shape[1], 0, crop - label.shape[0]]
    return F.pad(normalize(image), pad, value=0.0), F.pad(label, pad, value=IGNORE)


def normalize(image):
    mean = torch.tensor(pv.IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(pv.IMAGENET_STD).view(3, 1, 1) * 255
    return (image.float() - mean) / std


class TrainCrops(Dataset):
    """Training crops, asked for as (draw, index): the draw seeds the augmentation (as in train.py)."""

    def __init__(self, base, crop, short_side, seed):
        self.base, self.crop, self.short_side, self.seed = base, crop, short_side, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        draw, index = key
        image, label, _ = self.base.read(index)
        engine.seed_host(self.seed, "crop", draw)
        return train_pipeline(image, label, self.crop, self.short_side)


@torch.no_grad()
def evaluate(model, dataset, cfg, run, save_dir=None, visualize=0):
    """mIoU / mAcc / aAcc and the validation loss over the whole set (each data-parallel rank a strided
    share; the ranks of a context-parallel group evaluate the same images, and one of them counts)."""
    model.eval()
    segmenter, device = engine.unwrap(model), run.device
    if dist.is_initialized():  # BatchNorm statistics drift apart per rank without SyncBN: use rank 0's,
        for buffer in segmenter.buffers():  # which are also the ones the checkpoint keeps
            dist.broadcast(buffer, 0)
    metric = segmentation.SegMetric(dataset.num_classes, device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # summed CE, labelled pixels
    indices = range(run.replica, len(dataset), run.replicas)
    for i in tqdm(indices, desc="eval", leave=False, disable=not run.is_main):
        image, label, stem = dataset.read(i)
        resized = TF.resize(image, list(rescale_size(*label.shape, long_side=4 * cfg.crop, short_side=cfg.crop)),
                            interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        x = normalize(resized)[None].to(device)
        with run.autocast():
            logits = (segmentation.predict_slide(segmenter, x, cfg.patch, cfg.crop, cfg.stride) if cfg.mode == "slide"
                      else segmentation.predict_whole(segmenter, x, cfg.patch)).float()
        if not run.counts_its_images:
            continue
        logits = F.interpolate(logits, label.shape, mode="bilinear", align_corners=False)
        label = label.to(device)
        pred = logits.argmax(1)[0]
        metric.update(pred, label)
        loss_sum += torch.stack([F.cross_entropy(logits, label[None], ignore_index=IGNORE, reduction="sum"),
                                 (label != IGNORE).sum()]).double()
        if save_dir:  # the ADE20k benchmark's format: uint8 PNG of class + 1
            Image.fromarray((pred + 1).byte().cpu().numpy()).save(os.path.join(save_dir, stem + ".png"))
        if i < visualize:
            save_overlay(image, label.cpu(), pred.cpu(), os.path.join(cfg.output, "visualize", stem + ".png"))
    metric.reduce()
    loss, pixels = engine.all_reduce(loss_sum.tolist(), device)
    return dict(**metric.compute(), val_loss=loss / max(pixels, 1), val_images=len(dataset))


def palette(seed=0):
    """A fixed random colour for every label value 0..255; the ignore label is black."""
    colors = np.random.default_rng(seed).integers(0, 255, (256, 3), dtype=np.uint8)
    colors[IGNORE] = 0
    return colors


def save_overlay(image, label, pred, path):
    """image | ground truth | prediction, labels blended over the image."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    colors = palette()
    panels = [rgb] + [0.5 * rgb + 0.5 * colors[x.numpy().clip(0, 255)] for x in (label, pred)]
    Image.fromarray(np.concatenate(panels, 1).astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------------------------


# The paper's recipe (Sec. 4.2: mmseg's ViT-UperNet schedule) and the CPU demo's; each typed flag wins.
PAPER = dict(model="adv_t", patch=16, drop_path=0.1, num_classes=ADE_CLASSES, crop=512, stride=341, iters=160_000,
             batch_size=16, lr=5e-5, weight_decay=0.01, layer_decay=1.0, aux_weight=0.4, warmup_iters=1500,
             eval_every=16_000, save_every=2_000)
DEMO = dict(crop=64, stride=43, iters=400, batch_size=8, lr=1e-3, warmup_iters=40, eval_every=400, embed_dim=64,
            depth=4, d_state=16, num_classes=5, patch=4, drop_path=0.0)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine.add_dense_task_args(p)
    g = p.add_argument_group("segmentation")
    g.add_argument("--head", choices=["linear", "upernet"], default="linear",
                   help="the paper's decoder-free linear head, or UperNet with an auxiliary FCN")
    g.add_argument("--upernet-channels", type=int, help=f"UperNet width (default: {segmentation.UPERNET_CHANNELS} by "
                                                        f"backbone width, else 256)")
    g.add_argument("--data-path", help="ADEChallengeData2016 folder (default: a demo folder written to --output)")
    g.add_argument("--num-classes", type=int, help="classes in the annotations (default: ADE20k's 150)")
    g.add_argument("--crop", type=int, help="training crop and test short side (default: mmseg's 512)")
    g.add_argument("--mode", choices=["slide", "whole"], default="slide", help="test-time inference")
    g.add_argument("--stride", type=int, help="sliding-window stride (default: BEiT's and Vim's 341)")
    g = p.add_argument_group("schedule (the paper's recipe by default)")
    g.add_argument("--iters", type=int, help="training iterations (optimiser steps; default 160,000)")
    g.add_argument("--batch-size", type=int, help="global batch (default 16)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 5e-5)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    g.add_argument("--warmup-iters", type=int, help="linear warm-up from 1e-6 x lr (default 1,500)")
    g.add_argument("--aux-weight", type=float, help="UperNet's auxiliary FCN loss weight (default 0.4)")
    g.add_argument("--eval-every", type=int,
                   help="evaluate every N optimiser steps (iterations), and at the end (default 16,000; 0: at the end "
                        "only)")
    g.add_argument("--save-every", type=int,
                   help="checkpoint every N optimiser steps (iterations), and at the end (default 2,000; 0: at the "
                        "end only)")
    engine.add_run_args(p, "run folder (default: runs/seg_<model>_p<patch>_<head>)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--save-predictions", help="write one PNG label map per validation image here")
    g.add_argument("--visualize", type=int, default=0, help="write N image | truth | prediction overlays")
    return p


@dataclass(frozen=True)
class SegConfig(engine.DenseTaskSettings):
    """Every setting of a run (those of the shared run and backbone flags in `engine.DenseTaskSettings`),
    resolved once from the flags, the paper's recipe and the demo (`resolve`)."""
    # segmentation
    head: str
    upernet_channels: int | None
    data_path: str
    demo: bool                      # data_path is the demo's, written on first use
    num_classes: int
    crop: int
    mode: str
    stride: int
    # schedule
    iters: int
    batch_size: int                 # global: world x accum_steps x micro-batch
    lr: float
    weight_decay: float
    warmup_iters: int
    aux_weight: float
    eval_every: int                 # optimiser steps; 0: at the end only
    save_every: int
    # evaluation
    save_predictions: str | None
    visualize: int


def resolve(args):
    """The frozen settings of a command line: the typed flags, then (with no --data-path) the demo's
    values, then the paper's recipe."""
    flags = vars(args)
    demo = flags["data_path"] is None
    if demo:
        engine.refuse_model_run_without_data(flags, "eval_seg.py", "the ADEChallengeData2016 folder")
    s = engine.merge_recipe(flags, DEMO if demo else {}, PAPER)
    if s["crop"] % s["patch"]:
        engine.flag_error("eval_seg.py", f"--crop {s['crop']} must be a multiple of --patch {s['patch']}")
    reference = engine.merge_recipe(vars(get_args_parser().parse_args([])), DEMO if demo else {}, PAPER)
    s["output"] = s["output"] or engine.run_folder(f"seg_{s['model']}_p{s['patch']}_{s['head']}",
                                                   {k: s[k] for k in flags}, reference,
                                                   named=("model", "patch", "head"))
    s.update(demo=demo, data_path=os.path.join(s["output"], "demo_data") if demo else s["data_path"])
    return engine.settings_of(SegConfig, s)


def parse_args(argv=None):
    """The frozen settings of a command line (sys.argv when None)."""
    return resolve(get_args_parser().parse_args(argv))


def lr_at(it, cfg):
    """Linear warm-up from 1e-6 x lr, then polynomial (power 1) decay to 0 at --iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (1e-6 + (1 - 1e-6) * it / cfg.warmup_iters)
    return cfg.lr * (1 - (it - cfg.warmup_iters) / max(1, cfg.iters - cfg.warmup_iters))


def build(cfg, run):
    backbone = engine.dense_backbone(cfg.model, cfg.patch, cfg.crop, cfg.drop_path, cfg.finetune, cfg.grad_ckpt,
                                     cfg.compile, embed_dim=cfg.embed_dim, depth=cfg.depth, d_state=cfg.d_state,
                                     num_heads=cfg.num_heads)
    engine.share_images(backbone, run, "eval_seg.py")   # the heads run on the whole map, gathered
    model = segmentation.Segmenter(backbone, cfg.head, cfg.num_classes, cfg.upernet_channels).to(run.device)
    if run.world > 1 and run.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def segmentation_loss(model, batch, aux_weight):
    images, labels = (t.to(next(model.parameters()).device, non_blocking=True) for t in batch)
    logits, aux = model(images)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    if aux is not None:
        loss = loss + aux_weight * F.cross_entropy(aux.float(), labels, ignore_index=IGNORE)
    return loss


def print_top_classes(metrics, class_names, count=10):
    table = sorted(zip(class_names, metrics["per_class_iou"]), key=lambda t: -np.nan_to_num(t[1]))
    print("\n".join(f"  {name:24s} {iou:6.2f}" for name, iou in table[:count] if not math.isnan(iou)))
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}))


def validate(model, val_set, cfg, run):
    """evaluate, with the class names and head size that the notebooks read, and the best classes printed."""
    metrics = evaluate(model, val_set, cfg, run, cfg.save_predictions, cfg.visualize)
    metrics.update(class_names=val_set.class_names, head_params=engine.unwrap(model).head_parameters())
    if run.is_main:
        print_top_classes(metrics, val_set.class_names)
    return metrics


def main(cfg):
    engine.check_same_run("eval_seg.py", cfg)   # before anything in the run folder changes
    run = engine.context_parallel(engine.setup(cfg.amp), cfg.context_parallel, "eval_seg.py")
    os.makedirs(cfg.output, exist_ok=True)
    if cfg.demo:
        engine.write_demo_data(run, cfg.data_path, demo_data.write_digit_scenes)
    if cfg.save_predictions:
        os.makedirs(cfg.save_predictions, exist_ok=True)
    val_set = ADESegmentation(cfg.data_path, "validation", cfg.num_classes)

    # build
    engine.seed_everything(cfg.seed, "init")
    model = build(cfg, run)
    if run.is_main:
        print(f"{cfg.model} patch {cfg.patch} + {cfg.head} head: {model.head_parameters() / 1e6:.3f} M head "
              f"parameters, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M in all")
    resume = engine.resume_path(cfg.output, cfg.resume, cfg.no_resume)
    if cfg.eval_only:
        if not resume:
            raise SystemExit("--eval-only needs weights: --resume CHECKPOINT, or a run in --output")
        engine.load_model_weights(model, resume, "eval_seg.py", model.backbone)
        metrics = engine.write_eval(run, cfg.output, cfg, dict(validate(engine.data_parallel(model, run), val_set,
                                                                         cfg, run), weights=resume))
        engine.finish()
        return metrics
    optimizer = torch.optim.AdamW(engine.backbone_and_head_groups(model, model.backbone, cfg.weight_decay,
                                                                  cfg.layer_decay), lr=cfg.lr)
    scaler = run.grad_scaler()

    # resume: evaluations logged after the checkpoint run again; a fresh start drops an old log
    state = engine.load_training_state(resume, model, optimizer, scaler) if resume else {}
    start = state.get("iter", 0)
    # train_loss in the log is the mean over the iterations since the previous evaluation; its running
    # sum is in the checkpoint, so that a resumed run logs what an uninterrupted one does
    interval_loss = torch.tensor(state.get("interval_loss", 0.0), dtype=torch.float64, device=run.device)
    interval_iters = state.get("interval_iters", 0)
    if run.is_main:
        if resume:
            print(f"resumed from {resume} at iteration {start}")
        engine.keep_log_lines(os.path.join(cfg.output, "log.jsonl"), start + 1 if resume else 0, key="iter")
    if start >= cfg.iters:
        engine.finish()
        return engine.finished_results(run, cfg.output)
    run.start = start
    run.micro_batch = engine.micro_batch(cfg.batch_size, run, cfg.accum_steps)
    train_set = TrainCrops(ADESegmentation(cfg.data_path, "training", cfg.num_classes), cfg.crop, cfg.crop, cfg.seed)
    batches = iter(engine.draw_loader(train_set, run.micro_batch, run, cfg.seed, start * cfg.accum_steps, cfg.workers))
    wrapped = engine.data_parallel(model, run)

    # the loop: one optimiser step per iteration; evaluate, report and save when due
    metrics = {}
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not run.is_main, desc="train")
    for it in bar:
        wrapped.train()
        engine.set_lr(optimizer, lr_at(it, cfg))
        loss = torch.zeros((), device=run.device)
        for micro in range(cfg.accum_steps):
            batch = next(batches)   # first: loading in this process (--workers 0) seeds the augmentation
            # drop path: a function of the slice of the global batch, not of how it is split
            engine.seed_everything(cfg.seed, "step", it, micro * run.replicas + run.replica)
            with engine.gradient_sync(wrapped, micro == cfg.accum_steps - 1):
                with run.autocast():
                    micro_loss = segmentation_loss(wrapped, batch, cfg.aux_weight) / cfg.accum_steps
                engine.backward(micro_loss, scaler)
            loss += micro_loss.detach()
        engine.optimizer_step(wrapped, optimizer, scaler)
        done = it + 1
        interval_loss += loss.double()
        interval_iters += 1
        if it % cfg.log_every == 0 or done == cfg.iters:
            engine.check_finite(loss, f"iteration {it}", cfg.output)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(it, cfg):.2e}")
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iters:   # before the checkpoint
            train_loss = engine.all_reduce([interval_loss.item()], run.device)[0] / run.world / interval_iters
            interval_loss.zero_()
            interval_iters = 0
            metrics = engine.report(run, cfg.output, cfg, validate(wrapped, val_set, cfg, run), iter=done,
                                    train_loss=train_loss)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.iters:
            engine.save_training_state(os.path.join(cfg.output, "checkpoint.pth"), run, cfg, wrapped, optimizer,
                                       scaler, iter=done, interval_loss=interval_loss.item(),
                                       interval_iters=interval_iters)
    if run.is_main:
        print(f"done: mIoU {metrics.get('mIoU', float('nan')):.2f} -> {cfg.output}")
    engine.finish()
    return metrics


if __name__ == "__main__":
    main(parse_args())
