"""ImageNet classification with the paper's recipes, on one CPU or many GPUs.

    python train.py                                   # a small demo on a bundled dataset, CPU, minutes
    torchrun --nproc_per_node 8 train.py --model adv_b --patch 1 --res 224 --data-path /imagenet
    python train.py --eval-only --resume adventurer_base_patch1_224.pth --model adv_b --patch 1 --data-path /imagenet
    python train.py --benchmark --model adv_b --patch 4 --res 224 --batch-size 64

`--stage pretrain|intermediate|finetune` picks the paper's Adventurer recipes (Tables 8, 10, 9) and
`--recipe deit` the DeiT one; every value has its own flag. `--batch-size` is the GLOBAL batch, as in
the paper's tables: each of the world x accum-steps micro-batches is batch-size / (world x accum).
`--lr` is the peak learning rate; the recipes give the paper's base rate per 512 images (`--blr`),
scaled by batch / 512 as the official code does.

Every random draw is a function of (seed, epoch, step) or (seed, epoch, rank, draw), never of the
history of the run: a run killed at any moment and resumed from its last checkpoint ends with the same
weights as one that never stopped.
"""
import argparse
import itertools
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass

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
# lost or it is silent, the official Patch_Scaling README commands decide (noted per entry). Learning
# rates in the paper's terms: `blr`, per 512 images, which the official code (DeiT's rule) scales by
# batch / 512 to the peak `lr`; a recipe that gives `lr` gives the peak itself.

COMMON = dict(  # the official main.py defaults the recipes start from
    opt_betas=(0.9, 0.999), min_lr=1e-5, warmup_lr=1e-6, clip_grad=None, layer_decay=1.0,
    smoothing=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", three_augment=False,
    repeated_aug=True, reprob=0.25, scale_min=0.08, hflip=0.5, color_jitter=0.3, ema=False, eval_crop_ratio=0.875,
    ema_decay=0.99996)

RECIPES = {
    # Table 8. The official stage-1 command: ThreeAugment (RandAugment off), no label smoothing,
    # no random erasing, repeated augmentation on.
    "pretrain": dict(
        res=128, epochs=300, batch_size=1024, blr=5e-4, weight_decay=0.05, warmup_epochs=5,
        drop_path=0.1, smoothing=0.0, three_augment=True, reprob=0.0,
        large=dict(blr=2e-4, weight_decay=0.3, epochs=200, opt_betas=(0.9, 0.95), batch_size=4096,
                   warmup_epochs=20, drop_path=0.2)),
    # Table 10, initialised from the 128 px pretrain. Layer decay 0.9 is the paper's; the official
    # README commands left it at 1.0 (pass --layer-decay 1.0 to reproduce the released runs).
    "intermediate": dict(
        res=224, epochs=100, batch_size=1024, blr=5e-4, weight_decay=0.05, warmup_epochs=5,
        drop_path={"adv_t": 0.2, "adv_s": 0.2, "adv_b": 0.4}, layer_decay=0.9, smoothing=0.0,
        three_augment=True, reprob=0.0,
        large=dict(blr=8e-4, weight_decay=0.3, epochs=50, opt_betas=(0.9, 0.95), batch_size=4096,
                   warmup_epochs=20, drop_path=0.4)),
    # Table 9. RandAugment and smoothing 0.1, no repeated augmentation or erasing (official stage 3).
    # The official command sets --lr 1e-5 equal to its --min-lr, so its "cosine" stays flat at
    # 1e-5; here it decays to 1e-6 (pass --min-lr 1e-5 for the flat schedule).
    "finetune": dict(
        res=224, epochs=20, batch_size=512, blr=1e-5, min_lr=1e-6, weight_decay=0.1, warmup_epochs=5,
        drop_path={"adv_t": 0.4, "adv_s": 0.4, "adv_b": 0.6}, layer_decay=0.95, repeated_aug=False,
        reprob=0.0, eval_crop_ratio=1.0,
        large=dict(blr=2e-5, epochs=50, opt_betas=(0.9, 0.95), drop_path=0.6)),
    # DeiT (Touvron et al. 2021) as the paper's Sec. 4.1 states it: 300 epochs, AdamW, batch 1024,
    # lr 1e-3 (5e-4 x 1024/512), weight decay 0.05; the rest are DeiT's defaults.
    "deit": dict(res=224, epochs=300, batch_size=1024, blr=5e-4, weight_decay=0.05, warmup_epochs=5,
                 drop_path=0.1, ema=True),
    # The embedded demo: 8x8 handwritten digits bundled with scikit-learn, upsampled to 16 px.
    # Small images want light augmentation: no RandAugment, mixup, erasing, flips or colour jitter.
    "demo": dict(res=16, epochs=25, batch_size=64, lr=2e-3, weight_decay=0.05,
                 warmup_epochs=3, drop_path=0.0, mixup=0.0, cutmix=0.0, aa=None, reprob=0.0,
                 repeated_aug=False, scale_min=0.6, hflip=0.0, color_jitter=0.0, eval_crop_ratio=1.0),
}
LARGE_MODELS = ("adv_l", "adv_h", "deit_l", "deit_h")
NONFINITE_REMEDIES = "a lower --lr, --clip-grad 1.0, or --amp bf16 instead of fp16"   # a loss that is not finite
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


