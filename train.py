"""ImageNet classification with the paper's recipes, on one CPU or many GPUs.

    python train.py                                   # a small demo on a bundled dataset, CPU, minutes
    torchrun --nproc_per_node 8 train.py --model adv_b --patch 1 --res 224 --data-path /imagenet
    python train.py --eval-only --resume adventurer_base_patch1_224.pth --model adv_b --patch 1 --data-path /imagenet
    python train.py --benchmark --model adv_b --patch 4 --res 224 --batch-size 64

`--stage pretrain|intermediate|finetune` picks the paper's Adventurer recipes (Tables 8, 10, 9) and
`--recipe deit` the DeiT one; every value has its own flag. `--batch-size` is the GLOBAL batch, as in
the paper's tables: each of the world x accum-steps micro-batches is batch-size / (world x accum).

Every random draw is a function of (seed, epoch, step) or (seed, epoch, rank, draw), never of the
history of the run: a run killed at any moment and resumed from its last checkpoint ends with the same
weights as one that never stopped.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import datasets, transforms
from tqdm import tqdm

import demo_data
import engine
import pixelvit as pv

# ----------------------------------------------------------------------------------------------
# Recipes. Adventurer: the paper's Tables 8 (pretrain, 128 px), 10 (intermediate, 224 px) and 9
# (finetune), one column for Tiny/Small/Base and one for Large/Huge. Where the paper's marks were
# lost or it is silent, the official Patch_Scaling README commands decide (noted per entry).

COMMON = dict(  # the official main.py defaults the recipes start from
    opt_betas=(0.9, 0.999), min_lr=1e-5, warmup_lr=1e-6, clip_grad=None, layer_decay=1.0,
    smoothing=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", three_augment=False,
    repeated_aug=True, reprob=0.25, scale_min=0.08, hflip=0.5, color_jitter=0.3, ema=False, eval_crop_ratio=0.875,
    unscale_lr=False)

RECIPES = {
    # Table 8. The official stage-1 command: ThreeAugment (RandAugment off), no label smoothing,
    # no random erasing, repeated augmentation on.
    "pretrain": dict(
        res=128, epochs=300, batch_size=1024, lr=5e-4, weight_decay=0.05, warmup_epochs=5,
        drop_path=0.1, smoothing=0.0, three_augment=True, reprob=0.0,
        large=dict(lr=2e-4, weight_decay=0.3, epochs=200, opt_betas=(0.9, 0.95), batch_size=4096,
                   warmup_epochs=20, drop_path=0.2)),
    # Table 10, initialised from the 128 px pretrain. Layer decay 0.9 is the paper's; the official
    # README commands left it at 1.0 (pass --layer-decay 1.0 to reproduce the released runs).
    "intermediate": dict(
        res=224, epochs=100, batch_size=1024, lr=5e-4, weight_decay=0.05, warmup_epochs=5,
        drop_path={"adv_t": 0.2, "adv_s": 0.2, "adv_b": 0.4}, layer_decay=0.9, smoothing=0.0,
        three_augment=True, reprob=0.0,
        large=dict(lr=8e-4, weight_decay=0.3, epochs=50, opt_betas=(0.9, 0.95), batch_size=4096,
                   warmup_epochs=20, drop_path=0.4)),
    # Table 9. RandAugment and smoothing 0.1, no repeated augmentation or erasing (official stage 3).
    # The official command sets --lr 1e-5 equal to its --min-lr, so its "cosine" stays flat at
    # 1e-5; here it decays to 1e-6 (pass --min-lr 1e-5 for the flat schedule).
    "finetune": dict(
        res=224, epochs=20, batch_size=512, lr=1e-5, min_lr=1e-6, weight_decay=0.1, warmup_epochs=5,
        drop_path={"adv_t": 0.4, "adv_s": 0.4, "adv_b": 0.6}, layer_decay=0.95, repeated_aug=False,
        reprob=0.0, eval_crop_ratio=1.0,
        large=dict(lr=2e-5, epochs=50, opt_betas=(0.9, 0.95), drop_path=0.6)),
    # DeiT (Touvron et al. 2021) as the paper's Sec. 4.1 states it: 300 epochs, AdamW, batch 1024,
    # lr 1e-3 (5e-4 x 1024/512), weight decay 0.05; the rest are DeiT's defaults.
    "deit": dict(res=224, epochs=300, batch_size=1024, lr=5e-4, weight_decay=0.05, warmup_epochs=5,
                 drop_path=0.1, ema=True),
    # The embedded demo: 8x8 handwritten digits bundled with scikit-learn, upsampled to 16 px.
    # Small images want light augmentation: no RandAugment, mixup, erasing, flips or colour jitter.
    "demo": dict(res=16, epochs=25, batch_size=64, lr=2e-3, unscale_lr=True, weight_decay=0.05,
                 warmup_epochs=3, drop_path=0.0, mixup=0.0, cutmix=0.0, aa=None, reprob=0.0,
                 repeated_aug=False, scale_min=0.6, hflip=0.0, color_jitter=0.0, eval_crop_ratio=1.0),
}
LARGE_MODELS = ("adv_l", "adv_h", "deit_l", "deit_h")
DEMO_MODEL = dict(model="adv_t", patch=2, embed_dim=64, depth=4, d_state=16)


def recipe(name, model):
    """The hyper-parameters of a named recipe for a model, with the size column resolved."""
    r = {**COMMON, **RECIPES[name]}
    if model in LARGE_MODELS:
        r.update(r["large"])
    r.pop("large", None)
    if isinstance(r["drop_path"], dict):  # per-size values; sizes the paper leaves out get Small's
        r["drop_path"] = r["drop_path"].get(model, r["drop_path"]["adv_s"])
    return r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help=f"one of {pv.list_models()} (default: the demo's adv_t)")
    p.add_argument("--patch", type=int, help="patch size, 16 down to 1 (default 16)")
    p.add_argument("--res", type=int, help="input size (default: the recipe's)")
    p.add_argument("--extend", type=int, default=1, help="Table 5: interpolate the token grid k x per axis")
    p.add_argument("--flip-schedule", default="official", choices=sorted(pv.FLIP_SCHEDULES),
                   help="Adventurer blocks that flip the token order (official: the released checkpoints')")
    p.add_argument("--embed-dim", type=int, help="override the model width (small custom models)")
    p.add_argument("--depth", type=int, help="override the number of blocks")
    p.add_argument("--num-heads", type=int, help="override DeiT's attention heads")
    p.add_argument("--d-state", type=int, help="override Adventurer's SSM state size")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", help="ImageNet-style folder with train/<class>/* and val/<class>/*")
    g.add_argument("--data", choices=["folder", "digits", "cifar10", "cifar100", "fashion-mnist"],
                   help="default: folder with --data-path; with no data flag and no model flag, the "
                        "demo's bundled digits")
    g.add_argument("--data-root", default="data", help="where --data cifar10/... lives")
    g.add_argument("--download", action="store_true", help="let torchvision download --data")
    g = p.add_argument_group("recipe (each flag overrides the recipe's value)")
    g.add_argument("--stage", choices=["pretrain", "intermediate", "finetune"],
                   help="the paper's Adventurer recipes: Tables 8, 10 and 9")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="a named recipe (default: by --stage and model)")
    for name, kind, text in [
            ("epochs", int, "training epochs"), ("batch-size", int, "global batch"),
            ("lr", float, "base lr, scaled by batch / 512 unless --unscale-lr"), ("min-lr", float, "cosine floor"),
            ("warmup-lr", float, "lr at the start of warm-up"), ("weight-decay", float, "AdamW weight decay"),
            ("warmup-epochs", float, "linear warm-up length"), ("drop-path", float, "stochastic depth"),
            ("layer-decay", float, "lr x decay^(depth + 1 - layer)"), ("smoothing", float, "label smoothing"),
            ("mixup", float, "mixup alpha (0: off)"), ("cutmix", float, "cutmix alpha (0: off)"),
            ("reprob", float, "random erasing probability"), ("clip-grad", float, "gradient norm clip"),
            ("scale-min", float, "RandomResizedCrop's smallest area"), ("hflip", float, "flip probability"),
            ("color-jitter", float,
             "brightness, contrast and saturation jitter (0: off; with --aa, timm leaves it out)"),
            ("eval-crop-ratio", float, "evaluation centre crop / resize ratio")]:
        g.add_argument(f"--{name}", type=kind, help=text)
    g.add_argument("--aa", help="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1, or 'none'")
    g.add_argument("--opt-betas", type=float, nargs=2, help="AdamW betas")
    g.add_argument("--three-augment", action=argparse.BooleanOptionalAction, help="DeiT III's ThreeAugment")
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, help="each image 3x per epoch")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, help="keep and evaluate an EMA of the weights")
    g.add_argument("--unscale-lr", action=argparse.BooleanOptionalAction, help="use --lr as it is")
    g.add_argument("--ema-decay", type=float, default=0.99996, help="EMA decay per step")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimiser step")
    g = engine.add_run_args(p, "run folder (default: runs/<model>_p<patch>_<res>_<recipe>)")
    g.add_argument("--finetune", help="initialise from these weights (resampled across res/patch)")
    g.add_argument("--eval-only", "--eval", action="store_true",
                   help="evaluate --resume's weights (else --finetune's, else the run folder's), no training")
    g.add_argument("--fsdp", action="store_true", help="shard parameters (FSDP2) for Large/Huge")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N optimiser steps, besides the end of every epoch (0: epoch ends only)")
    g.add_argument("--benchmark", action="store_true", help="time training steps on synthetic input")
    g.add_argument("--benchmark-steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    args = p.parse_args(argv)

    if args.data is None and not args.data_path and not args.benchmark:
        engine.refuse_model_run_without_data(p, argv, "train.py",
                                             "an ImageNet-style folder, or --data for a bundled set")
    if args.data is None:
        args.data = "folder" if args.data_path else "digits"
    demo = args.data == "digits" and not args.model
    for key, value in DEMO_MODEL.items():
        if demo and getattr(args, key) is None:
            setattr(args, key, value)
    args.model = args.model or "adv_t"
    if args.benchmark and args.batch_size is None:
        args.batch_size = 8  # per device: the benchmark runs on one
    args.recipe = args.stage or args.recipe or ("demo" if args.data == "digits" else
                                                "deit" if args.model.startswith("deit") else "pretrain")
    for key, value in recipe(args.recipe, args.model).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.aa = None if args.aa in (None, "none") else args.aa
    args.patch = args.patch or 16
    if args.res % args.patch:
        p.error(f"--res {args.res} must be a multiple of --patch {args.patch}")
    if args.data == "folder" and not args.data_path and not args.benchmark:
        p.error("--data folder needs --data-path")
    args.output = args.output or os.path.join("runs", f"{args.model}_p{args.patch}_{args.res}_{args.recipe}")
    args.peak_lr = args.lr if args.unscale_lr else args.lr * args.batch_size / 512
    return args


# ----------------------------------------------------------------------------------------------
# Data


def gaussian_blur(img):
    return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class ThreeAugment:
    """DeiT III's augmentation, which timm lacks: after the crop and flip, one of grayscale,
    solarisation or Gaussian blur (radius in [0.1, 2]), then colour jitter (DeiT III: 0.3)."""

    def __init__(self, res, scale_min, hflip, color_jitter):
        self.crop_flip = transforms.Compose([
            transforms.RandomResizedCrop(res, scale=(scale_min, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(hflip)])
        self.one_of = [transforms.Grayscale(num_output_channels=3), transforms.RandomSolarize(128, p=1.0),
                       gaussian_blur]
        self.finish = transforms.Compose([transforms.ColorJitter(color_jitter, color_jitter, color_jitter),
                                          transforms.ToTensor(),
                                          transforms.Normalize(pv.IMAGENET_MEAN, pv.IMAGENET_STD)])

    def __call__(self, img):
        return self.finish(random.choice(self.one_of)(self.crop_flip(img)))


def train_transform(args):
    if args.three_augment:
        return ThreeAugment(args.res, args.scale_min, args.hflip, args.color_jitter)
    from timm.data import create_transform
    return create_transform(args.res, is_training=True, scale=(args.scale_min, 1.0), hflip=args.hflip,
                            color_jitter=args.color_jitter or None, auto_augment=args.aa, interpolation="bicubic",
                            re_prob=args.reprob, re_mode="pixel", mean=pv.IMAGENET_MEAN, std=pv.IMAGENET_STD)


def eval_transform(args):
    return transforms.Compose([
        transforms.Resize(int(args.res / args.eval_crop_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.res), transforms.ToTensor(),
        transforms.Normalize(pv.IMAGENET_MEAN, pv.IMAGENET_STD)])


def load_base_datasets(args, splits=("train", "val")):
    """Datasets of (PIL image or path, label) for the splits, before any transform."""
    if args.data == "digits":
        return tuple(demo_data.DigitsDataset(split == "train") for split in splits)
    if args.data == "folder":
        dirs = [os.path.join(args.data_path, split) for split in splits]
        missing = [d for d in dirs if not os.path.isdir(d)]
        if missing:
            raise SystemExit(f"--data-path {args.data_path}: expected ImageNet-style folders train/<class>/* "
                             f"and val/<class>/*, but {missing} do not exist")
        try:
            sets = tuple(datasets.ImageFolder(d, loader=str) for d in dirs)  # decoded in Images
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"--data-path {args.data_path}: {e}") from None
        if len(sets) == 2 and sets[0].classes != sets[1].classes:
            raise SystemExit(f"train/ and val/ have different classes: "
                             f"{len(sets[0].classes)} vs {len(sets[1].classes)}")
        return sets
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100,
           "fashion-mnist": datasets.FashionMNIST}[args.data]
    try:
        return tuple(cls(args.data_root, train=split == "train", download=args.download) for split in splits)
    except RuntimeError as e:
        raise SystemExit(f"{e} (looked in {args.data_root}; pass --download to fetch it)") from None


def open_image(item):
    """A PIL image from a dataset item: ImageFolder here yields paths, the others images or arrays."""
    if isinstance(item, str):
        with open(item, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    return (item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item))).convert("RGB")


class Images(Dataset):
    """Decodes and augments; yields (image, label, unreadable images passed over).

    In training a sample is asked for as (draw, index), where `draw` is its position in this rank's
    epoch order: it seeds the augmentation, so the batch of a step is the same however the run was
    resumed and with any number of loader workers. An unreadable training image is replaced by the
    next readable one, which keeps every batch full; in evaluation it is skipped (None)."""

    MAX_UNREADABLE_IN_A_ROW = 100

    def __init__(self, base, transform, seed=0, rank=0):
        self.base, self.transform, self.seed, self.rank, self.epoch = base, transform, seed, rank, 0

    def __len__(self):
        return len(self.base)

    def read(self, index):
        try:
            item, label = self.base[index]
            return open_image(item), label
        except (OSError, ValueError, SyntaxError):  # PIL's errors for unreadable or truncated files
            return None

    def __getitem__(self, key):
        draw, index = key if isinstance(key, tuple) else (None, key)
        for passed in range(self.MAX_UNREADABLE_IN_A_ROW if draw is not None else 1):
            sample = self.read((index + passed) % len(self.base))
            if sample is not None:
                break
        else:
            if draw is None:
                return None
            raise RuntimeError(f"{self.MAX_UNREADABLE_IN_A_ROW} unreadable images in a row from index {index}")
        if draw is not None:
            engine.seed_host(self.seed, self.epoch, self.rank, draw)
        img, label = sample
        return self.transform(img), label, passed


class EpochOrder(Sampler):
    """Yields (draw, index) for this rank's epoch order of an inner sampler, from draw `start` on."""

    def __init__(self, inner):
        self.inner, self.start = inner, 0

    def set_epoch(self, epoch, start=0):
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(enumerate(self.inner), self.start, None)

    def __len__(self):
        return len(self.inner) - self.start


