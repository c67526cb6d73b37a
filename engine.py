"""The run plumbing that train.py, eval_seg.py and eval_det.py share, as MAE's engine files serve its
scripts: processes and precision (`Run`), seeds that make every random draw a function of where the
run is, the resumable samplers, optimiser groups with layer decay, checkpoints, logs and results, and
the training-step benchmark. These are leaf helpers: each takes what it uses as arguments, and none
reads a script's settings. Each script resolves its flags once into a frozen settings object and runs
its own loop, in plain view, over these.

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
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

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
    replica: int = 0              # data parallelism: which copy of the model this rank's images feed,
    replicas: int = 1             # and how many there are (the world over --context-parallel)
    context_group: object = None  # the ranks that share each image's tokens (None: whole images)
    micro_batch: int = 0          # images per process per forward pass
    start: int = 0                # iterations (or optimiser steps) already done when the run started
    steps_per_epoch: int = 0
    warned_skip: bool = False     # train.py: unreadable images were reported once

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def counts_its_images(self):
        """Whether this rank's results count: one rank of each context-parallel group, every rank
        without context parallelism (the ranks of a group all compute the same logits)."""
        return self.context_group is None or dist.get_rank(self.context_group) == 0

    @property
    def amp_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[self.amp]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def grad_scaler(self):
        """fp16 needs loss scaling; bf16 and float32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

    def as_dict(self):
        return dict(rank=self.rank, world=self.world, replicas=self.replicas, device=str(self.device), amp=self.amp,
                    micro_batch=self.micro_batch, start=self.start, steps_per_epoch=self.steps_per_epoch)


def setup(amp=None):
    """Join the torchrun process group (or run as a world of one) and resolve the precision
    (`amp`: "bf16", "fp16", "off", or None for bf16 on GPU and off on CPU)."""
    if "RANK" not in os.environ:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=attempt_store(world), rank=rank,
                                world_size=world, device_id=device if device.type == "cuda" else None)
    return Run(rank=rank, world=world, replica=rank, replicas=world, device=device,
               amp=amp or ("bf16" if device.type == "cuda" else "off"))


