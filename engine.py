"""The run plumbing that train.py, eval_seg.py and eval_det.py share, as MAE's engine files serve its
scripts: processes and precision (`Run`), seeds that make every random draw a function of where the
run is, the resumable sampler, optimiser groups, checkpoints, logs and results, and `train_iterations`,
the build -> resume -> loop -> evaluate -> finish skeleton of the iteration-based dense tasks.
Each script keeps only what is particular to its task and calls these.

Every random draw is a function of (seed, position), never of the run's history: a run killed at any
moment and resumed from its last checkpoint ends with the weights of one that never stopped.
"""
import contextlib
import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import pixelvit as pv

# ----------------------------------------------------------------------------------------------
# The run: processes, device, precision, and the state that changes while it runs


@dataclass
class Run:
    """What the launch decides and the run changes, kept apart from the parsed flags."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    amp: str = "off"              # "bf16", "fp16" or "off", resolved from --amp and the device
    micro_batch: int = 0          # images per process per forward pass
    start: int = 0                # iterations (or optimiser steps) already done when the run started
    steps_per_epoch: int = 0
    warned_skip: bool = False     # train.py: unreadable images were reported once

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def amp_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[self.amp]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def grad_scaler(self):
        """fp16 needs loss scaling; bf16 and float32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

    def as_dict(self):
        return dict(rank=self.rank, world=self.world, device=str(self.device), amp=self.amp,
                    micro_batch=self.micro_batch, start=self.start, steps_per_epoch=self.steps_per_epoch)


def setup(args):
    """Join the torchrun process group (or run as a world of one) and resolve the precision."""
    if "RANK" not in os.environ:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
    return Run(rank=rank, world=world, device=device, amp=args.amp or ("bf16" if device.type == "cuda" else "off"))


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def micro_batch(global_batch, run, accum_steps=1):
    """Images per process per forward pass; --batch-size is the global batch, as in the paper."""
    if global_batch % (run.world * accum_steps):
        raise SystemExit(f"--batch-size {global_batch} (global) must divide by the {run.world} processes x "
                         f"{accum_steps} accumulation steps")
    return global_batch // (run.world * accum_steps)


def derive_seed(*keys):
    """A 63-bit seed from any tuple of ints and strings: an independent stream per (seed, position)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def seed_host(*keys):
    """Seed Python, NumPy and torch's CPU generator: enough for data augmentation, seeded per sample.
    torch.manual_seed would also seed every accelerator, which costs about 1 ms a call where CUDA is not
    initialised (it queues the call with a traceback): more than augmenting a small image."""
    seed = derive_seed(*keys)
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return seed


def seed_everything(*keys):
    """seed_host, and torch's generators on every device too (drop path and RoI sampling draw there)."""
    torch.manual_seed(seed_host(*keys))


def all_reduce(values, device, op=dist.ReduceOp.SUM):
    """Sum (or max) a list of numbers over ranks; the identity for one process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


def unwrap(model):
    return getattr(model, "module", model)


def data_parallel(model, run):
    if run.world == 1:
        return model
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


# ----------------------------------------------------------------------------------------------
# Flags that every script shares, and the demos


def add_run_args(p, output_help):
    g = p.add_argument_group("run")
    g.add_argument("--output", help=output_help)
    g.add_argument("--resume", help="checkpoint to continue from (default: OUTPUT/checkpoint.pth if present)")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has a checkpoint")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], help="default: bf16 on GPU, off on CPU")
    g.add_argument("--grad-ckpt", action="store_true", help="recompute blocks in backward (less memory)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each backbone block (regional compilation: one block's compile time)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    g.add_argument("--seed", type=int, default=0, help="every random draw derives from it")
    g.add_argument("--log-every", type=int, default=20, help="check the loss and update the progress bar every N")
    return g


def add_dense_task_args(p):
    """The backbone and optimiser flags of the dense tasks (eval_seg.py, eval_det.py)."""
    g = p.add_argument_group("backbone")
    g.add_argument("--model", default="adv_t", help=f"one of {pv.list_models()}")
    g.add_argument("--patch", type=int, default=16, help="patch size; the paper keeps pretraining's")
    for name in ("embed-dim", "depth", "d-state", "num-heads"):
        g.add_argument(f"--{name}", type=int, help="override the backbone's size (small custom models)")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block")
    g.add_argument("--finetune", help="backbone weights (an ImageNet checkpoint; resampled across res/patch)")
    g.add_argument("--layer-decay", type=float, default=1.0,
                   help="lr x decay^(depth + 1 - layer) for the backbone (1.0: none, as the paper states its recipe)")


MODEL_FLAGS = ("--model", "--embed-dim", "--depth", "--num-heads", "--d-state")


def refuse_model_run_without_data(parser, argv, script, data_help):
    """A command that names a model (--model or a size flag) is a real run: without data it stops
    here, instead of silently training that model on the CPU demo's data."""
    argv = sys.argv[1:] if argv is None else argv
    typed = [flag for flag in MODEL_FLAGS if any(a == flag or a.startswith(flag + "=") for a in argv)]
    if typed:
        parser.error(f"{', '.join(typed)} names a model run, which needs --data-path ({data_help}); "
                     f"`python {script}` with no arguments runs the CPU demo")