def get_args_parser():
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
            ("lr", float, "peak learning rate, the one the schedule reaches (default: --blr x batch / 512)"),
            ("blr", float, "base learning rate per 512 images, the paper's terms: lr = blr x batch / 512"),
            ("min-lr", float, "cosine floor"),
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
    g.add_argument("--ema-decay", type=float, help="EMA decay per step (default 0.99996)")
    g = engine.add_run_args(p, "run folder (default: runs/<model>_p<patch>_<res>_<recipe>)")
    g.add_argument("--eval", dest="eval_only", action="store_true", help="alias of --eval-only")
    g.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N optimiser steps, besides the end of every epoch (default 0: epoch "
                        "ends only)")
    g.add_argument("--fsdp", action="store_true", help="shard parameters (FSDP2) for Large/Huge")
    g.add_argument("--benchmark", action="store_true", help="time training steps on synthetic input")
    g.add_argument("--benchmark-steps", type=int, default=10, help="timed steps after 3 warm-up steps")
    return p


@dataclass(frozen=True)
class TrainConfig(engine.RunSettings):
    """Every setting of a run (those of the shared run flags in `engine.RunSettings`), resolved once from
    the flags, the recipe and the demo (`resolve`)."""
    # model
    model: str
    patch: int
    res: int
    extend: int
    flip_schedule: str
    embed_dim: int | None
    depth: int | None
    num_heads: int | None
    d_state: int | None
    # data
    data: str                       # folder, digits, cifar10, cifar100 or fashion-mnist
    data_path: str | None
    data_root: str
    download: bool
    # recipe
    recipe: str
    epochs: int
    batch_size: int                 # global: world x accum_steps x micro-batch
    lr: float                       # the peak lr, the one the schedule reaches
    blr: float | None               # the base lr per 512 images that gave it (None: lr was given as it is)
    min_lr: float
    warmup_lr: float
    warmup_epochs: float
    weight_decay: float
    opt_betas: tuple
    layer_decay: float
    clip_grad: float | None
    drop_path: float
    smoothing: float
    mixup: float
    cutmix: float
    aa: str | None
    three_augment: bool
    repeated_aug: bool
    reprob: float
    scale_min: float
    hflip: float
    color_jitter: float
    eval_crop_ratio: float
    ema: bool
    ema_decay: float
    # run
    save_every: int
    fsdp: bool
    benchmark: bool
    benchmark_steps: int