def context_parallel(run, size, script):
    """Split the world into a 2-D mesh, data parallel x context parallel (`size` consecutive ranks
    share each image), and set the run's replica, replicas and context group."""
    if size < 1:
        raise SystemExit(f"{script}: --context-parallel {size} must be at least 1")
    if size == 1:
        return run
    if not dist.is_initialized():
        raise SystemExit(f"{script}: --context-parallel {size} splits each image over {size} processes: "
                         f"launch with torchrun --nproc_per_node N (N a multiple of {size})")
    if run.world % size:
        raise SystemExit(f"{script}: --context-parallel {size} must divide the {run.world} processes")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(run.device.type, (run.world // size, size), mesh_dim_names=("data", "context"))
    run.replica, run.replicas = mesh.get_local_rank("data"), run.world // size
    run.context_group = mesh.get_group("context")
    return run


def share_images(backbone, run, script):
    """Give a pixelvit backbone the run's context-parallel group (a no-op without one); a model or
    input that cannot be split over it stops with the reason."""
    try:
        backbone.set_context_parallel(run.context_group)
    except ValueError as e:
        raise SystemExit(f"{script}: --context-parallel: {e}") from None


def attempt_store(world):
    """torchrun's key-value store, its keys kept apart per start of the workers. After `--max-restarts`
    restarts them, a store that lives on (torchrun's static rendezvous) still holds the previous
    workers' keys, among them the dead processes' gloo addresses, which the new ones would try to
    connect to. Each worker counts itself in once, so the `world` workers of one start agree on its
    number without relying on each node's own restart counter."""
    from torch.distributed.rendezvous import rendezvous
    store, _, _ = next(rendezvous("env://"))
    start = (store.add("pixelvit/workers_started", 1) - 1) // world
    return dist.PrefixStore(f"pixelvit/start_{start}", store)


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def micro_batch(global_batch, run, accum_steps=1):
    """Images per process per forward pass; --batch-size is the global batch, as in the paper."""
    if accum_steps < 1 or global_batch < 1:
        raise SystemExit(f"--batch-size {global_batch} and --accum-steps {accum_steps} must be at least 1")
    if global_batch % (run.replicas * accum_steps):
        raise SystemExit(f"--batch-size {global_batch} (global) must divide by the {run.replicas} data-parallel "
                         f"processes x {accum_steps} accumulation steps")
    return global_batch // (run.replicas * accum_steps)


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
    # with context parallelism the CLS token has no gradient on the ranks that do not hold it
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=run.context_group is not None)


# ----------------------------------------------------------------------------------------------
# Flags that every script shares (one flag, one meaning), and the demos


def add_run_args(p, output_help):
    """The run's flags, the same in the three scripts. Flags whose default a script's recipe sets
    (--save-every, --batch-size) are added by the script itself, with that default in their help."""
    g = p.add_argument_group("run")
    g.add_argument("--output", help=output_help)
    g.add_argument("--resume", help="checkpoint to continue from (default: OUTPUT/checkpoint.pth if present)")
    g.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has a checkpoint")
    g.add_argument("--finetune", help="initialise the backbone from these weights (resampled across res/patch)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --resume's weights (else the run folder's checkpoint) into OUTPUT/eval.json; "
                        "no training")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="micro-batches per optimiser step; --batch-size stays the global batch")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], help="default: bf16 on GPU, off on CPU")
    g.add_argument("--grad-ckpt", action="store_true", help="recompute blocks in backward (less memory)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each backbone block (regional compilation: one block's compile time)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    g.add_argument("--seed", type=int, default=0, help="every random draw derives from it")
    g.add_argument("--log-every", type=int, default=20,
                   help="check the loss and update the progress bar every N optimiser steps")
    g.add_argument("--context-parallel", type=int, default=1,
                   help="processes that share each image's tokens (a 2-D mesh: data parallel x context "
                        "parallel, consecutive ranks per image), for inputs one GPU cannot hold; needs torchrun")
    return g


def add_dense_task_args(p):
    """The backbone flags of the dense tasks (eval_seg.py, eval_det.py); None: the recipe's value."""
    g = p.add_argument_group("backbone")
    g.add_argument("--model", help=f"one of {pv.list_models()} (default: adv_t)")
    g.add_argument("--patch", type=int, help="patch size; the paper keeps pretraining's (default: 16, demo: 4)")
    for name in ("embed-dim", "depth", "d-state", "num-heads"):
        g.add_argument(f"--{name}", type=int, help="override the backbone's size (small custom models)")
    g.add_argument("--drop-path", type=float, help="stochastic depth of the last block (default: 0.1)")
    g.add_argument("--layer-decay", type=float,
                   help="lr x decay^(depth + 1 - layer) for the backbone (1.0: none, as the paper states its recipe)")


@dataclass(frozen=True)
class RunSettings:
    """The settings of `add_run_args`' flags, which every script's frozen settings extend."""
    output: str
    resume: str | None
    no_resume: bool
    finetune: str | None
    eval_only: bool
    accum_steps: int
    amp: str | None
    grad_ckpt: bool
    compile: bool
    workers: int
    seed: int
    log_every: int
    context_parallel: int


@dataclass(frozen=True)
class DenseTaskSettings(RunSettings):
    """The run's settings and those of `add_dense_task_args`' backbone flags, which SegConfig and
    DetConfig extend."""
    model: str
    patch: int
    embed_dim: int | None
    depth: int | None
    d_state: int | None
    num_heads: int | None
    drop_path: float
    layer_decay: float


MODEL_FLAGS = ("model", "embed_dim", "depth", "num_heads", "d_state")


def refuse_model_run_without_data(flags, script, data_help):
    """A command that names a model (--model or a size flag) is a real run: without data it stops
    here (exit status 2, as argparse's errors), instead of silently training that model on the
    CPU demo's data. `flags`: the parsed flags as a dict, None where not typed."""
    typed = ["--" + name.replace("_", "-") for name in MODEL_FLAGS if flags.get(name) is not None]
    if typed:
        flag_error(script, f"{', '.join(typed)} names a model run, which needs --data-path ({data_help}); "
                           f"`python {script}` with no arguments runs the CPU demo")


def flag_error(script, message):
    """Stop on flags that do not go together, as argparse's own errors do."""
    print(f"{script}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def merge_recipe(flags, *recipes):
    """Each setting from the flags where typed (not None), else from the first recipe that has it;
    a setting that no flag sets comes from the first recipe that has it."""
    merged = dict(flags)
    for key in merged:
        if merged[key] is None:
            merged[key] = next((recipe[key] for recipe in recipes if recipe.get(key) is not None), None)
    for recipe in recipes:  # settings that have no flag of their own
        merged.update({k: v for k, v in recipe.items() if k not in merged})
    return merged


def settings_of(cls, values):
    """The frozen settings `cls` from a dict holding (at least) every one of its fields."""
    missing = [f.name for f in fields(cls) if f.name not in values]
    if missing:
        raise TypeError(f"{cls.__name__}: no value resolved for {missing}")
    return cls(**{f.name: values[f.name] for f in fields(cls)})


def write_demo_data(run, path, write):
    """Write a demo's data set to `path` once (rank 0, while the other ranks wait)."""
    if run.is_main and not os.path.isdir(path):
        write(path)
    if dist.is_initialized():
        dist.barrier()


def jsonable(settings):
    """A run's frozen settings as plain JSON values (checkpoints load with weights_only=True)."""
    return asdict(settings)


# ----------------------------------------------------------------------------------------------
# Backbones and optimiser groups


def dense_backbone(model, patch, input_size, drop_path, finetune=None, grad_ckpt=False, compile=False, **overrides):
    """A backbone without classifier for a dense task, from the `finetune` weights when given.

    Its pos_embed keeps the pretrained grid (the checkpoint's, or `input_size` // patch without one)
    and is resampled once to each input's token grid in the forward pass, as ViTDet does: no
    resolution has to be a multiple of the patch, and nothing is resampled twice. `overrides`: the
    size flags that were given (embed_dim, depth, d_state, num_heads)."""
    overrides = {k: v for k, v in overrides.items() if v}
    grid = max(input_size // patch, 1)
    if finetune:
        try:
            state = pv.read_state_dict(finetune)
        except ValueError as e:
            raise SystemExit(f"--finetune {finetune}: {e}") from None
        if "pos_embed" in state:
            grid = max(int((state["pos_embed"].shape[1] - 1) ** 0.5), 1)
    try:
        backbone = pv.create_model(model, patch=patch, res=grid * patch, num_classes=0, drop_path=drop_path,
                                   **overrides)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"cannot build the {model} backbone: {e}") from None
    if finetune:
        try:
            pv.load_checkpoint(backbone, state, strict=False)
        except ValueError:
            weights_misfit(os.path.basename(sys.argv[0]), "--finetune", finetune, backbone)
    backbone.set_grad_checkpointing(grad_ckpt)
    return backbone.compile_blocks() if compile else backbone


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


def gradient_sync(model, sync):
    """DDP averages gradients over ranks in backward; between the micro-batches of one optimiser
    step it need not (sync=False), only after the last (sync=True)."""
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


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


def check_finite(loss, where, output, remedies="a lower --lr, or --amp bf16 instead of fp16"):
    """Stop every rank together when any rank's loss is not finite (a sum over ranks carries the
    NaN or inf to all of them, so none is left waiting in the next collective). `remedies` names
    only flags that the calling script has."""
    total = all_reduce([loss.item()], loss.device)[0]
    if not math.isfinite(total):
        raise SystemExit(f"loss is {total} at {where}: stopping. The last good checkpoint in {output} "
                         f"is intact. Try {remedies}.")


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


def save_training_state(path, run, settings, model, optimizer, scaler=None, ema=None, **progress):
    """Everything an exact resume needs: weights, optimiser, loss scaler, EMA, and where the run is
    (`progress`), with the run's settings for the record. Every rank takes part (FSDP gathers), rank 0
    writes. Returns the full model state."""
    model_state, optimizer_state = state_dicts(model, optimizer)
    if run.is_main:
        save_checkpoint(path, dict(model=model_state, optimizer=optimizer_state,
                                   scaler=scaler.state_dict() if scaler else None,
                                   ema=ema.module.state_dict() if ema else None,
                                   args=jsonable(settings), **progress))
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


def resume_path(output, resume=None, no_resume=False):
    """--resume, else the run folder's checkpoint unless --no-resume."""
    latest = os.path.join(output, "checkpoint.pth")
    return resume or (latest if os.path.exists(latest) and not no_resume else None)


# ----------------------------------------------------------------------------------------------
# One folder, one run: a run is continued, or its results returned, only with the settings it was
# made with. These settings change how a run executes, not what it computes, and may differ:
EXECUTION_SETTINGS = {
    "output": "the folder holds the run; a checkpoint resumed from elsewhere continues the same run",
    "resume": "which checkpoint continues the run",
    "no_resume": "set, there is nothing to compare: the run starts over",
    "eval_only": "evaluates weights and trains nothing",
    "workers": "loader processes: every draw is a function of (seed, epoch, step), not of the loader",
    "log_every": "how often the loss is printed and checked",
    "compile": "compiled blocks compute the same functions, to float rounding",
    "save_every": "when checkpoints are written",
    "eval_every": "when the validation set is scored: evaluating changes no draw of training",
    "accum_steps": "how the global batch is cut into micro-batches, as a change of GPU count also does (resuming "
                   "on fewer GPUs takes more; BatchNorm heads then see other micro-batch statistics)",
    "context_parallel": "how each image's tokens are shared by processes: the same numbers, tested to rounding",
    "grad_ckpt": "recomputing blocks in the backward pass gives the same gradients",
    "fsdp": "sharded parameters take the same updates",
    "data_path": "where the data is: a dataset moved or mounted elsewhere is the same data",
    "data_root": "where a bundled data set is kept",
    "download": "whether torchvision may fetch a missing data set",
    "ann_file": "where the validation annotations are",
    "img_dir": "where the validation images are",
    "visualize": "drawings of validation images",
    "save_predictions": "where predictions are written",
    "eval_results": "a results file scored without a model, no training",
    "benchmark": "times steps on synthetic input, in no run folder",
    "benchmark_steps": "how many steps --benchmark times",
}


def _comparable(value):
    return json.loads(json.dumps(value))   # tuples and lists alike, as in the JSON records


def recorded_settings(path):
    """The settings a checkpoint or a results.json was written with (None where none are recorded).
    A checkpoint is mapped, not read: only its small entries are touched."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return json.load(f).get("args")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise SystemExit(f"cannot read {path}: {e}") from None
    return ckpt.get("args") if isinstance(ckpt, dict) else None


def differing_settings(recorded, settings):
    """{name: (recorded, now)} for every result-deciding setting that differs."""
    now = _comparable(jsonable(settings))
    recorded = _comparable(recorded)
    missing = "(not recorded)"
    return {k: (recorded.get(k, missing), now.get(k, missing)) for k in sorted(set(now) | set(recorded))
            if k not in EXECUTION_SETTINGS and recorded.get(k, missing) != now.get(k, missing)}


def check_same_run(script, settings):
    """Stop with exit status 2, before anything in the run folder changes, when the run that would be
    resumed (--resume's checkpoint, else the folder's, else its results.json) was made with other
    result-deciding settings; --no-resume instead starts over in the folder and says so. --eval-only
    trains nothing and writes its own eval.json: there is nothing to compare."""
    if settings.eval_only:
        return
    output = settings.output
    resume = resume_path(output, settings.resume, settings.no_resume)
    results = os.path.join(output, "results.json")
    if settings.no_resume:
        if os.path.exists(results) or os.path.exists(os.path.join(output, "checkpoint.pth")):
            print(f"--no-resume: starting over in {output}; the run there before is replaced")
        return
    previous = resume or (results if os.path.exists(results) else None)
    recorded = recorded_settings(previous) if previous else None
    if recorded is None:
        return
    differences = differing_settings(recorded, settings)
    if differences:
        named = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differences.items())
        flag_error(script, f"{previous} holds a run with other settings: {named}. A run folder holds one run "
                           f"(docs/training.md, Resuming): give this one its own --output, or add --no-resume to "
                           f"start over in {output}, replacing the run there")


def describe_weights(path):
    """What model a checkpoint holds, read off its shapes: 'adv_t at patch 2, 16 px (width 64, depth 4,
    10 classes)'; a width and depth that no Table 7 model has are given as they are."""
    state = pv.read_state_dict(path)
    tokenizer = next((k for k in state if k.endswith("patch_embed.proj.weight")), None)
    if tokenizer is None:
        return "no DeiT or Adventurer weights"
    within = tokenizer[:-len("patch_embed.proj.weight")]     # a dense model's backbone: "backbone.", ...
    state = {k[len(within):]: v for k, v in state.items() if k.startswith(within)}
    if "pos_embed" not in state:
        return "no DeiT or Adventurer weights"
    prefix = "layers." if any(k.startswith("layers.") for k in state) else "blocks."
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith(prefix)), default=-1)
    try:
        args = pv.infer_model_args(state)
        name, res, classes = args["name"], args["res"], args["num_classes"]
    except ValueError:
        name = "an Adventurer" if prefix == "layers." else "a DeiT"
        res = math.isqrt(state["pos_embed"].shape[1] - 1) * patch
        classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    classes = f", {classes} classes" if classes else ""
    return f"{name} at patch {patch}, {res} px (width {width}, depth {depth}{classes})"