def parse_with_demo(parser, argv, demo, use_demo):
    """Parse the flags; when use_demo(args) holds (no data given), the demo's values replace the
    defaults. A flag the user typed always wins, whatever its value."""
    args = parser.parse_args(argv)
    if use_demo(args):
        parser.set_defaults(**demo)
        args = parser.parse_args(argv)
    return args


def prepare_demo_data(run, args, write):
    """Point --data-path at OUTPUT/demo_data, written once by rank 0 while the other ranks wait."""
    args.data_path = os.path.join(args.output, "demo_data")
    if run.is_main and not os.path.isdir(args.data_path):
        write(args.data_path)
    if dist.is_initialized():
        dist.barrier()


def jsonable(args):
    """The run's arguments as plain JSON values (checkpoints load with weights_only=True)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}


# ----------------------------------------------------------------------------------------------
# Backbones and optimiser groups


def dense_backbone(args, input_size):
    """A backbone without classifier for a dense task, from --finetune when given.

    Its pos_embed keeps the pretrained grid (the checkpoint's, or `input_size` // patch without one)
    and is resampled once to each input's token grid in the forward pass, as ViTDet does: no
    resolution has to be a multiple of the patch, and nothing is resampled twice."""
    overrides = {k: getattr(args, k) for k in ("embed_dim", "depth", "d_state", "num_heads") if getattr(args, k)}
    grid = max(input_size // args.patch, 1)
    if args.finetune:
        try:
            state = pv.read_state_dict(args.finetune)
        except ValueError as e:
            raise SystemExit(f"--finetune {args.finetune}: {e}") from None
        if "pos_embed" in state:
            grid = max(int((state["pos_embed"].shape[1] - 1) ** 0.5), 1)
    try:
        model = pv.create_model(args.model, patch=args.patch, res=grid * args.patch, num_classes=0,
                                drop_path=args.drop_path, **overrides)
        if args.finetune:
            pv.load_checkpoint(model, state, strict=False)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"cannot build the {args.model} backbone: {e}") from None
    model.set_grad_checkpointing(args.grad_ckpt)
    return model.compile_blocks() if args.compile else model


def param_groups(model, weight_decay, layer_decay):
    """BEiT-style groups as the official code builds them: no weight decay on 1-D parameters and on
    pos_embed / cls_token; lr scale layer_decay ** (depth + 1 - layer), where the tokenizer is layer 0,
    block i is layer i + 1 and the final norm and head are layer depth + 1."""
    depth = len(model.blocks)
    skip = model.no_weight_decay()
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith(("blocks.", "layers.")):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        decay = 0.0 if param.ndim <= 1 or name in skip else weight_decay
        group = groups.setdefault((layer, decay), dict(params=[], weight_decay=decay,
                                                       lr_scale=layer_decay ** (depth + 1 - layer)))
        group["params"].append(param)
    return list(groups.values())


def backbone_and_head_groups(model, backbone, weight_decay, layer_decay):
    """The backbone's layer-wise groups, and the task head (everything else) at the full lr, with no
    weight decay on its norms and biases (mmseg's and mmdet's paramwise rule)."""
    own = {id(p) for p in backbone.parameters()}
    head = [p for p in model.parameters() if id(p) not in own and p.requires_grad]
    return param_groups(backbone, weight_decay, layer_decay) + [
        dict(params=[p for p in head if p.ndim > 1], weight_decay=weight_decay, lr_scale=1.0),
        dict(params=[p for p in head if p.ndim <= 1], weight_decay=0.0, lr_scale=1.0)]


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def backward(loss, scaler):
    (scaler.scale(loss) if scaler else loss).backward()


def optimizer_step(model, optimizer, scaler=None, clip_grad=None):
    """Unscale (fp16), clip, step and clear the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_finite(loss, where, output):
    """Stop every rank together when any rank's loss is not finite (a sum over ranks carries the
    NaN or inf to all of them, so none is left waiting in the next collective)."""
    total = all_reduce([loss.item()], loss.device)[0]
    if not math.isfinite(total):
        raise SystemExit(f"loss is {total} at {where}: stopping. The last good checkpoint in {output} "
                         f"is intact. Try a lower --lr, --clip-grad 1.0, or --amp bf16 instead of fp16.")


# ----------------------------------------------------------------------------------------------
# Checkpoints, logs and results


def save_checkpoint(path, payload):
    """Write to a temporary file and rename: a crash mid-write leaves the previous file intact."""
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def state_dicts(model, optimizer):
    """Full (unsharded, unprefixed) model and optimiser states on CPU, for DDP, FSDP2 or one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training_state(path, run, args, model, optimizer, scaler=None, ema=None, **progress):
    """Everything an exact resume needs: weights, optimiser, loss scaler, EMA, and where the run is.
    Every rank takes part (FSDP gathers), rank 0 writes."""
    model_state, optimizer_state = state_dicts(model, optimizer)
    if run.is_main:
        save_checkpoint(path, dict(model=model_state, optimizer=optimizer_state,
                                   scaler=scaler.state_dict() if scaler else None,
                                   ema=ema.module.state_dict() if ema else None,
                                   args=jsonable(args), **progress))
    return model_state


def load_training_state(path, model, optimizer, scaler=None, ema=None):
    """Restore what save_training_state wrote; returns the checkpoint (its progress entries)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise SystemExit(f"cannot read the checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer"} <= set(ckpt):
        raise SystemExit(f"{path} is not a training checkpoint (expected 'model' and 'optimizer' entries); "
                         f"to initialise from weights use --finetune")
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        ema.module.load_state_dict(ckpt["ema"])
    return ckpt


def resume_path(args):
    """--resume, else the run folder's checkpoint unless --no-resume."""
    latest = os.path.join(args.output, "checkpoint.pth")
    return args.resume or (latest if os.path.exists(latest) and not args.no_resume else None)


def keep_log_lines(path, before, key):
    """Drop the log lines of work that a resumed run will redo (their `key` is >= `before`)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)[key] < before]
        with open(f"{path}.tmp", "w") as f:
            f.writelines(lines)
        os.replace(f"{path}.tmp", path)


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def report(run, args, metrics, **where):
    """One line of OUTPUT/log.jsonl (the scalar metrics) and OUTPUT/results.json (all of them, with
    the flags and the run), on rank 0; returns the results."""
    results = dict(**where, **metrics)
    if run.is_main:
        with open(os.path.join(args.output, "log.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in results.items() if not isinstance(v, (list, dict))}) + "\n")
        write_json(os.path.join(args.output, "results.json"),
                   dict(results, args=jsonable(args), run_state=run.as_dict()))
    return results


def finished_results(run, args):
    """The results of a run that already finished (a re-run of a completed command returns them)."""
    path = os.path.join(args.output, "results.json")
    if run.is_main:
        print(f"{args.output} already finished; its results.json stands")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if k not in ("args", "run_state")}


def evaluate_checkpoint(run, args, model, evaluate):
    """--eval-only: the weights of --resume (or of the run folder's checkpoint) through
    evaluate(model, 0), written to OUTPUT/eval.json, so that a training run's results.json and
    log.jsonl in the same folder stay as they are."""
    weights = resume_path(args)
    if not weights:
        raise SystemExit("--eval-only needs weights: --resume CHECKPOINT, or a run in --output")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
        model.load_state_dict(state)
    except (RuntimeError, EOFError, OSError, KeyError) as e:
        raise SystemExit(f"--resume {weights}: not a checkpoint of this model ({e})") from None
    metrics = dict(evaluate(data_parallel(model, run), 0), weights=weights)
    if run.is_main:
        write_json(os.path.join(args.output, "eval.json"), dict(metrics, args=jsonable(args), run_state=run.as_dict()))
    return metrics


# ----------------------------------------------------------------------------------------------
# Samplers


class Draws(Sampler):
    """An endless stream of epochs, each a seeded permutation, as (draw, index) pairs. Rank r takes
    draws (i * world + r) * batch + j at iteration i, from iteration `start` on: resumable exactly.
    The draw seeds the sample's augmentation, so any number of loader workers gives the same batch."""

    def __init__(self, n, batch, rank, world, seed, start=0):
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start

    def __iter__(self):
        epoch, order = None, None
        for i in range(self.start, 2**62):
            for j in range(self.batch):
                draw = (i * self.world + self.rank) * self.batch + j
                if draw // self.n != epoch:
                    epoch = draw // self.n
                    order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                        derive_seed(self.seed, "order", epoch))).tolist()
                yield draw, order[draw % self.n]