def collate_skipping(batch):
    """Stack the readable samples: (images, labels) or None, and the number of unreadable ones."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good) + sum(b[2] for b in good)
    return (default_collate([b[:2] for b in good]) if good else None), skipped


def build_loaders(args, run):
    """(train, val) loaders; no train loader for --eval-only."""
    loader_kw = dict(num_workers=args.workers, collate_fn=collate_skipping, pin_memory=torch.cuda.is_available())
    *base_train, base_val = load_base_datasets(args, ("val",) if args.eval_only else ("train", "val"))
    args.num_classes = len(base_val.classes)
    val_set = Images(base_val, eval_transform(args))
    val = DataLoader(val_set, batch_size=run.micro_batch, sampler=engine.Shard(len(val_set), run.rank, run.world),
                     **loader_kw)
    if args.eval_only:
        return None, val
    train_set = Images(base_train[0], train_transform(args), args.seed, run.rank)
    if args.repeated_aug:  # each image 3x per epoch, differently augmented (DeiT's RASampler)
        from timm.data.distributed_sampler import RepeatAugSampler
        inner = RepeatAugSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True,
                                 selected_round=256 if len(train_set) >= 256 * run.world else 0)
    else:
        inner = torch.utils.data.DistributedSampler(train_set, run.world, run.rank, shuffle=True, seed=args.seed)
    train = DataLoader(train_set, batch_size=run.micro_batch, sampler=EpochOrder(inner), drop_last=True, **loader_kw)
    return train, val


# ----------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def build_model(args):
    overrides = {k: getattr(args, k) for k in ("embed_dim", "depth", "num_heads", "d_state")
                 if getattr(args, k) is not None}
    if not args.model.startswith("deit"):
        overrides["flip_schedule"] = args.flip_schedule
    try:
        return pv.create_model(args.model, patch=args.patch, res=args.res, num_classes=args.num_classes,
                               drop_path=args.drop_path, extend=args.extend, **overrides)
    except ValueError as e:
        raise SystemExit(f"cannot build the model: {e}") from None


def lr_at(step, args, steps_per_epoch):
    """Linear warm-up from warmup_lr, then cosine to min_lr, updated every optimiser step."""
    warmup = args.warmup_epochs * steps_per_epoch
    total = args.epochs * steps_per_epoch
    if step < warmup:
        return args.warmup_lr + (args.peak_lr - args.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.min_lr + 0.5 * (args.peak_lr - args.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def distribute(model, args, run):
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(run.device.type, (run.world,))
        policy = MixedPrecisionPolicy(param_dtype=run.amp_dtype) if run.amp_dtype else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)
    return engine.data_parallel(model, run)


# ----------------------------------------------------------------------------------------------
# Evaluation and training


@torch.no_grad()
def evaluate(model, loader, args, run):
    """Top-1, top-5 and loss over the whole validation set. Ranks run the same number of forward
    passes (a short rank repeats a masked-out batch), which FSDP's collectives need."""
    model.eval()
    device = run.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, images
    skipped = 0
    steps = int(engine.all_reduce([len(loader)], device, op=dist.ReduceOp.MAX)[0])
    batches = iter(loader)
    for _ in tqdm(range(steps), desc="eval", leave=False, disable=not run.is_main):
        batch, n_skipped = next(batches, (None, 0))
        skipped += n_skipped
        if batch is None:  # this rank ran out: a placeholder forward keeps the ranks in step
            images, labels = torch.zeros(1, 3, args.res, args.res), torch.zeros(1, dtype=torch.long)
        else:
            images, labels = batch
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with run.autocast():
            logits = model(images).float()
        if batch is None:
            continue
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                             hits.any(1).sum(), torch.tensor(len(labels), device=device)]).double()
    loss, top1, top5, n = engine.all_reduce(sums.tolist(), device)
    skipped = int(engine.all_reduce([skipped], device)[0])
    return dict(val_loss=loss / max(n, 1), top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1),
                val_images=int(n), val_skipped=skipped)