def resolve(args):
    """The frozen settings of a command line: the typed flags, then the recipe (--stage, --recipe, or
    by the model), then the official defaults; with no data and no model flag, the CPU demo."""
    flags = vars(args)
    if flags["data"] is None and not flags["data_path"] and not flags["benchmark"]:
        engine.refuse_model_run_without_data(flags, "train.py", "an ImageNet-style folder, or --data for a "
                                                                "bundled set")
    data = flags["data"] or ("folder" if flags["data_path"] else "digits")
    demo = data == "digits" and not flags["model"]
    model = flags["model"] or DEMO_MODEL["model"]
    name = flags["stage"] or flags["recipe"] or ("demo" if data == "digits" else
                                                 "deit" if model.startswith("deit") else "pretrain")
    benchmark = dict(batch_size=8) if flags["benchmark"] else {}  # per device: the benchmark runs on one
    recipes = (benchmark, DEMO_MODEL if demo else {}, recipe(name, model), dict(patch=16))
    s = engine.merge_recipe(flags, *recipes)
    # the recipe's own values (no flag typed), for the default folder's name
    reference = engine.merge_recipe(vars(get_args_parser().parse_args([])), *recipes)
    chosen = {k: s[k] for k in flags}
    s.update(data=data, model=model, recipe=name, aa=None if s["aa"] in (None, "none") else s["aa"],
             opt_betas=tuple(s["opt_betas"]))
    if s["res"] % s["patch"]:
        engine.flag_error("train.py", f"--res {s['res']} must be a multiple of --patch {s['patch']}")
    if data == "folder" and not s["data_path"] and not s["benchmark"]:
        engine.flag_error("train.py", "--data folder needs --data-path")
    if s["context_parallel"] > 1 and (s["fsdp"] or s["benchmark"]):
        engine.flag_error("train.py", "--context-parallel runs with DDP, not with --fsdp or --benchmark")
    s["output"] = s["output"] or engine.run_folder(f"{model}_p{s['patch']}_{s['res']}_{name}", chosen, reference,
                                                   named=("model", "patch", "res", "stage", "recipe"))
    if flags["lr"] is not None and flags["blr"] is not None:
        engine.flag_error("train.py", "--lr is the peak rate and --blr the base rate it is scaled from: give one")
    if flags["lr"] is None and (flags["blr"] is not None or s["lr"] is None):
        s["lr"] = s["blr"] * s["batch_size"] / 512       # DeiT's rule, as the official code applies it
    else:
        s["blr"] = None
    return engine.settings_of(TrainConfig, s)


def parse_args(argv=None):
    """The frozen settings of a command line (sys.argv when None)."""
    return resolve(get_args_parser().parse_args(argv))


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


def train_transform(cfg):
    if cfg.three_augment:
        return ThreeAugment(cfg.res, cfg.scale_min, cfg.hflip, cfg.color_jitter)
    from timm.data import create_transform
    return create_transform(cfg.res, is_training=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip,
                            color_jitter=cfg.color_jitter or None, auto_augment=cfg.aa, interpolation="bicubic",
                            re_prob=cfg.reprob, re_mode="pixel", mean=pv.IMAGENET_MEAN, std=pv.IMAGENET_STD)


def eval_transform(cfg):
    return transforms.Compose([
        transforms.Resize(int(cfg.res / cfg.eval_crop_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg.res), transforms.ToTensor(),
        transforms.Normalize(pv.IMAGENET_MEAN, pv.IMAGENET_STD)])


def load_base_datasets(cfg, splits=("train", "val")):
    """Datasets of (PIL image or path, label) for the splits, before any transform."""
    if cfg.data == "digits":
        return tuple(demo_data.DigitsDataset(split == "train") for split in splits)
    if cfg.data == "folder":
        dirs = [os.path.join(cfg.data_path, split) for split in splits]
        missing = [d for d in dirs if not os.path.isdir(d)]
        if missing:
            raise SystemExit(f"--data-path {cfg.data_path}: expected ImageNet-style folders train/<class>/* "
                             f"and val/<class>/*, but {missing} do not exist")
        try:
            sets = tuple(datasets.ImageFolder(d, loader=str) for d in dirs)  # decoded in Images
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"--data-path {cfg.data_path}: {e}") from None
        if len(sets) == 2 and sets[0].classes != sets[1].classes:
            raise SystemExit(f"train/ and val/ have different classes: "
                             f"{len(sets[0].classes)} vs {len(sets[1].classes)}")
        return sets
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100,
           "fashion-mnist": datasets.FashionMNIST}[cfg.data]
    try:
        return tuple(cls(cfg.data_root, train=split == "train", download=cfg.download) for split in splits)
    except RuntimeError as e:
        raise SystemExit(f"{e} (looked in {cfg.data_root}; pass --download to fetch it)") from None


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


