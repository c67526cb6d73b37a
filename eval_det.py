"""COCO detection and instance segmentation: a Cascade Mask R-CNN on a plain pixelvit backbone (paper Table 3).

    python eval_det.py                      # a short demo on a tiny COCO-format set, CPU, 2 minutes
    torchrun --nproc_per_node 8 eval_det.py --model adv_b --patch 4 --data-path COCO --finetune imagenet.pth
    python eval_det.py --eval-only --resume runs/det_adv_b_p4/checkpoint.pth --model adv_b --patch 4 --data-path COCO
    python eval_det.py --eval-results results.json --data-path COCO   # score a results file, no model

The paper's recipe by default: AdamW lr 1e-4, weight decay 0.05, total batch 16, 12 epochs with the
lr divided by 10 at epochs 8 and 11 after a 500-iteration linear warm-up (mmdet's 1x), short side 800
and long side 1333, horizontal flips.

The detector (`detection.py`) follows mmdet's Cascade Mask R-CNN 1x config, built on torchvision's
GeneralizedRCNN machinery; docs/detection.md compares it with mmdet rule by rule.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import demo_data
import detection
import engine

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


def build(cfg, num_classes, device):
    """The detector that the settings describe, its backbone from --finetune."""
    body = engine.dense_backbone(cfg.model, cfg.patch, cfg.min_size, cfg.drop_path, cfg.finetune, cfg.grad_ckpt,
                                 cfg.compile, embed_dim=cfg.embed_dim, depth=cfg.depth, d_state=cfg.d_state,
                                 num_heads=cfg.num_heads)
    return detection.build_detector(body, num_classes, cfg.channels, cfg.min_size, cfg.max_size, cfg.rois_per_image,
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
        results += detection.to_coco_results(out, target["image_id"], dataset.category_ids, image.shape[-2:])
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
        os.makedirs(cfg.save_predictions, exist_ok=True)
        with open(os.path.join(cfg.save_predictions, "coco_results.json"), "w") as f:
            json.dump(results, f)
    scores = detection.coco_evaluate(dataset.coco, results, kinds=("bbox", "segm"))
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
    masks = torch.from_numpy(np.stack([detection.paste_mask(out["mask_probs"][k], out["boxes"][k], *image.shape[-2:])
                                       for k in keep])) if keep else None
    captions = [f"{name} {score:.2f}" for name, score in zip(names(out["labels"][keep]), out["scores"][keep].tolist())]
    gap = torch.full((3, pixels.shape[1], 4), 255, dtype=torch.uint8)
    panels = [pixels, gap, panel(target["boxes"], target["masks"], names(target["labels"]), "lime"), gap,
              panel(out["boxes"][keep], masks, captions, "orange")]
    Image.fromarray(torch.cat(panels, dim=2).permute(1, 2, 0).numpy()).save(path)


def flatten(scores):
    return {f"{kind}_{name}": v for kind, row in scores.items() for name, v in row.items()}


def print_scores(scores):
    print(f"{'':6s}" + "".join(f"{name:>8s}" for name in detection.STAT_NAMES))
    for kind, row in scores.items():
        print(f"{kind:6s}" + "".join(f"{row[name]:8.2f}" if row[name] is not None else f"{'n/a':>8s}"
                                     for name in detection.STAT_NAMES))


# The paper's recipe (Sec. 4.3: mmdet's Cascade Mask R-CNN 1x) and the CPU demo's; each typed flag wins.
PAPER = dict(model="adv_t", patch=16, drop_path=0.1, min_size=800, max_size=1333, channels=256, head_dims=256,
             fc_dim=1024, rois_per_image=512, epochs=12, lr_steps=[8, 11], batch_size=16, lr=1e-4, weight_decay=0.05,
             layer_decay=1.0, warmup_iters=500, save_every=2000,
             eval_every=29_320)   # 4 epochs of COCO train2017's 117,266 annotated images at batch 16
DEMO = dict(min_size=64, max_size=64, channels=32, head_dims=32, fc_dim=128, rois_per_image=64, epochs=8,
            lr_steps=[6, 7], batch_size=4, lr=3e-4, warmup_iters=50, embed_dim=64, depth=4, d_state=16, patch=4,
            drop_path=0.0, eval_every=120)   # 4 epochs of the demo's 120 images at batch 4


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
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    g.add_argument("--warmup-iters", type=int, help="linear warm-up from 0.001 x lr (default 500)")
    g.add_argument("--eval-every", type=int,
                   help="evaluate every N optimiser steps (iterations), and at the end (default 29,320: 4 COCO epochs "
                        "at batch 16; 0: at the end only)")
    g.add_argument("--save-every", type=int,
                   help="checkpoint every N optimiser steps (iterations), and at the end (default 2,000; 0: at the "
                        "end only)")
    engine.add_run_args(p, "run folder (default: runs/det_<model>_p<patch>)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-results", help="evaluate an existing COCO results file; no model is run")
    g.add_argument("--save-predictions", metavar="DIR",
                   help="write the COCO results file (test-dev format) as DIR/coco_results.json")
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
    eval_every: int                 # optimiser steps; 0: at the end only
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
    reference = engine.merge_recipe(vars(get_args_parser().parse_args([])), DEMO if demo else {}, PAPER)
    s["output"] = s["output"] or engine.run_folder(f"det_{s['model']}_p{s['patch']}", {k: s[k] for k in flags},
                                                   reference, named=("model", "patch"))
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
        scores = detection.coco_evaluate(COCO(cfg.ann_file), detection.load_results(cfg.eval_results))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print_scores(scores)
    return engine.report(engine.Run(), cfg.output, cfg, flatten(scores), results_file=cfg.eval_results)


def main(cfg):
    if cfg.eval_results:
        os.makedirs(cfg.output, exist_ok=True)
        return score_results_file(cfg)
    engine.check_same_run("eval_det.py", cfg)   # before anything in the run folder changes
    os.makedirs(cfg.output, exist_ok=True)
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
        engine.load_model_weights(model, resume, "eval_det.py", model.backbone.body)
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
        interval_loss += loss.double()
        interval_iters += 1
        if it % cfg.log_every == 0 or done == total:
            engine.check_finite(loss, f"iteration {it}", cfg.output)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == total:   # before the checkpoint
            train_loss = engine.all_reduce([interval_loss.item()], run.device)[0] / run.world / interval_iters
            interval_loss.zero_()
            interval_iters = 0
            metrics = dict(evaluate(wrapped, val_set, cfg, run), val_loss=validation_loss(wrapped, val_set, cfg, run))
            metrics = engine.report(run, cfg.output, cfg, metrics, iter=done, train_loss=train_loss)
        if (cfg.save_every and done % cfg.save_every == 0) or done == total:
            engine.save_training_state(os.path.join(cfg.output, "checkpoint.pth"), run, cfg, wrapped, optimizer,
                                       scaler, iter=done, interval_loss=interval_loss.item(),
                                       interval_iters=interval_iters)
    engine.finish()
    return metrics


if __name__ == "__main__":
    main(parse_args())