class Shard(Sampler):
    """Every rank-th index, no padding: across ranks each image is evaluated exactly once."""

    def __init__(self, n, rank, world):
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# ----------------------------------------------------------------------------------------------
# The dense tasks' training skeleton


def train_iterations(run, args, model, groups, train_set, loss_of, lr_at, total, evaluate, eval_due,
                     collate_fn=None, betas=(0.9, 0.999)):
    """Build the optimiser, resume, loop over iterations [start, total) and evaluate.

    loss_of(model, batch) -> the task's loss; lr_at(it) -> the lr at iteration it; evaluate(model,
    done) -> metrics, run when eval_due(done) and at the end, before that iteration's checkpoint (so a
    resumed run keeps exactly the log lines up to its checkpoint). Returns the last metrics; a run
    that had already finished returns its results.json."""
    os.makedirs(args.output, exist_ok=True)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=betas)
    scaler = run.grad_scaler()
    latest = os.path.join(args.output, "checkpoint.pth")
    resume = resume_path(args)
    if resume:
        run.start = load_training_state(resume, model, optimizer, scaler)["iter"]
        if run.is_main:
            print(f"resumed from {resume} at iteration {run.start}")
    if run.is_main:  # evaluations after the checkpoint run again; a fresh start drops an old log
        keep_log_lines(os.path.join(args.output, "log.jsonl"), run.start + 1 if resume else 0, key="iter")
    if run.start >= total:
        return finished_results(run, args)
    wrapped = data_parallel(model, run)
    run.micro_batch = micro_batch(args.batch_size, run)
    loader = DataLoader(train_set, batch_size=run.micro_batch, num_workers=args.workers, collate_fn=collate_fn,
                        pin_memory=run.device.type == "cuda",
                        sampler=Draws(len(train_set), run.micro_batch, run.rank, run.world, args.seed, run.start))
    batches, metrics = iter(loader), {}
    bar = tqdm(range(run.start, total), initial=run.start, total=total, disable=not run.is_main, desc="train")
    for it in bar:
        wrapped.train()
        batch = next(batches)
        seed_everything(args.seed, "step", it, run.rank)  # drop path and RoI sampling
        set_lr(optimizer, lr_at(it))
        with run.autocast():
            loss = loss_of(wrapped, batch)
        backward(loss, scaler)
        optimizer_step(wrapped, optimizer, scaler)
        done = it + 1
        if it % args.log_every == 0 or done == total:
            check_finite(loss.detach(), f"iteration {it}", args.output)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(it):.2e}")
        if eval_due(done) or done == total:
            train_loss = all_reduce([loss.item()], run.device)[0] / run.world
            metrics = report(run, args, evaluate(wrapped, done), iter=done, train_loss=train_loss)
        if done % args.save_every == 0 or done == total:
            save_training_state(latest, run, args, wrapped, optimizer, scaler, iter=done)
    return metrics