def loss_function(args):
    if args.mixup > 0 or args.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=args.num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=args.smoothing)


def train_one_epoch(epoch, start_step, model, loader, optimizer, scaler, ema, mixup, criterion,
                    args, run, save):
    """One epoch from optimiser step `start_step` on; calls save(step) every --save-every steps."""
    model.train()
    device, steps_per_epoch = run.device, run.steps_per_epoch
    loader.sampler.set_epoch(epoch, start=start_step * args.accum_steps * run.micro_batch)
    loader.dataset.epoch = epoch
    batches = iter(loader)
    bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch}", disable=not run.is_main,
               initial=start_step, total=steps_per_epoch)
    totals = dict(loss=0.0, steps=0, images=0, skipped=0)
    start_time = time.perf_counter()
    for step in bar:
        global_step = epoch * steps_per_epoch + step
        lr = lr_at(global_step, args, steps_per_epoch)
        engine.set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=device)
        for micro in range(args.accum_steps):
            batch, n_skipped = next(batches)
            totals["skipped"] += n_skipped
            if n_skipped and not run.warned_skip:
                warnings.warn(f"skipping unreadable images ({n_skipped} in this batch, replaced by the next "
                              "readable ones); the count is logged per epoch as train_skipped", stacklevel=2)
                run.warned_skip = True
            images, labels = batch
            if mixup is not None and len(images) % 2:  # mixup pairs images: keep an even batch
                images, labels = images[:-1], labels[:-1]
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            engine.seed_everything(args.seed, epoch, step, micro, run.rank)  # mixup and drop-path draws
            if mixup is not None:
                images, labels = mixup(images, labels)
            sync = micro == args.accum_steps - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():  # sync grads once per step
                with run.autocast():
                    loss = criterion(model(images), labels) / args.accum_steps
                engine.backward(loss, scaler)
            step_loss += loss.detach()
            totals["images"] += len(images)
        engine.optimizer_step(model, optimizer, scaler, args.clip_grad)
        if ema is not None:
            ema.update(engine.unwrap(model), step=global_step)
        totals["loss"] += step_loss
        totals["steps"] += 1
        last = step == steps_per_epoch - 1
        if step % args.log_every == 0 or last or (args.save_every and (step + 1) % args.save_every == 0):
            engine.check_finite(step_loss, f"epoch {epoch}, step {step}", args.output)
            bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.2e}",
                            img_s=f"{totals['images'] * run.world / (time.perf_counter() - start_time):.1f}")
        if args.save_every and (step + 1) % args.save_every == 0 and not last:
            save(epoch, step + 1)
    seconds = time.perf_counter() - start_time
    loss, steps, images, skipped = engine.all_reduce(
        [float(totals["loss"]), totals["steps"], totals["images"], totals["skipped"]], device)
    return dict(train_loss=loss / max(steps, 1), lr=lr, epoch_time=seconds, images_per_s=images / seconds,
                train_skipped=int(skipped))