def build_loaders(cfg, run):
    """(train, val) loaders of run.micro_batch images and the number of classes; no train loader for
    --eval-only."""
    loader_kw = dict(num_workers=cfg.workers, collate_fn=collate_skipping, pin_memory=torch.cuda.is_available())
    *base_train, base_val = load_base_datasets(cfg, ("val",) if cfg.eval_only else ("train", "val"))
    val_set = Images(base_val, eval_transform(cfg))
    val = DataLoader(val_set, batch_size=run.micro_batch,
                     sampler=engine.Shard(len(val_set), run.replica, run.replicas), **loader_kw)
    if cfg.eval_only:
        return None, val, len(base_val.classes)
    # the ranks of a context-parallel group read, augment and draw the same images
    train_set = Images(base_train[0], train_transform(cfg), cfg.seed, run.replica)
    if cfg.repeated_aug:  # each image 3x per epoch, differently augmented (DeiT's RASampler)
        from timm.data.distributed_sampler import RepeatAugSampler
        inner = RepeatAugSampler(train_set, num_replicas=run.replicas, rank=run.replica, shuffle=True,
                                 selected_round=256 if len(train_set) >= 256 * run.replicas else 0)
    else:
        inner = torch.utils.data.DistributedSampler(train_set, run.replicas, run.replica, shuffle=True,
                                                    seed=cfg.seed)
    train = DataLoader(train_set, batch_size=run.micro_batch, sampler=EpochOrder(inner), drop_last=True, **loader_kw)
    return train, val, len(base_val.classes)


# ----------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def build_model(cfg, num_classes):
    overrides = {k: getattr(cfg, k) for k in ("embed_dim", "depth", "num_heads", "d_state")
                 if getattr(cfg, k) is not None}
    if not cfg.model.startswith("deit"):
        overrides["flip_schedule"] = cfg.flip_schedule
    try:
        return pv.create_model(cfg.model, patch=cfg.patch, res=cfg.res, num_classes=num_classes,
                               drop_path=cfg.drop_path, extend=cfg.extend, **overrides)
    except ValueError as e:
        raise SystemExit(f"cannot build the model: {e}") from None