def describe_model(model):
    """'adv_t at patch 2, 16 px (width 64, depth 4, 10 classes)'; a dense task's backbone, which takes any
    input size, as 'an adv_t backbone at patch 2 (width 64, depth 4)'."""
    cfg = model.cfg
    if not cfg.num_classes:
        article = "an" if model.name[0] in "aeiou" else "a"
        return f"{article} {model.name} backbone at patch {cfg.patch} (width {cfg.embed_dim}, depth {cfg.depth})"
    return (f"{model.name} at patch {cfg.patch}, {cfg.res} px (width {cfg.embed_dim}, depth {cfg.depth}, "
            f"{cfg.num_classes} classes)")


def run_folder(base, settings, reference, named):
    """runs/<base>, then the result-deciding settings that differ from the recipe's (`reference`), as
    flags and values: runs/adv_t_p2_16_demo_embed-dim-32_lr-0.01, so that a sweep without --output gives
    each run a folder of its own. Past 60 characters the differences are a digest of them instead.
    `named`: the settings that `base` already names."""
    def text(key, value):
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            return flag if value else f"no-{flag}"
        if isinstance(value, float):
            return f"{flag}-{value:g}"
        if isinstance(value, list):
            return f"{flag}-" + "-".join(str(v) for v in value)
        return f"{flag}-{value}".replace(os.sep, "-")
    now, reference = _comparable(settings), _comparable(reference)
    parts = [text(k, now[k]) for k in sorted(now) if k not in EXECUTION_SETTINGS and k not in named
             and k in reference and now[k] != reference[k]]
    suffix = "_".join(parts)
    if len(suffix) > 60:
        suffix = hashlib.sha1(suffix.encode()).hexdigest()[:10]
    return os.path.join("runs", f"{base}_{suffix}" if suffix else base)


