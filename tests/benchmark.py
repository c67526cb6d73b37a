"""Speed and memory of pixelvit, printed as tables (a benchmark, not a test).

    python tests/benchmark.py                             # CPU: 64 px, batch 2
    python tests/benchmark.py --res 224 --batch 8 --amp   # GPU: the paper's setting

1. The chunked SSD fallback against the token-by-token recurrence at 4,096 tokens.
2. `train.py --benchmark` for adv_t and deit_t at every patch size: training images/s and memory
   per image. Memory on a GPU is the allocator's peak minus what was allocated before the step; on
   CPU it is the bytes that autograd saves for the backward pass (parameters excluded), which is
   what grows with the number of tokens.
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
import train  # noqa: E402


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
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (after 3 warm-up steps)")
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
            flags = ["--benchmark", "--model", model_name, "--patch", str(patch), "--res", str(args.res),
                     "--batch-size", str(args.batch), "--benchmark-steps", str(args.steps),
                     "--amp", "bf16" if args.amp else "off"] + (["--grad-ckpt"] if args.grad_ckpt else [])
            row = train.main(flags)
            row["kb_per_token"] = row["memory_mb_per_image"] * 1024 / row["tokens"]
            results["models"].append(row)
    print()
    print_table(results["models"], ["model", "patch", "tokens", "images_per_s", "memory_mb_per_image",
                                     "kb_per_token", "tflops", "backends"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