def lr_at(step, cfg, steps_per_epoch):
    """Linear warm-up from warmup_lr, then cosine to min_lr, updated every optimiser step."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def distribute(model, cfg, run):
    if cfg.fsdp:
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
def evaluate(model, loader, cfg, run):
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
            images, labels = torch.zeros(1, 3, cfg.res, cfg.res), torch.zeros(1, dtype=torch.long)
        else:
            images, labels = batch
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with run.autocast():
            logits = model(images).float()
        if batch is None or not run.counts_its_images:
            continue
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                             hits.any(1).sum(), torch.tensor(len(labels), device=device)]).double()
    loss, top1, top5, n = engine.all_reduce(sums.tolist(), device)
    skipped = int(engine.all_reduce([skipped], device)[0])
    return dict(val_loss=loss / max(n, 1), top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1),
                val_images=int(n), val_skipped=skipped)


def loss_function(cfg, num_classes):
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)


def train_one_epoch(epoch, start_step, model, loader, optimizer, scaler, ema, mixup, criterion, cfg, run, best):
    """One epoch from optimiser step `start_step` on, checkpointing every --save-every steps."""
    model.train()
    device, steps_per_epoch = run.device, run.steps_per_epoch
    loader.sampler.set_epoch(epoch, start=start_step * cfg.accum_steps * run.micro_batch)
    loader.dataset.epoch = epoch
    batches = iter(loader)
    bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch}", disable=not run.is_main,
               initial=start_step, total=steps_per_epoch)
    totals = dict(loss=0.0, steps=0, images=0, skipped=0)
    start_time = time.perf_counter()
    for step in bar:
        global_step = epoch * steps_per_epoch + step
        lr = lr_at(global_step, cfg, steps_per_epoch)
        engine.set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=device)
        for micro in range(cfg.accum_steps):
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
            engine.seed_everything(cfg.seed, epoch, step, micro, run.replica)  # mixup and drop-path draws
            if mixup is not None:
                images, labels = mixup(images, labels)
            with engine.gradient_sync(model, micro == cfg.accum_steps - 1):
                with run.autocast():
                    loss = criterion(model(images), labels) / cfg.accum_steps
                engine.backward(loss, scaler)
            step_loss += loss.detach()
            totals["images"] += len(images)
        engine.optimizer_step(model, optimizer, scaler, cfg.clip_grad)
        if ema is not None:
            ema.update(engine.unwrap(model), step=global_step)
        totals["loss"] += step_loss
        totals["steps"] += 1
        last = step == steps_per_epoch - 1
        save_due = cfg.save_every and (step + 1) % cfg.save_every == 0
        if step % cfg.log_every == 0 or last or save_due:
            engine.check_finite(step_loss, f"epoch {epoch}, step {step}", cfg.output, NONFINITE_REMEDIES)
            bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{lr:.2e}",
                            img_s=f"{totals['images'] * run.replicas / (time.perf_counter() - start_time):.1f}")
        if save_due and not last:
            save(cfg, run, model, optimizer, scaler, ema, epoch=epoch, step=step + 1, best_top1=best)
    seconds = time.perf_counter() - start_time
    counted = run.counts_its_images   # a context-parallel group's images once
    loss, steps, images, skipped = engine.all_reduce(
        [float(totals["loss"]), totals["steps"], totals["images"] * counted, totals["skipped"] * counted], device)
    return dict(train_loss=loss / max(steps, 1), lr=lr, epoch_time=seconds, images_per_s=images / seconds,
                train_skipped=int(skipped))


def save(cfg, run, model, optimizer, scaler, ema, also_best=False, **progress):
    """OUTPUT/checkpoint.pth, where the run is (`progress`: epoch, step, best_top1), and the weights
    alone as OUTPUT/best.pth when `also_best`."""
    state = engine.save_training_state(os.path.join(cfg.output, "checkpoint.pth"), run, cfg, model, optimizer,
                                       scaler, ema, **progress)
    if also_best and run.is_main:
        engine.save_checkpoint(os.path.join(cfg.output, "best.pth"), {"model": state, "args": engine.jsonable(cfg)})


def peak_memory_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def benchmark(cfg, run):
    """--benchmark: warmed-up training steps of the model on synthetic input, one JSON line."""
    model = build_model(cfg, num_classes=1000)
    model.set_grad_checkpointing(cfg.grad_ckpt)
    result = dict(model=cfg.model, **engine.benchmark_training(model, cfg.batch_size, cfg.benchmark_steps, run,
                                                               cfg.compile))
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------


def main(cfg):
    run = engine.setup(cfg.amp)
    if cfg.benchmark:
        return benchmark(cfg, run)
    engine.check_same_run("train.py", cfg)   # before anything in the run folder changes
    engine.context_parallel(run, cfg.context_parallel, "train.py")
    if cfg.fsdp and not dist.is_initialized():
        raise SystemExit("--fsdp shards over processes: launch with torchrun")
    if cfg.ema and cfg.fsdp:
        raise SystemExit("--ema is not supported with --fsdp")
    run.micro_batch = engine.micro_batch(cfg.batch_size, run, cfg.accum_steps)
    engine.seed_everything(cfg.seed, "init")
    train_loader, val_loader, num_classes = build_loaders(cfg, run)
    run.steps_per_epoch = len(train_loader) // cfg.accum_steps if train_loader else 0
    if run.steps_per_epoch == 0 and not cfg.eval_only:
        raise SystemExit(f"{len(train_loader.dataset)} training images give no full batch of "
                         f"{run.micro_batch} per rank")

    # --eval-only: the weights named (--resume, else --finetune), else the run folder's checkpoint.
    # Training: --finetune initialises; a checkpoint (--resume or the run folder's) continues.
    found = engine.resume_path(cfg.output, cfg.resume, cfg.no_resume)
    init = (found if cfg.resume else cfg.finetune or found) if cfg.eval_only else cfg.finetune
    resume = None if cfg.eval_only else found
    if cfg.eval_only and not init:
        raise SystemExit("--eval-only needs weights: --resume CHECKPOINT, --finetune WEIGHTS, or a run in --output")

    # build: the model, its EMA, the data-parallel wrapper, the optimiser
    model = build_model(cfg, num_classes)
    if init:
        try:
            weights = pv.read_state_dict(init)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"{init}: {e}") from None
        try:
            pv.load_checkpoint(model, weights)
        except (KeyError, ValueError):   # the keys of another architecture, the shapes of another size
            flag = "--finetune" if init == cfg.finetune else "--resume" if cfg.resume else "--eval-only"
            engine.weights_misfit("train.py", flag, init, model)
    model.set_grad_checkpointing(cfg.grad_ckpt)
    engine.share_images(model, run, "train.py")
    model.to(run.device)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    model = distribute(model, cfg, run)
    if cfg.compile:
        engine.unwrap(model).compile_blocks()   # in place, inside the DDP / FSDP wrapper
    optimizer = torch.optim.AdamW(engine.param_groups(engine.unwrap(model), cfg.weight_decay, cfg.layer_decay),
                                  lr=cfg.lr, betas=cfg.opt_betas)
    scaler = run.grad_scaler()
    mixup, criterion = loss_function(cfg, num_classes)

    # resume
    os.makedirs(cfg.output, exist_ok=True)
    start_epoch, start_step, best = 0, 0, 0.0
    if resume:
        ckpt = engine.load_training_state(resume, model, optimizer, scaler, ema)
        start_epoch, start_step, best = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        run.start = start_epoch * run.steps_per_epoch + start_step
        if run.is_main:
            print(f"resumed from {resume}: epoch {start_epoch}, step {start_step}")

    n_params = sum(p.numel() for p in engine.unwrap(model).parameters())  # DTensors report their full size
    if run.is_main:
        tokens = engine.unwrap(model).grid_size ** 2
        print(f"{cfg.model} patch {cfg.patch} @ {cfg.res}: {tokens:,} token{'' if tokens == 1 else 's'}, "
              f"{n_params / 1e6:.2f} M params | {cfg.recipe} recipe, {run.replicas} x {cfg.accum_steps} x "
              f"{run.micro_batch} = {cfg.batch_size} images/step"
              + (f", each image over {cfg.context_parallel} processes" if cfg.context_parallel > 1 else "")
              + f", peak lr {cfg.lr:.2e}")

    if cfg.eval_only:  # eval.json, so that a training run's results.json in the same folder survives
        metrics = evaluate(model, val_loader, cfg, run)
        if run.is_main:
            print(json.dumps(metrics))
        engine.write_eval(run, cfg.output, cfg, dict(metrics, weights=init))
        engine.finish()
        return metrics
    if start_epoch >= cfg.epochs:
        engine.finish()
        return engine.finished_results(run, cfg.output)

    # the loop: train an epoch, evaluate, report, save
    metrics = {}
    if run.is_main:  # an epoch that was logged but not checkpointed runs again: drop its line
        engine.keep_log_lines(os.path.join(cfg.output, "log.jsonl"), start_epoch, key="epoch")
    for epoch in range(start_epoch, cfg.epochs):
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        try:
            stats = train_one_epoch(epoch, start_step, model, train_loader, optimizer, scaler, ema,
                                    mixup, criterion, cfg, run, best)
        except torch.OutOfMemoryError:
            raise SystemExit(f"out of GPU memory with {run.micro_batch} images per micro-batch: use a larger "
                             "--accum-steps, --grad-ckpt, --amp bf16, or --fsdp") from None
        start_step = 0
        metrics = dict(**stats, **evaluate(model, val_loader, cfg, run), peak_memory_mb=peak_memory_mb(run.device))
        if ema is not None:
            metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, cfg, run).items()})
        improved = metrics["top1"] > best or epoch == 0
        best = max(best, metrics["top1"])
        if run.is_main:
            print(json.dumps(dict(epoch=epoch, **metrics)))
        metrics = engine.report(run, cfg.output, cfg, metrics, epoch=epoch, best_top1=best, params=n_params)
        save(cfg, run, model, optimizer, scaler, ema, also_best=improved, epoch=epoch + 1, step=0, best_top1=best)
    if run.is_main:
        print(f"done: top-1 {metrics.get('top1', float('nan')):.2f} % (best {best:.2f} %) -> {cfg.output}")
    engine.finish()
    return metrics


if __name__ == "__main__":
    main(parse_args())