def weights_misfit(script, flag, path, model):
    """Stop with a short message (exit status 2) for weights that do not fit the model asked for."""
    flag_error(script, f"{flag} {path} holds {describe_weights(path)}, which does not fit the model asked for, "
                       f"{describe_model(model)}: name the file's model with --model, --patch, --embed-dim, "
                       f"--depth, --d-state or --num-heads, or give weights of this model")


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


def report(run, output, settings, metrics, **where):
    """One line of OUTPUT/log.jsonl (the scalar metrics) and OUTPUT/results.json (all of them, with
    the settings and the run), on rank 0; returns the results."""
    results = dict(**where, **metrics)
    if run.is_main:
        with open(os.path.join(output, "log.jsonl"), "a") as f:
            f.write(json.dumps({k: v for k, v in results.items() if not isinstance(v, (list, dict))}) + "\n")
        write_json(os.path.join(output, "results.json"),
                   dict(results, args=jsonable(settings), run_state=run.as_dict()))
    return results


def write_eval(run, output, settings, metrics):
    """--eval-only's results: OUTPUT/eval.json, so that a training run's results.json and log.jsonl in
    the same folder stay as they are."""
    if run.is_main:
        write_json(os.path.join(output, "eval.json"), dict(metrics, args=jsonable(settings), run_state=run.as_dict()))
    return metrics


