"""Speed, memory and accuracy of pixelvit's paths, printed as tables (a benchmark, not a test).

    python tests/benchmark.py                             # CPU: every section at CPU sizes
    python tests/benchmark.py --res 224 --batch 8 --amp   # GPU: the paper's setting

1. SSD: `ssd_chunked` against the token-by-token recurrence at 4,096 tokens.
2. Linearity: forward+backward per 1,000 tokens at 4,096 and at 50,176 tokens (224 px at patch 1)
   for `ssd_chunked` and for one Adventurer-T block, with system time as a fraction of user time
   (page faults: memory mapped afresh from the OS).
3. Peers (benchmark extras, never requirements; a column is skipped with a note when absent): the
   mixer against transformers' Mamba-2 PyTorch path, and `ssd_chunked` against mamba-ssm's
   `ssd_minimal_discrete`, read from a mamba-ssm sdist (`pip download --no-deps --no-binary :all:
   mamba-ssm -d sdists`) without importing the package, which needs CUDA.
4. bf16 autocast: the SSD's error against float64, forward and every gradient.
5. `train.py --benchmark` for adv_t and deit_t at every patch size: training images/s and memory per
   image. Memory on a GPU is the allocator's peak minus what was allocated before the step; on CPU
   it is the bytes that autograd saves for the backward pass (parameters excluded), which is what
   grows with the number of tokens. `--compile` adds torch.compile rows.
6. `--table6` (GPU): the paper's Table 6 for DeiT-B and Adventurer-B at 224 px, patch 16 to 1: images/s,
   memory per image, GPU-hours per ImageNet epoch, TFLOP/s and MFU, kernels and PyTorch paths side
   by side, bf16 and fp16, next to the paper's A100 figures. Adventurer-B first (kernels, then the
   PyTorch path), then DeiT-B, each configuration in a subprocess; every row's error is recorded
   (out of memory as such), rows past `--time-budget` say so, and --json is written row by row.
7. Operations: the aten operations that one 224 px image dispatches through Adventurer-B, forward
   without grad and forward + backward, at patches 16 to 1, in both plans of the PyTorch Mamba-2
   path, counted on the meta device (no GPU needed): on an accelerator each is a kernel launch.
   Goal: in the accelerator plan, patch 1 within 5x the operations of patch 16. DeiT-B at patch 16
   for scale.
8. `--context-parallel` (section 8): one image's pixel tokens split over 1, 2 and 4 processes (gloo on
   CPU, NCCL on GPUs), each run under torchrun: saved activation bytes per rank, step time, and bytes
   each rank sends per training step through the exchanges. CPU: Adventurer-T at 64 px, patch 1 (4,096
   tokens); GPU: Adventurer-B at 448 px (200,704 tokens), bf16. Then Adventurer-B's saved bytes per
   token (bf16, --grad-ckpt, measured here at 4,096 tokens) and the largest patch-1 input whose saved
   activations fit 80 GB GPUs, per number of GPUs sharing an image.
"""
import argparse
import glob
import importlib.metadata
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import tarfile
import threading
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import pixelvit as pv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADV_T = dict(heads=8, headdim=64, d_state=64, dim=256)   # Adventurer-T's mixer
IMAGENET_TRAIN_IMAGES = 1_281_167
# Paper Table 6: GPU-hours per ImageNet epoch on A100-80GB, fp16, FlashAttention for DeiT.
PAPER_TABLE6 = {16: dict(deit_b=0.36, adv_b=0.45), 8: dict(deit_b=1.86, adv_b=1.76),
                4: dict(deit_b=9.79, adv_b=6.86), 2: dict(deit_b=80.06, adv_b=27.45),
                1: dict(deit_b=967.99, adv_b=115.08)}