def peak_memory_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------
# Benchmark (paper Table 6)

def saved_activation_bytes(step, parameters):
    """Bytes of the distinct tensors autograd keeps for backward during `step()`, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def benchmark(args, run):
    """Warmed-up training steps on synthetic input; one JSON line with speed, memory and MFU."""
    args.num_classes, device = 1000, run.device
    model = build_model(args).to(device).train()
    model.set_grad_checkpointing(args.grad_ckpt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, args.res, args.res, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    if args.compile:
        model.compile_blocks()

    def step():
        with run.autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: Triton autotuning, cuDNN algorithm search, compile
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(args.benchmark_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.benchmark_steps
    flops = 3 * model.estimate_flops(args.res) * args.batch_size / seconds  # training = 3x forward
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        memory, measure = torch.cuda.max_memory_allocated() - static, "peak allocated"
    elif args.compile:  # hooks on saved tensors would recompile every graph: see the eager rows
        memory, measure = None, "not measured (compiled, CPU)"
    else:  # no allocator statistics on CPU: count what autograd keeps for the backward pass
        memory, measure = saved_activation_bytes(step, model.parameters()), "saved for backward"
    result = dict(model=args.model, patch=args.patch, res=args.res, tokens=(args.res // args.patch * args.extend) ** 2,
                  batch=args.batch_size, dtype=str(run.amp_dtype or torch.float32).replace("torch.", ""),
                  grad_ckpt=args.grad_ckpt, device=name, backends=sorted(set(pv.backends(model)["mixers"].values())),
                  images_per_s=args.batch_size / seconds, step_ms=1e3 * seconds,
                  memory_mb_per_image=None if memory is None else memory / 2**20 / args.batch_size,
                  memory_measure=measure,
                  tflops=flops / 1e12, flops_count="analytic",
                  mfu=model.estimate_mfu(args.batch_size / seconds, args.res, name))
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    run = engine.setup(args)
    if args.benchmark:
        return benchmark(args, run)
    if args.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp shards over processes: launch with torchrun")
    run.micro_batch = engine.micro_batch(args.batch_size, run, args.accum_steps)
    engine.seed_everything(args.seed, "init")
    train_loader, val_loader = build_loaders(args, run)
    run.steps_per_epoch = len(train_loader) // args.accum_steps if train_loader else 0
    if run.steps_per_epoch == 0 and not args.eval_only:
        raise SystemExit(f"{len(train_loader.dataset)} training images give no full batch of "
                         f"{run.micro_batch} per rank")

    # --eval-only: the weights named (--resume, else --finetune), else the run folder's checkpoint.
    # Training: --finetune initialises; a checkpoint (--resume or the run folder's) continues.
    found = engine.resume_path(args)
    init = (found if args.resume else args.finetune or found) if args.eval_only else args.finetune
    resume = None if args.eval_only else found
    if args.eval_only and not init:
        raise SystemExit("--eval-only needs weights: --resume CHECKPOINT, --finetune WEIGHTS, or a run in --output")

    model = build_model(args)
    if init:
        try:
            pv.load_checkpoint(model, init)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"{init}: {e}") from None
    model.set_grad_checkpointing(args.grad_ckpt)
    model.to(run.device)
    ema = None
    if args.ema:
        if args.fsdp:
            raise SystemExit("--ema is not supported with --fsdp")
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.ema_decay)
    model = distribute(model, args, run)
    if args.compile:
        engine.unwrap(model).compile_blocks()   # in place, inside the DDP / FSDP wrapper
    optimizer = torch.optim.AdamW(engine.param_groups(engine.unwrap(model), args.weight_decay, args.layer_decay),
                                  lr=args.peak_lr, betas=tuple(args.opt_betas))
    scaler = run.grad_scaler()

    os.makedirs(args.output, exist_ok=True)
    start_epoch, start_step, best = 0, 0, 0.0
    if resume:
        ckpt = engine.load_training_state(resume, model, optimizer, scaler, ema)
        start_epoch, start_step, best = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        run.start = start_epoch * run.steps_per_epoch + start_step
        if run.is_main:
            print(f"resumed from {resume}: epoch {start_epoch}, step {start_step}")

    n_params = sum(p.numel() for p in engine.unwrap(model).parameters())  # DTensors report their full size
    if run.is_main:
        print(f"{args.model} patch {args.patch} @ {args.res}: {(args.res // args.patch * args.extend) ** 2:,} tokens, "
              f"{n_params / 1e6:.2f} M params | {args.recipe} recipe, {run.world} x {args.accum_steps} x "
              f"{run.micro_batch} = {args.batch_size} images/step, peak lr {args.peak_lr:.2e}")

    if args.eval_only:  # eval.json, so that a training run's results.json in the same folder survives
        metrics = evaluate(model, val_loader, args, run)
        if run.is_main:
            print(json.dumps(metrics))
            engine.write_json(os.path.join(args.output, "eval.json"),
                              dict(metrics, weights=init, args=engine.jsonable(args), run_state=run.as_dict()))
        engine.finish()
        return metrics
    if start_epoch >= args.epochs:
        engine.finish()
        return engine.finished_results(run, args)

    mixup, criterion = loss_function(args)
    latest = os.path.join(args.output, "checkpoint.pth")

    def save(epoch, step, best_top1=None, also_best=False):
        model_state = engine.save_training_state(latest, run, args, model, optimizer, scaler, ema, epoch=epoch,
                                                 step=step, best_top1=best if best_top1 is None else best_top1)
        if also_best and run.is_main:
            engine.save_checkpoint(os.path.join(args.output, "best.pth"),
                                   {"model": model_state, "args": engine.jsonable(args)})

    metrics = {}
    if run.is_main:  # an epoch that was logged but not checkpointed runs again: drop its line
        engine.keep_log_lines(os.path.join(args.output, "log.jsonl"), start_epoch, key="epoch")
    for epoch in range(start_epoch, args.epochs):
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        try:
            stats = train_one_epoch(epoch, start_step, model, train_loader, optimizer, scaler, ema,
                                    mixup, criterion, args, run, save)
        except torch.OutOfMemoryError:
            raise SystemExit(f"out of GPU memory with {run.micro_batch} images per micro-batch: use a larger "
                             "--accum-steps, --grad-ckpt, --amp bf16, or --fsdp") from None
        start_step = 0
        metrics = dict(**stats, **evaluate(model, val_loader, args, run), peak_memory_mb=peak_memory_mb(run.device))
        if ema is not None:
            metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, args, run).items()})
        improved = metrics["top1"] > best or epoch == 0
        best = max(best, metrics["top1"])
        if run.is_main:
            print(json.dumps(dict(epoch=epoch, **metrics)))
        metrics = engine.report(run, args, metrics, epoch=epoch, best_top1=best, params=n_params)
        save(epoch + 1, 0, best, also_best=improved)
    if run.is_main:
        print(f"done: top-1 {metrics.get('top1', float('nan')):.2f} % (best {best:.2f} %) -> {args.output}")
    engine.finish()
    return metrics


if __name__ == "__main__":
    main()