def finished_results(run, output):
    """The results of a run that already finished (a re-run of a completed command returns them)."""
    path = os.path.join(output, "results.json")
    if run.is_main:
        print(f"{output} already finished; its results.json stands")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if k not in ("args", "run_state")}


def load_model_weights(model, path, script, backbone):
    """The 'model' entry of a checkpoint into `model`, with an error that names the file, and for weights
    of another model, what the file holds (`backbone`: the pixelvit model inside `model`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except (RuntimeError, EOFError, OSError, KeyError) as e:
        raise SystemExit(f"--resume {path}: not a checkpoint ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError:   # keys or shapes of another model
        weights_misfit(script, "--resume", path, backbone)


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


def draw_loader(dataset, micro_batch, run, seed, start, workers, collate_fn=None):
    """The endless training loader of an iteration-based task: `Draws` from micro-step `start` on."""
    return DataLoader(dataset, batch_size=micro_batch, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=run.device.type == "cuda",
                      sampler=Draws(len(dataset), micro_batch, run.replica, run.replicas, seed, start))


# ----------------------------------------------------------------------------------------------
# The training-step benchmark (paper Table 6), shared by train.py --benchmark and tests/benchmark.py


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


def benchmark_training(model, batch_size, steps, run, compile=False):
    """Warmed-up training steps of a classifier on synthetic input at its own resolution: speed,
    memory per image, analytic TFLOP/s and MFU, as a dict. Memory on a GPU is the allocator's peak
    minus what was allocated before the step; on CPU it is what autograd saves for backward."""
    device, res = run.device, model.cfg.res
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, res, res, device=device)
    labels = torch.randint(0, model.cfg.num_classes, (batch_size,), device=device)
    if compile:
        model.compile_blocks()

    def step():
        with run.autocast():
            loss = nn.functional.cross_entropy(model(images), labels)
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
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        memory, measure = torch.cuda.max_memory_allocated() - static, "peak allocated"
    elif compile:  # hooks on saved tensors would recompile every graph: see the eager rows
        memory, measure = None, "not measured (compiled, CPU)"
    else:  # no allocator statistics on CPU: count what autograd keeps for the backward pass
        memory, measure = saved_activation_bytes(step, model.parameters()), "saved for backward"
    flops = 3 * model.estimate_flops(res) * batch_size / seconds  # training = 3x forward
    return dict(patch=model.cfg.patch, res=res, tokens=(res // model.cfg.patch * model.cfg.extend) ** 2,
                batch=batch_size, dtype=str(run.amp_dtype or torch.float32).replace("torch.", ""),
                grad_ckpt=model.grad_checkpointing, device=name,
                backends=sorted(set(pv.backends(model)["mixers"].values())),
                images_per_s=batch_size / seconds, step_ms=1e3 * seconds,
                memory_mb_per_image=None if memory is None else memory / 2**20 / batch_size,
                memory_measure=measure, tflops=flops / 1e12, flops_count="analytic",
                mfu=model.estimate_mfu(batch_size / seconds, res, name))