# Images per step for Table 6: about a quarter of what fits an 80 GB GPU at the paper's ~0.32 MB
# of activations per token, so that both paths fit; throughput has saturated well before.
TABLE6_BATCH = {16: 128, 8: 32, 4: 8, 2: 2, 1: 1}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, device, warmup, iters):
    """Best seconds per call of each function, and its system/user CPU time ratio, after warm-up
    (which also runs Triton autotuning). The functions take turns, so that load from other
    processes on a shared machine hits all of them alike; the best of several runs is the least
    disturbed one."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [(float("inf"), 0.0)] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            synchronize(device)
            usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            synchronize(device)
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            system = (after.ru_stime - usage.ru_stime) / max(after.ru_utime - usage.ru_utime, 1e-9)
            best[i] = min(best[i], (seconds, system))
    return best


def ssd_inputs(length, device, heads=ADV_T["heads"], headdim=ADV_T["headdim"], d_state=ADV_T["d_state"],
               dtype=torch.float32, seed=0):
    """Inputs in the ranges Adventurer's init produces: dt in [1e-3, 0.1], A in [-16, -1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, heads, headdim, generator=gen)
    dt = 1e-3 + 0.1 * torch.rand(1, length, heads, generator=gen)
    A = -(1 + 15 * torch.rand(heads, generator=gen))
    B, C = torch.randn(2, 1, length, 1, d_state, generator=gen).unbind(0)
    return [t.to(device, dtype) for t in (x, dt, A, B, C)]


