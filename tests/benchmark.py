"""Speed and memory of pixelvit, printed as tables (a benchmark, not a test).

    python tests/benchmark.py                      # CPU: 64 px, batch 2
    python tests/benchmark.py --res 224 --batch 8  # GPU: the paper's setting

1. The chunked SSD fallback against the token-by-token recurrence at 4,096 tokens.
2. Forward+backward images/s and activation memory of adv_t and deit_t at every patch size.
   Memory on a GPU is the allocator's peak minus what was allocated before the step; on CPU it is
   the bytes that autograd saves for the backward pass (parameters excluded), which is what grows
   with the number of tokens.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pixelvit as pv  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns, device, warmup, iters):
    """Best seconds per call of each function after warm-up (which also runs Triton autotuning).
    The functions take turns, so that load from other processes on a shared machine hits all of
    them alike; the best of several runs is the least disturbed one."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def saved_activation_bytes(step, parameters):
    """Bytes of the distinct tensors autograd keeps for backward during `step()`."""
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


def bench_ssd(device, length=4096, heads=8, headdim=64, d_state=64, chunk=pv.TORCH_SSD_CHUNK):
    """Chunked SSD vs the recurrence, forward and forward+backward, Adventurer-T mixer sizes."""
    torch.manual_seed(0)
    x = torch.randn(1, length, heads, headdim, device=device)
    dt = 1e-3 + 0.1 * torch.rand(1, length, heads, device=device)
    A = -(1 + 15 * torch.rand(heads, device=device))
    B, C = torch.randn(2, 1, length, 1, d_state, device=device).unbind(0)
    xg = x.clone().requires_grad_(True)
    chunked = lambda x: pv.ssd_chunked(x, dt, A, B, C, chunk)   # noqa: E731
    loop = lambda x: pv.ssd_recurrent(x, dt, A, B, C)           # noqa: E731
    fwd = timed([lambda: chunked(x), lambda: loop(x)], device, 1, 5)
    both = timed([lambda: chunked(xg).sum().backward(), lambda: loop(xg).sum().backward()], device, 1, 3)
    return [dict(ssd="chunked", tokens=length, fwd_ms=1e3 * fwd[0], fwd_bwd_ms=1e3 * both[0]),
            dict(ssd="token loop", tokens=length, fwd_ms=1e3 * fwd[1], fwd_bwd_ms=1e3 * both[1]),
            dict(ssd="speed-up", tokens=length, fwd_ms=fwd[1] / fwd[0], fwd_bwd_ms=both[1] / both[0])]


def bench_model(name, patch, args, device):
    torch.manual_seed(0)
    model = pv.create_model(name, patch=patch, res=args.res).to(device).train()
    model.set_grad_checkpointing(args.grad_ckpt)
    images = torch.randn(args.batch, 3, args.res, args.res, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def step():
        with amp:
            loss = model(images).float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    (seconds,) = timed([step], device, args.warmup, args.iters)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        memory = torch.cuda.max_memory_allocated() - before
    else:
        memory = saved_activation_bytes(lambda: model(images).sum().backward(), list(model.parameters()))
        model.zero_grad(set_to_none=True)
    tokens = (args.res // patch) ** 2
    return dict(model=name, patch=patch, res=args.res, tokens=tokens, batch=args.batch,
                images_per_s=args.batch / seconds, memory_mb_per_image=memory / args.batch / 2**20,
                kb_per_token=memory / args.batch / tokens / 1024,
                backends=sorted(set(pv.backends(model)["mixers"].values())))


def print_table(rows, columns):
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("| " + " | ".join(cells) + " |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["adv_t", "deit_t"])
    parser.add_argument("--patches", nargs="+", type=int, default=[16, 8, 4, 2, 1])
    parser.add_argument("--res", type=int, default=None, help="default: 224 on GPU, 64 on CPU")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--skip-ssd", action="store_true")
    parser.add_argument("--json", help="also write all rows to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.res = args.res or (224 if device.type == "cuda" else 64)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# device: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"kernels: {pv.backends()}\n")

    results = {"device": name, "torch": torch.__version__, "args": vars(args)}
    if not args.skip_ssd:
        results["ssd"] = bench_ssd(device)
        print_table(results["ssd"], ["ssd", "tokens", "fwd_ms", "fwd_bwd_ms"])
    results["models"] = []
    for model_name in args.models:
        for patch in args.patches:
            row = bench_model(model_name, patch, args, device)
            results["models"].append(row)
            print(json.dumps(row), flush=True)
    print()
    print_table(results["models"], ["model", "patch", "tokens", "images_per_s", "memory_mb_per_image",
                                     "kb_per_token", "backends"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