def forward_backward(fn, inputs):
    """A call that runs fn(*inputs) and its backward, for inputs that require grad."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    return lambda: fn(*inputs).sum().backward()


def bench_ssd(device, length=4096):
    """Chunked SSD vs the recurrence, forward and forward+backward, Adventurer-T mixer sizes."""
    inputs = ssd_inputs(length, device)
    chunked = lambda *a: pv.ssd_chunked(*a, chunk_size=pv.scan_plan(device).chunk)   # noqa: E731
    fwd = timed([lambda: chunked(*inputs), lambda: pv.ssd_recurrent(*inputs)], device, 1, 5)
    both = timed([forward_backward(chunked, inputs), forward_backward(pv.ssd_recurrent, inputs)], device, 1, 3)
    rows = [dict(ssd="chunked", tokens=length, fwd_ms=1e3 * fwd[0][0], fwd_bwd_ms=1e3 * both[0][0]),
            dict(ssd="token loop", tokens=length, fwd_ms=1e3 * fwd[1][0], fwd_bwd_ms=1e3 * both[1][0])]
    return rows + [dict(ssd="speed-up", tokens=length, fwd_ms=fwd[1][0] / fwd[0][0],
                        fwd_bwd_ms=both[1][0] / both[0][0])]


def adventurer_block(device, dim):
    torch.manual_seed(0)
    return pv.create_model("adv_t", embed_dim=dim, depth=1).layers[0].to(device)


def bench_linearity(device, lengths=(4096, 50176)):
    """Forward+backward per 1,000 tokens at each length, batch 1, float32: ssd_chunked and one
    Adventurer-T block. The ratio to the first length is the goal (flat: 1.0)."""
    block = adventurer_block(device, ADV_T["dim"])
    cases = {"ssd_chunked": lambda n: forward_backward(
                 lambda *a: pv.ssd_chunked(*a, chunk_size=pv.scan_plan(device).chunk), ssd_inputs(n, device)),
             "Adventurer-T block": lambda n: forward_backward(
                 block, [torch.randn(1, n + 1, ADV_T["dim"], device=device)])}
    rows = []
    for name, make in cases.items():
        first = None
        for n in lengths:
            (seconds, system), = timed([make(n)], device, 1, 3)
            per_1k = 1e6 * seconds / n
            first = first or per_1k
            rows.append(dict(what=name, tokens=n, ms_per_1k_tokens=per_1k, sys_per_user=system,
                             ratio=per_1k / first))
    return rows


def transformers_mixer(mixer):
    """transformers' Mamba2Mixer with our mixer's weights (same parameter names), or None."""
    try:
        from transformers import Mamba2Config
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    except ImportError:
        return None
    config = Mamba2Config(hidden_size=mixer.out_proj.out_features, num_heads=mixer.nheads,
                          head_dim=mixer.headdim, expand=2, state_size=mixer.d_state,
                          n_groups=mixer.ngroups, conv_kernel=mixer.conv1d.kernel_size[0],
                          chunk_size=256, use_bias=False, use_conv_bias=True, num_hidden_layers=1,
                          layer_norm_epsilon=mixer.norm.eps)
    theirs = Mamba2Mixer(config, 0).to(mixer.in_proj.weight.device)
    theirs.load_state_dict(mixer.state_dict())
    return theirs


def mamba_ssm_minimal(sdist_dir):
    """mamba-ssm's `ssd_minimal_discrete`, executed from the source in an sdist, or None.
    (Importing mamba_ssm needs CUDA; this one function needs only torch and einops.)"""
    for path in sorted(glob.glob(os.path.join(sdist_dir, "mamba_ssm-*.tar.gz"))):
        with tarfile.open(path) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("modules/ssd_minimal.py")), None)
            source = tar.extractfile(member).read().decode() if member else None
        if source is None:
            continue
        source = "\n".join(line for line in source.splitlines() if not line.startswith("from mamba_ssm"))
        namespace = {}
        try:
            exec(compile(source, f"{path}:ssd_minimal.py", "exec"), namespace)
        except ImportError:   # einops
            return None
        return namespace["ssd_minimal_discrete"]
    return None


def bench_peers(device, lengths, sdist_dir):
    """Time of each peer over ours (> 1: ours is faster), forward+backward, batch 1, float32."""
    notes = []
    torch.manual_seed(0)
    ours = pv.Mamba2Mixer(ADV_T["dim"], d_state=ADV_T["d_state"], headdim=ADV_T["headdim"]).to(device)
    theirs = transformers_mixer(ours)
    if theirs is None:
        notes.append("transformers is not installed: its column is skipped (pip install transformers)")
    minimal = mamba_ssm_minimal(sdist_dir)
    if minimal is None:
        notes.append(f"no mamba-ssm sdist in {sdist_dir} (or einops missing): the ssd_minimal_discrete "
                     f"column is skipped (pip download --no-deps --no-binary :all: mamba-ssm -d {sdist_dir})")
    rows = []
    for n in lengths:
        row = dict(tokens=n)
        u = torch.randn(1, n, ADV_T["dim"], device=device)
        if theirs is not None:
            with torch.no_grad():
                row["transformers_max_diff"] = (ours(u) - theirs(u)).abs().max().item()
            (mine, _), (other, _) = timed([forward_backward(ours, [u]), forward_backward(theirs, [u])], device, 1, 2)
            row.update(mixer_ms=1e3 * mine, transformers_ms=1e3 * other, transformers_over_ours=other / mine)
        if minimal is not None and n % 256 == 0:   # its chunks must divide the length
            x, dt, A, B, C = ssd_inputs(n, device)
            mine_fn = lambda x, dt, B, C, A=A: pv.ssd_chunked(x, dt, A, B, C, pv.scan_plan(device).chunk)   # noqa: E731
            # mamba-ssm's form: X = x dt, A dt per step, B and C per head; its chunk 256 is Mamba2's default
            minimal_fn = lambda x, dt, B, C, A=A: minimal(   # noqa: E731
                x * dt[..., None], A * dt, B.expand(-1, -1, A.shape[0], -1), C.expand(-1, -1, A.shape[0], -1), 256)[0]
            (mine, _), (other, _) = timed([forward_backward(mine_fn, [x, dt, B, C]),
                                           forward_backward(minimal_fn, [x, dt, B, C])], device, 1, 2)
            row.update(ssd_ms=1e3 * mine, minimal_ms=1e3 * other, minimal_over_ours=other / mine)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, notes


def bench_bf16(device, length=4096):
    """The SSD under bf16 autocast (matrix products in bf16, decays and the state passing in
    float32) and in float32, each against float64 on the same (bf16-rounded) inputs. Errors are
    relative to the largest reference value; `within` is the share of elements inside mamba-ssm's
    own kernel-test tolerance, allclose(rtol=1e-2, atol=3e-3 x that largest value)."""
    x, dt, A, B, C = ssd_inputs(length, device)
    x, B, C = (t.bfloat16().float() for t in (x, B, C))   # activations as bf16 training hands them over
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def outputs(dtype, autocast):
        inputs = [t.to(dtype).requires_grad_(True) for t in (x, dt, A, B, C)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = pv.ssd_chunked(*inputs, chunk_size=pv.scan_plan(device).chunk)
        grads = torch.autograd.grad((y.to(dtype) * weights.to(dtype)).sum(), inputs)
        return dict(zip(["y", "dx", "ddt", "dA", "dB", "dC"], (t.double() for t in (y, *grads))))

    reference = outputs(torch.float64, False)
    rows = []
    for name, result in [("float32", outputs(torch.float32, False)), ("bf16 autocast", outputs(torch.float32, True))]:
        row = dict(ssd=name)
        for key, value in result.items():
            scale, error = reference[key].abs().max(), (value - reference[key]).abs()
            row[f"{key}_err"] = (error.max() / scale).item()
            row[f"{key}_within"] = (error <= 3e-3 * scale + 1e-2 * reference[key].abs()).double().mean().item()
        rows.append(row)
    return rows


def benchmark_row(model, patch, res, batch, steps, amp, grad_ckpt=False, compile=False):
    """What `train.py --benchmark` prints for these flags: the same model, through the same harness
    (`engine.benchmark_training`)."""
    classifier = pv.create_model(model, patch=patch, res=res, num_classes=1000)
    classifier.set_grad_checkpointing(grad_ckpt)
    return dict(model=model, **engine.benchmark_training(classifier, batch, steps, engine.setup(amp), compile))


def bench_models(args):
    rows = []
    runs = [(m, p, False) for m in args.models for p in args.patches]
    runs += [("adv_t", p, True) for p in args.patches if args.compile]
    for model_name, patch, compiled in runs:
        row = benchmark_row(model_name, patch, args.res, args.batch, args.steps, "bf16" if args.amp else "off",
                            args.grad_ckpt, compiled)
        row["compiled"] = compiled
        if row["memory_mb_per_image"] is not None:
            row["kb_per_token"] = row["memory_mb_per_image"] * 1024 / row["tokens"]
        rows.append(row)
    return rows


def memory_ratios(rows):
    """Saved activation memory of adv_t over deit_t at each patch size (goal: at most 2.5)."""
    memory = {(r["model"], r["patch"], r["compiled"]): r for r in rows}
    return [dict(patch=p, tokens=r["tokens"], adv_t_over_deit_t_memory=r["memory_mb_per_image"]
                 / memory[("deit_t", p, False)]["memory_mb_per_image"])
            for (model, p, compiled), r in memory.items()
            if model == "adv_t" and not compiled and ("deit_t", p, False) in memory]


class OperationCount(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_operations(model_name, patch, plan, backward, res=224, **overrides):
    """Aten operations of one image through a model built on the meta device, with the PyTorch
    Mamba-2 path forced into `plan` ("cpu" or "accelerator")."""
    forced, pv.SCAN_PLAN = pv.SCAN_PLAN, plan
    try:
        with torch.device("meta"):
            model = pv.create_model(model_name, patch=patch, res=res, **overrides)
            images = torch.randn(1, 3, res, res)
        counter = OperationCount()
        with torch.set_grad_enabled(backward), counter:
            out = model(images)
            if backward:
                out.sum().backward()
        return counter.count
    finally:
        pv.SCAN_PLAN = forced


def bench_operations(patches):
    rows = [dict(model="deit_b", patch=16, plan="-", fwd_ops=count_operations("deit_b", 16, None, False),
                 fwd_bwd_ops=count_operations("deit_b", 16, None, True))]
    for plan in ("accelerator", "cpu"):
        for patch in patches:
            rows.append(dict(model="adv_b", patch=patch, plan=plan,
                             fwd_ops=count_operations("adv_b", patch, plan, False),
                             fwd_bwd_ops=count_operations("adv_b", patch, plan, True)))
    base = {r["plan"]: r for r in rows if r["model"] == "adv_b" and r["patch"] == 16}
    for r in rows[1:]:
        r["fwd_over_patch16"] = r["fwd_ops"] / base[r["plan"]]["fwd_ops"]
        r["fwd_bwd_over_patch16"] = r["fwd_bwd_ops"] / base[r["plan"]]["fwd_bwd_ops"]
    return rows


def context_parallel_step(model_name, res, amp, steps):
    """Run by each rank under torchrun: warmed-up training steps of one image split over every rank;
    rank 0 prints the row (the largest saved bytes and bytes sent over the ranks, the slowest step)."""
    import torch.distributed as dist
    run = engine.setup(amp)
    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    torch.manual_seed(0)
    model = pv.create_model(model_name, patch=1, res=res, num_classes=10).to(run.device)
    model.set_context_parallel(group)
    images = torch.randn(1, 3, res, res, device=run.device)
    sent = []

    def counted(collective, position):   # the size of the tensor this rank puts into each exchange
        def call(*args, **kwargs):
            sent.append(args[position].numel() * args[position].element_size())
            return collective(*args, **kwargs)
        return call

    def step():
        with run.autocast():
            loss = model(images).float().logsumexp(1).sum()
        loss.backward()

    step()
    originals = dist.all_gather, dist.all_to_all_single, dist.all_reduce
    dist.all_gather, dist.all_to_all_single, dist.all_reduce = (counted(originals[0], 1), counted(originals[1], 1),
                                                                counted(originals[2], 0))
    try:
        saved = engine.saved_activation_bytes(step, model.parameters())
    finally:
        dist.all_gather, dist.all_to_all_single, dist.all_reduce = originals
    synchronize(run.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(run.device)
    seconds = (time.perf_counter() - start) / steps
    size = dist.get_world_size() if group else 1
    worst = engine.all_reduce([saved, sum(sent), seconds], run.device, op=dist.ReduceOp.MAX)
    if run.is_main:
        print(ROW_MARK + json.dumps(dict(model=model_name, res=res, context_parallel=size, tokens=res * res,
                                         tokens_per_rank=res * res // size, saved_mb_per_rank=worst[0] / 2**20,
                                         step_s=worst[2], sent_kb_per_step_per_rank=worst[1] / 1024)))
    engine.finish()


def bench_context_parallel(device):
    """Section 8: context parallel 1, 2 and 4, each size a torchrun of this file."""
    model, res, amp = ("adv_b", 448, "bf16") if device.type == "cuda" else ("adv_t", 64, "off")
    sizes = [n for n in (1, 2, 4) if device.type != "cuda" or n <= torch.cuda.device_count()]
    rows = []
    for size in sizes:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(size), "--master_port",
                   str(29400 + os.getpid() % 1000 + size), __file__, "--context-parallel-step", model, str(res), amp]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(ROW_MARK)]
        rows.append(json.loads(lines[0][len(ROW_MARK):]) if lines else
                    dict(model=model, context_parallel=size, status=f"failed: {proc.stderr.strip()[-300:]}"))
    base = rows[0].get("saved_mb_per_rank")
    for row in rows:
        if base and "saved_mb_per_rank" in row:
            row["saved_over_one_rank"] = row["saved_mb_per_rank"] / base
    return rows


def largest_inputs(gpu_gb=80, gpus=(1, 2, 4, 8)):
    """Adventurer-B at patch 1: saved activation bytes per token with bf16 autocast and --grad-ckpt
    (measured on 4,096 tokens with 2 blocks and scaled to 12; per token and block it does not depend
    on either), and the largest square input whose saved activations fit `gpu_gb` per GPU, less the
    weights and AdamW state (16 bytes per parameter), when `gpus` GPUs share each image."""
    model = pv.create_model("adv_b", patch=1, res=64, num_classes=1000, depth=2)
    model.set_grad_checkpointing(True)
    images = torch.randn(1, 3, 64, 64)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(images).float().sum()
        loss.backward()

    per_token = engine.saved_activation_bytes(step, model.parameters()) / 4096 * 12 / 2
    params = sum(p.numel() for p in pv.create_model("adv_b", patch=1, res=224).parameters())
    room = gpu_gb * 1e9 - 16 * params
    rows = []
    for n in gpus:
        side = int((n * room / per_token) ** 0.5)
        rows.append(dict(gpus_per_image=n, kb_per_token=per_token / 1e3, max_tokens=side * side,
                         largest_input_px=side))
    return rows


def package_versions():
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "mamba-ssm", "causal-conv1d", "flash-attn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def table6_configs(report):
    """The Table 6 runs, most valuable first, each (amp, model, path): the mamba-ssm kernels and
    the PyTorch path of Adventurer-B, then DeiT-B (FlashAttention only where it imports: without
    it a "kernel" row would repeat the SDPA row), then the second mamba-ssm tier, then fp16."""
    adv_kernel = "mamba_ssm_fused" if report["mamba_ssm_fused"] else "mamba_ssm_triton_ssd"
    deit_paths = ["flash_attn", "sdpa"] if report["flash_attn"] else ["sdpa"]
    configs = [("bf16", "adv_b", adv_kernel), ("bf16", "adv_b", "torch")]
    configs += [("bf16", "deit_b", path) for path in deit_paths]
    if report["mamba_ssm_fused"]:
        configs.append(("bf16", "adv_b", "mamba_ssm_triton_ssd"))
    configs += [("fp16", "adv_b", adv_kernel), ("fp16", "deit_b", deit_paths[0])]
    return configs


PATH_ENV = {   # what each path sets for its subprocess (see the kernel notes in pixelvit.py)
    "mamba_ssm_fused": dict(PIXELVIT_KERNELS="1", PIXELVIT_FUSED_MAMBA="1", PIXELVIT_REQUIRE_KERNELS="1"),
    "mamba_ssm_triton_ssd": dict(PIXELVIT_KERNELS="1", PIXELVIT_FUSED_MAMBA="0", PIXELVIT_REQUIRE_KERNELS="1"),
    "flash_attn": dict(PIXELVIT_KERNELS="1", PIXELVIT_REQUIRE_KERNELS="1"),
    "torch": dict(PIXELVIT_KERNELS="0"),
    "sdpa": dict(PIXELVIT_KERNELS="0"),
}
ROW_MARK = "TABLE6_ROW "
TABLE6_ROWS_COMMAND = [sys.executable, os.path.abspath(__file__), "--table6-rows"]


def table6_rows_in_this_process(amp, model, patches):
    """One `train.py --benchmark` row per patch size, each printed as a marked JSON line as soon as it
    is measured; every error is recorded in its row (an out-of-memory one as such) and the next
    patch size still runs."""
    for patch in patches:
        row = dict(status="ok")
        try:
            row.update(benchmark_row(model, patch, 224, TABLE6_BATCH[patch], 3, amp))
            row["gpu_hours"] = IMAGENET_TRAIN_IMAGES / row["images_per_s"] / 3600
        except torch.cuda.OutOfMemoryError:
            row["status"] = "out of memory"
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        torch.cuda.empty_cache()
        print(ROW_MARK + json.dumps({**row, "patch": patch}), flush=True)


def run_table6_config(amp, model, path, patches, deadline):
    """The rows of one (amp, model, path), in a subprocess, so that a crash, a hang or a poisoned
    CUDA context costs only that configuration; rows it did not reach by `deadline` say why."""
    if time.time() >= deadline:
        yield from (dict(patch=patch, status="skipped: time budget") for patch in patches)
        return
    command = [*TABLE6_ROWS_COMMAND, amp, model, *map(str, patches)]
    proc = subprocess.Popen(command, env={**os.environ, **PATH_ENV[path]}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = queue.Queue()

    def read_lines():   # in a thread, so that the wait for the next line can time out
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_lines, daemon=True).start()
    measured, tail = {}, []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            proc.kill()
            ended = "skipped: time budget (cut during this row)"
            break
        if line is None:
            proc.wait()
            ended = f"not reached: the run exited with status {proc.returncode}: {' | '.join(tail[-3:])}"
            break
        if line.startswith(ROW_MARK):
            row = json.loads(line[len(ROW_MARK):])
            measured[row["patch"]] = row
            yield row
        else:
            tail.append(line.strip())
    for patch in patches:
        if patch not in measured:
            yield dict(patch=patch, status=ended)
            ended = "skipped: time budget" if ended.startswith("skipped") else ended


def bench_table6(args):
    """Table 6 rows, configuration by configuration, written to --json row by row."""
    rows, deadline = [], args.deadline or time.time() + args.time_budget
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    header = dict(device=device, versions=package_versions(), backends=pv.backends())
    report = header["backends"]
    patches = sorted(PAPER_TABLE6, reverse=True)
    notes = [] if report["flash_attn"] else [f"flash-attn not installed ({report['why'].get('flash_attn')}): "
                                             "DeiT-B rows use SDPA only"]
    for amp, model, path in table6_configs(report):
        for row in run_table6_config(amp, model, path, patches, deadline):
            row = dict(model=model, amp=amp, path=path, batch=TABLE6_BATCH[row["patch"]],
                       paper_gpu_hours=PAPER_TABLE6[row["patch"]][model], **row)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:   # row by row, so that a run cut short keeps what it measured
                engine.write_json(args.json, {**header, "notes": notes, "table6": rows})
    return rows


def print_table(rows, columns):
    if not rows:
        return
    columns = [c for c in columns if any(c in row for row in rows)]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["adv_t", "deit_t"], help="models for section 5")
    parser.add_argument("--patches", nargs="+", type=int, default=[16, 8, 4, 2, 1], help="patch sizes for section 5")
    parser.add_argument("--res", type=int, default=None, help="section 5's input size; default: 224 on GPU, 64 on CPU")
    parser.add_argument("--batch", type=int, default=2, help="section 5's batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (after 3 warm-up steps)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast in section 5")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in section 5")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows for adv_t to section 5 "
                                                                 "(minutes of compiling on a CPU)")
    parser.add_argument("--peer-lengths", nargs="+", type=int, default=[256, 1024, 4096, 16384, 50176],
                        help="sequence lengths for section 3")
    parser.add_argument("--sdists", default=os.path.join(ROOT, "sdists"),
                        help="folder holding a mamba-ssm sdist (.tar.gz) for section 3's ssd_minimal_discrete")
    parser.add_argument("--sections", nargs="+", type=int, default=[1, 2, 3, 4, 5, 7, 8],
                        help="which sections to run")
    parser.add_argument("--table6", action="store_true", help="run only section 6, the paper's Table 6 (GPU)")
    parser.add_argument("--time-budget", type=float, default=240, help="seconds for section 6's rows")
    parser.add_argument("--deadline", type=float, help="Unix time after which section 6 starts no row and "
                                                        "stops the one running (instead of --time-budget)")
    parser.add_argument("--json", help="also write all rows to this file")
    parser.add_argument("--table6-rows", nargs="+", metavar="AMP MODEL PATCH",
                        help="internal: the rows of one Table 6 configuration, run by --table6 in a subprocess")
    parser.add_argument("--context-parallel-step", nargs=3, metavar=("MODEL", "RES", "AMP"),
                        help="internal: one rank of section 8, run under torchrun")
    args = parser.parse_args()
    if args.context_parallel_step:
        model, res, amp = args.context_parallel_step
        return context_parallel_step(model, int(res), amp, args.steps)
    if args.table6_rows:
        amp, model, *patches = args.table6_rows
        return table6_rows_in_this_process(amp, model, [int(p) for p in patches])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.res = args.res or (224 if device.type == "cuda" else 64)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# device: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"kernels: {pv.backends()}\n")

    results = {"device": name, "versions": package_versions(), "args": vars(args)}
    if args.table6:
        args.sections = [6]
    if 1 in args.sections:
        results["ssd"] = bench_ssd(device)
        print_table(results["ssd"], ["ssd", "tokens", "fwd_ms", "fwd_bwd_ms"])
    if 2 in args.sections:
        results["linearity"] = bench_linearity(device)
        print_table(results["linearity"], ["what", "tokens", "ms_per_1k_tokens", "sys_per_user", "ratio"])
    if 3 in args.sections:
        results["peers"], notes = bench_peers(device, args.peer_lengths, args.sdists)
        print_table(results["peers"], ["tokens", "mixer_ms", "transformers_ms", "transformers_over_ours",
                                       "transformers_max_diff", "ssd_ms", "minimal_ms", "minimal_over_ours"])
        print("".join(f"note: {note}\n" for note in notes))
    if 4 in args.sections:
        results["bf16"] = bench_bf16(device)
        print_table(results["bf16"], ["ssd"] + [f"{k}_{m}" for k in ["y", "dx", "ddt", "dA", "dB", "dC"]
                                                for m in ("err", "within")])
    if 5 in args.sections:
        results["models"] = bench_models(args)
        print_table(results["models"], ["model", "patch", "tokens", "compiled", "images_per_s",
                                        "memory_mb_per_image", "kb_per_token", "tflops", "backends"])
        print_table(memory_ratios(results["models"]), ["patch", "tokens", "adv_t_over_deit_t_memory"])
    if 7 in args.sections:
        results["operations"] = bench_operations(args.patches)
        print_table(results["operations"], ["model", "patch", "plan", "fwd_ops", "fwd_bwd_ops", "fwd_over_patch16",
                                            "fwd_bwd_over_patch16"])
    if 8 in args.sections:
        results["context_parallel"] = bench_context_parallel(device)
        print_table(results["context_parallel"], ["model", "res", "context_parallel", "tokens", "tokens_per_rank",
                                                  "saved_mb_per_rank", "saved_over_one_rank", "step_s",
                                                  "sent_kb_per_step_per_rank", "status"])
        results["largest_inputs"] = largest_inputs()
        print_table(results["largest_inputs"], ["gpus_per_image", "kb_per_token", "max_tokens", "largest_input_px"])
    if 6 in args.sections:   # --json written row by row, with the versions and the kernels found
        rows = bench_table6(args)
        print_table(rows, ["model", "patch", "amp", "path", "batch", "status", "images_per_s",
                           "memory_mb_per_image", "gpu_hours", "paper_gpu_hours", "tflops", "mfu", "backends"])
        failed = [r for r in rows if r["status"].startswith(("error", "not reached"))]
        print(f"Table 6: {len(rows)} rows, {sum(r['status'] == 'ok' for r in rows)} measured, {len(failed)} failed"
              + (f" (first: {failed[0]['model']} {failed[0]['path']} patch {failed[0]['patch']}: "
                 f"{failed[0]['status']})" if failed else ""))
        return 1 if failed else 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
