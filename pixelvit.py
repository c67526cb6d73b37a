"""pixelvit: plain vision backbones at any patch size, down to one pixel per token.

Reference implementation of "Scaling Laws in Patchification: An Image Is Worth 50,176 Tokens
And More" (Wang et al., 2025). One file, torch only; FlashAttention and the mamba-ssm Triton
kernels are used when they are importable and the input is on a GPU, and an exact pure-PyTorch
path runs everywhere else.

    model = create_model("adv_b", patch=1, res=224)   # 50,176 pixel tokens + CLS
    logits = model(images)                            # [B, 1000]
    maps = model.forward_dense(images)                # [B, 768, 224, 224]

Two families, with the state-dict keys of the released code so that official weights load as is:
  * DeiT (timm `VisionTransformer` keys, CLS token FIRST), attention mixer.
  * Adventurer (wangf3014/Patch_Scaling `models_mamba.py` keys, CLS token LAST), Mamba-2 mixer.

In reading order: the switches, configurations, layers (tokenizer, norms, attention), the SSD layer
in plain PyTorch, the Mamba-2 mixer and the Adventurer block, the models and `create_model`, the
decoder-free head, checkpoints; then the plumbing: the optional CUDA kernels and context parallelism.
"""
import argparse
import contextlib
import functools
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

__all__ = [   # the API that README.md shows
    "create_model", "list_models", "ModelConfig", "DeiT", "Adventurer", "DecoderFreeHead",
    "load_checkpoint", "read_state_dict", "infer_model_args", "resample_pos_embed", "resample_patch_embed",
    "backends", "kernel_batch_limit", "ssd_chunked", "ssd_recurrent", "ssd_final_state",
    "IMAGENET_MEAN", "IMAGENET_STD", "FLIP_SCHEDULES",
]

# Switches, each read from the environment once, here, at import, into a module attribute that code
# may reassign at any time (`pixelvit.USE_KERNELS = False`) to the same effect:
#   PIXELVIT_KERNELS=0              USE_KERNELS = False        the PyTorch paths everywhere, e.g. to
#                                                              compare kernel and fallback outputs
#   PIXELVIT_FUSED_MAMBA=0          USE_FUSED_MAMBA = False    skip mamba-ssm's fused op, so that its
#                                                              Triton SSD tier runs where causal-conv1d is
#   PIXELVIT_SCAN_PLAN=cpu|accelerator   SCAN_PLAN = "cpu"     the PyTorch Mamba-2 path's plan on any
#                                                              device (None: by the tensors' device)
#   PIXELVIT_REQUIRE_KERNELS=1      REQUIRE_KERNELS = True     a CUDA forward that would fall to the
#                                                              PyTorch path for want of a kernel is an error
# Whether a kernel package imports is looked up once per process (the `functools.cache` lookups
# below); the switches are read at every call.
USE_KERNELS = os.environ.get("PIXELVIT_KERNELS", "1") != "0"
USE_FUSED_MAMBA = os.environ.get("PIXELVIT_FUSED_MAMBA", "1") != "0"
SCAN_PLAN = os.environ.get("PIXELVIT_SCAN_PLAN") or None
REQUIRE_KERNELS = os.environ.get("PIXELVIT_REQUIRE_KERNELS") == "1"


# ----------------------------------------------------------------------------------------------
# Configurations


# Which Adventurer blocks reverse the patch order. "official" is what the released code does
# (`flip = n // 2 == 1`, so only blocks 2 and 3) and what the released checkpoints were evaluated
# with; the Adventurer paper describes flipping "between every two layers" ("alternate"), and
# "pairs" is the maintainer's other suggested fix (wangf3014/Adventurer issue #6).
FLIP_SCHEDULES = {
    "official": lambda i: i // 2 == 1,
    "alternate": lambda i: i % 2 == 1,
    "pairs": lambda i: (i // 2) % 2 == 1,
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str                       # "deit" or "adventurer"
    embed_dim: int
    depth: int
    num_heads: int = 0              # DeiT attention heads
    mlp_ratio: float = 4.0          # MLP hidden = int(mlp_ratio * embed_dim): 4 DeiT, 2.5 Adventurer
    patch: int = 16
    res: int = 224                  # the size pos_embed is laid out for; other sizes resample it
    in_chans: int = 3
    num_classes: int = 1000
    drop_path: float = 0.0
    extend: int = 1                 # Table 5 "by extending": token grid upsampled k x per axis
    flip_schedule: str = "official"
    d_state: int = 64               # Mamba-2 mixer (Adventurer)
    headdim: int = 64
    expand: int = 2
    d_conv: int = 4
    ngroups: int = 1
    chunk_size: int = 256

    def __post_init__(self):
        checks = [
            (self.arch in ("deit", "adventurer"), f"arch must be 'deit' or 'adventurer', got {self.arch!r}"),
            (self.patch >= 1 and self.res % self.patch == 0,
             f"the patch size must divide the resolution, got patch {self.patch} for res {self.res}"),
            (isinstance(self.extend, int) and self.extend >= 1,
             f"extend must be an integer >= 1, got {self.extend}"),
            (self.flip_schedule in FLIP_SCHEDULES,
             f"flip_schedule must be one of {sorted(FLIP_SCHEDULES)}, got {self.flip_schedule!r}"),
            (self.arch != "deit" or (self.num_heads > 0 and self.embed_dim % self.num_heads == 0),
             f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}"),
            (self.arch != "adventurer" or (self.expand * self.embed_dim % self.headdim == 0
                                           and self.expand * self.embed_dim // self.headdim % self.ngroups == 0),
             f"expand*embed_dim ({self.expand * self.embed_dim}) must split into heads of "
             f"headdim {self.headdim}, and the heads evenly into ngroups {self.ngroups}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def grid(self):
        """Side of the token grid that pos_embed holds."""
        return self.res // self.patch * self.extend


# Table 7 of the paper. Huge: the paper's 1,280-dim, 32-block Adventurer is listed as 759 M
# parameters, but the released block at that size has 718.03 M (at patch 16, 224 px); no Huge
# weights were released.
MODEL_CONFIGS = {
    "deit_t": dict(arch="deit", embed_dim=192, depth=12, num_heads=3),
    "deit_s": dict(arch="deit", embed_dim=384, depth=12, num_heads=6),
    "deit_b": dict(arch="deit", embed_dim=768, depth=12, num_heads=12),
    "deit_l": dict(arch="deit", embed_dim=1024, depth=24, num_heads=16),
    "deit_h": dict(arch="deit", embed_dim=1280, depth=32, num_heads=16),
    "adv_t": dict(arch="adventurer", embed_dim=256, depth=12, mlp_ratio=2.5),
    "adv_s": dict(arch="adventurer", embed_dim=512, depth=12, mlp_ratio=2.5),
    "adv_b": dict(arch="adventurer", embed_dim=768, depth=12, mlp_ratio=2.5),
    "adv_l": dict(arch="adventurer", embed_dim=1024, depth=24, mlp_ratio=2.5),
    "adv_h": dict(arch="adventurer", embed_dim=1280, depth=32, mlp_ratio=2.5),
}


# Names used by the official Adventurer / Patch_Scaling code and by timm's DeiT.
MODEL_ALIASES = {
    **{f"adventurer_{size}_patch{p}": dict(name=f"adv_{size[0]}", patch=p)
       for size in ("tiny", "small", "base", "large") for p in (16, 8, 1)},
    **{f"deit_{size}_patch16_{res}": dict(name=f"deit_{size[0]}", patch=16, res=res)
       for size in ("tiny", "small", "base") for res in (224, 384)},
}


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Layers: the tokenizer, norms, attention and the DeiT block


class PatchEmbed(nn.Module):
    """The tokenizer: one linear map per non-overlapping p x p patch (p = 1: per pixel)."""

    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # [B, C, H, W] -> [B, D, H/p, W/p]
        return self.proj(x)


def rms_norm(x, weight, eps, groups=1):
    """x / rms(x) * weight in float32 (float64 for float64 input), over `groups` equal slices."""
    dtype = _compute_dtype(x)
    xg = x.to(dtype).unflatten(-1, (groups, -1))
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return xg.flatten(-2) * weight.to(dtype)


class RMSNorm(nn.Module):
    """mamba-ssm's RMSNorm: no mean subtraction, no bias; returns the input dtype."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """Mamba-2's output norm with norm_before_gate=False: RMSNorm(y * SiLU(z)) per group."""

    def __init__(self, dim, eps=1e-5, groups=1):
        super().__init__(dim, eps)
        self.groups = groups

    def forward(self, y, z):
        return rms_norm(y.to(_compute_dtype(y)) * F.silu(z.to(_compute_dtype(y))), self.weight,
                        self.eps, self.groups)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


class Attention(nn.Module):
    """Global multi-head self-attention with timm's parameter layout (qkv rows [q; k; v])."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.last_path = "not run yet"

    def forward(self, x, shards=None):
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        out = self._attend(qkv) if shards is None else self._attend_sharded(qkv, shards)
        return self.proj(out.reshape(b, n, d))

    def _attend(self, qkv):  # (b, n, 3, heads, head_dim) -> (b, n, heads, head_dim)
        self.last_path = self.kernel_path(qkv)
        if self.last_path == "flash_attn":  # FlashAttention takes (b, n, heads, head_dim)
            return _flash_attn_func()(*qkv.unbind(2))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)       # SDPA takes (b, heads, n, head_dim)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    def _attend_sharded(self, qkv, shards):
        """Attention over a sequence split over the ranks of `shards` (CLS on the first rank): an
        all-to-all gives each rank every token for its share of the heads, and one back gives
        each rank its own tokens for every head. Stretches are padded to the longest for the
        exchange and the padding dropped before attending."""
        b, n, _, heads, head_dim = qkv.shape
        size = shards.size
        lengths = shards.lengths(cls_rank=0)
        longest = max(lengths)
        send = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, longest - n)).view(b, longest, 3, size, heads // size, head_dim)
        got = _AllToAll.apply(send.permute(3, 0, 1, 2, 4, 5), shards.group)   # (size, b, longest, 3, heads/size, hd)
        whole = torch.cat([got[r, :, :length] for r, length in enumerate(lengths)], dim=1)
        out = self._attend(whole)                                        # (b, N + 1, heads/size, hd)
        send = torch.stack([F.pad(piece, (0, 0, 0, 0, 0, longest - piece.shape[1]))
                            for piece in out.split(lengths, dim=1)])     # (size, b, longest, heads/size, hd)
        back = _AllToAll.apply(send, shards.group)                       # by head group
        return back[:, :, :n].permute(1, 2, 0, 3, 4).reshape(b, n, heads, head_dim)

    def kernel_path(self, qkv):
        """FlashAttention on CUDA in half precision where it imports, SDPA everywhere else."""
        if not (USE_KERNELS and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)):
            return "sdpa"
        if _flash_attn_func() is not None:
            return "flash_attn"
        _require_kernels(self)
        return "sdpa"


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DeiTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_hidden, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x, shards=None):
        x = x + self.drop_path(self.attn(self.norm1(x), shards))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------
# Mamba-2's state-space duality (SSD) layer in plain PyTorch.
#
# Per head h, with a scalar decay A_h < 0, a state S of shape (headdim, d_state) and step dt_t:
#     S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t,      y_t = S_t @ C_t
# `ssd_recurrent` runs this literally; `ssd_chunked` computes the same thing in chunks of Q
# tokens: inside a chunk as a masked (attention-like) matrix product, across chunks by passing
# one state per chunk. Work is linear in length; only the chunk loop is sequential.


def _compute_dtype(t):
    """Decays and scans run in float32 (float64 when the model is float64, for exactness tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ssd_recurrent(x, dt, A, B, C):
    """The SSD recurrence token by token: the definition that `ssd_chunked` must reproduce.

    x (b, l, h, p), dt (b, l, h) after softplus, A (h,) negative, B and C (b, l, g, n) with heads
    split evenly over the g groups. Returns y (b, l, h, p), without the D skip connection.
    """
    b, l, h, p = x.shape
    heads_per_group = h // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    C = C.repeat_interleave(heads_per_group, dim=2)
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]                     # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1)


def segsum(a):
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, and -inf above the diagonal.

    Taken as differences of one cumulative sum, in float64: over a 256-token chunk the sum
    reaches about -400, where float32 would keep only a few digits of the difference of two
    such numbers. The -inf is set before exp, so exp gives exact zeros and clean gradients
    (never exp(x_i) / exp(x_j), which is 0/0 in float32 once the sums pass -104).
    """
    q = a.shape[-1]
    cs = a.to(torch.float64).cumsum(dim=-1)
    out = (cs[..., :, None] - cs[..., None, :]).to(a.dtype)
    return out.masked_fill(~torch.ones(q, q, dtype=torch.bool, device=a.device).tril(), -torch.inf)


def segsum_direct(a):
    """`segsum` without float64: entry (i, j) summed directly from a[j+1..i] (masked copies of a,
    then one cumulative sum down the rows), as mamba-ssm's `ssd_minimal.py` does. No difference of
    large sums, so float32 keeps its precision; for devices without float64 (Apple MPS)."""
    q = a.shape[-1]
    below = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)
    terms = a[..., :, None].expand(*a.shape, q).masked_fill(~below, 0)   # [i, j] = a[i] where i > j
    out = terms.cumsum(dim=-2)                                            # [i, j] = a[j+1] + ... + a[i]
    return out.masked_fill(~torch.ones(q, q, dtype=torch.bool, device=a.device).tril(), -torch.inf)


@dataclass(frozen=True)
class ScanPlan:
    """How the PyTorch Mamba-2 path cuts a sequence into work. Every plan gives the same result up
    to rounding; they differ in how many operations run and how large each is."""
    chunk: int            # SSD chunk length: the (chunk x chunk) masked products inside a chunk
    block: int            # tokens whose temporaries exist at once; each block is recomputed in backward
    recompute_from: int   # shorter sequences keep their intermediates: the recompute would cost more
    state_passing: str    # across a block's chunks: "loop", one step per chunk, or "matrix", one
                          # product with a (chunks x chunks) lower-triangular decay matrix
    float64_sums: bool    # decay exponents as differences of one float64 cumulative sum, or each


                          # summed directly from its own terms in the compute dtype (no float64: MPS)


SCAN_PLANS = {
    # CPU: blocks small enough that their temporaries stay in cache and are reused by the allocator,
    # not mapped afresh from the OS for every pass; a Python loop over chunks costs little there.
    "cpu": ScanPlan(chunk=64, block=1024, recompute_from=256, state_passing="loop", float64_sums=True),
    # GPUs and other accelerators, where every operation is a kernel launch: few, large operations.
    # Chunk 64 balances the (chunk x chunk) decay matrices against the chunk states (h x 64 x 64
    # floats per chunk each at headdim = d_state = 64, so the sum of both is least at 64); 16,384
    # tokens keep each float32 temporary of a block near 1.4 GB at Adventurer-B, batch 14
    # (docs/kernels.md).
    "accelerator": ScanPlan(chunk=64, block=16_384, recompute_from=256, state_passing="matrix",
                              float64_sums=False),
}


def scan_plan(device):
    """The PyTorch Mamba-2 path's plan for tensors on `device`: the CPU's, or the accelerators'
    (CUDA, ROCm, MPS, and the meta device, on which operation counts are measured)."""
    name = SCAN_PLAN or ("cpu" if torch.device(device).type == "cpu" else "accelerator")
    if name not in SCAN_PLANS:
        raise ValueError(f"PIXELVIT_SCAN_PLAN must be one of {sorted(SCAN_PLANS)}, got {name!r}")
    return SCAN_PLANS[name]


def _pass_states_loop(state, chunk_states, chunk_log_decay):
    """The state entering each chunk, one chunk after another: c small steps. The chunks are taken
    apart with unbind, whose backward is one stack; indexing chunk k of the stacked tensor instead
    would make each step's backward write a full-size gradient."""
    chunk_decay = torch.exp(chunk_log_decay)[..., None, None]            # (b, g, e, c, 1, 1)
    states_in = []
    for decay_k, added_k in zip(chunk_decay.unbind(3), chunk_states.unbind(3)):
        states_in.append(state)
        state = decay_k * state + added_k
    return torch.stack(states_in, dim=3), state                          # (b, g, e, c, p, n)


def _pass_states_matrix(state, chunk_states, chunk_log_decay, segment_sums):
    """The state entering every chunk at once, as mamba-ssm's `ssd_minimal_discrete` does: the
    initial state and what each chunk adds at its end, stacked (c + 1 of them), times one
    lower-triangular matrix of the decays between chunk ends. Row k is the state entering chunk k;
    the last row is the state after the stretch."""
    states = torch.cat([state.unsqueeze(3), chunk_states], dim=3)        # (b, g, e, c + 1, p, n)
    decay = torch.exp(segment_sums(F.pad(chunk_log_decay, (1, 0))))      # (b, g, e, c + 1, c + 1)
    with _without_autocast(states.device):   # the states pass in float32, as in the loop
        states = (decay @ states.flatten(-2)).unflatten(-1, states.shape[-2:])
    # the final state copied out: the next block's recompute keeps it, and a view would keep all
    # of this block's chunk states alive with it
    return states[..., :-1, :, :], states[..., -1, :, :].clone()


# Device types that have no autocast (the meta device), found once here: inside a compiled graph
# Dynamo cannot trace torch.amp.is_autocast_available (torch 2.11 breaks the graph there).
_NO_AUTOCAST = frozenset(t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "maia", "meta",
                                     torch._C._get_privateuse1_backend_name())
                         if not torch.amp.is_autocast_available(t))


def _without_autocast(device):
    """Autocast switched off where the device has it (bf16 autocast would round a matrix product's
    operands)."""
    if device.type in _NO_AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _ssd_chunks(x, dt, A, B, C, state, q, plan):
    """SSD over a stretch of whole chunks of q tokens, started from `state` (b, g, e, p, n), with
    the state passing and decay sums of `plan`; returns y (b, l, h, p) and the state after it."""
    b, l, h, p = x.shape
    g, c = B.shape[2], l // q

    def to_chunks(t):
        """(b, l, heads, ...) -> (b, g, heads/g, c, q, ...): each B/C group with its heads."""
        t = t.reshape(b, c, q, g, -1, *t.shape[3:])
        return t.permute(0, 3, 4, 1, 2, *range(5, t.dim())).contiguous()

    xdt = to_chunks(x * dt[..., None])                      # (b, g, e, c, q, p)
    a = to_chunks(dt * A)                                   # (b, g, e, c, q): log-decay per step
    B, C = to_chunks(B), to_chunks(C)                       # (b, g, 1, c, q, n)

    # 1. Inside each chunk, SSD is masked attention: y_i = sum_{j<=i} (C_i.B_j) decay(j->i) xdt_j.
    segment_sums = segsum if plan.float64_sums else segsum_direct
    decay = torch.exp(segment_sums(a))                      # (b, g, e, c, q, q)
    y = (C @ B.transpose(-1, -2) * decay) @ xdt             # (b, g, e, c, q, p)

    # 2. What each chunk adds to the state at its own end.
    decay_to_end = decay[..., -1, :, None]                  # (b, g, e, c, q, 1)
    chunk_states = (xdt * decay_to_end).transpose(-1, -2) @ B   # (b, g, e, c, p, n)

    # 3. Pass the state across chunk boundaries, the only step that runs along the sequence.
    if plan.state_passing == "matrix":
        states_in, state = _pass_states_matrix(state, chunk_states, a.sum(-1), segment_sums)
    else:
        states_in, state = _pass_states_loop(state, chunk_states, a.sum(-1))   # (b, g, e, c, p, n)

    # 4. The carried-in state, read out by C and decayed from the chunk start to each position.
    decay_from_start = torch.exp(a.cumsum(-1))[..., None]   # (b, g, e, c, q, 1)
    y = y + (C @ states_in.transpose(-1, -2)) * decay_from_start
    return y.permute(0, 3, 4, 1, 2, 5).reshape(b, l, h, p), state


def ssd_chunked(x, dt, A, B, C, chunk_size=256, block_size=None, initial_state=None,
                return_final_state=False, plan=None):
    """Chunked SSD, same arguments and result as `ssd_recurrent`, in O(l) work and memory.

    The sequence is cut into the fewest chunks of at most `chunk_size` tokens, all of one length.
    Any length works: the end is padded with dt = 0 (decay 1, no input), which leaves the real
    outputs and the carried state untouched, and cropped afterwards. The chunks are processed in
    blocks of about `block_size` tokens (the plan's block), one block's temporaries at a time,
    the state carried from block to block. Under autograd each block is recomputed in the backward
    pass: what is kept for backward is the inputs and one state per block, not the (q x q) decay
    and score matrices, and the cost per token stays flat at any length.

    `initial_state` (b, h, p, n) continues a sequence whose state it is (zeros by default);
    with `return_final_state` the result is (y, state after the last token), as in mamba-ssm's
    `mamba_chunk_scan_combined`. `plan` (a `ScanPlan`; default: by the device, `scan_plan`)
    sets the block size, the state passing and the decay sums.
    """
    plan = plan or scan_plan(x.device)
    dtype = _compute_dtype(x)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    c = -(-l // chunk_size)                                 # number of chunks
    q = -(-l // c)                                          # balanced length <= chunk_size, so
    pad = c * q - l                                         # fewer than c tokens are padding
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    step = q * max(1, (block_size or plan.block) // q)
    recompute = (torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C))
                 and c * q > step)                          # one block: nothing to gain
    state = (x.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(dtype))
    state = state.view(b, g, h // g, p, n)
    ys = []
    # split, not slicing: its backward is one concatenation, where each slice's backward would
    # write a full-length gradient (quadratic in the number of blocks)
    for xb, dtb, Bb, Cb in zip(*(t.split(step, dim=1) for t in (x, dt, B, C))):
        if recompute:
            y, state = checkpoint(_ssd_chunks, xb, dtb, A, Bb, Cb, state, q, plan, use_reentrant=False)
        else:
            y, state = _ssd_chunks(xb, dtb, A, Bb, Cb, state, q, plan)
        ys.append(y)
    y = torch.cat(ys, dim=1)[:, :l]
    return (y, state.reshape(b, h, p, n)) if return_final_state else y


def ssd_final_state(x, dt, A, B):
    """The state after a stretch scanned from a zero state, and the stretch's total log-decay.

    The SSD is affine in its starting state: after the stretch, S_out = exp(log_decay) * S_in + state.
    Here state = sum_t exp(a_{t+1} + ... + a_l) dt_t x_t B_t^T with a_t = dt_t A, in one contraction
    (what steps 2 and 3 of the chunk scan compute, without any output). Arguments as in
    `ssd_recurrent`; returns state (b, h, p, n) and log_decay (b, h).
    """
    dtype = _compute_dtype(x)
    x, dt, A, B = (t.to(dtype) for t in (x, dt, A, B))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    a = dt * A                                                         # (b, l, h): log-decay per step
    # a_{t+1} + ... + a_l, summed from the end: no difference of large sums
    after = F.pad(a.flip(1).cumsum(1).flip(1)[:, 1:], (0, 0, 0, 1))   # (b, l, h)
    weighted = (x * (dt * torch.exp(after))[..., None]).view(b, l, g, h // g, p)
    state = torch.einsum("blgep,blgn->bgepn", weighted, B)             # (b, g, h/g, p, n)
    return state.reshape(b, h, p, n), a.sum(1)


# ----------------------------------------------------------------------------------------------
# The Mamba-2 mixer and the Adventurer block


class Mamba2Mixer(nn.Module):
    """mamba-ssm 2.0.4 `Mamba2` as Adventurer configures it (same parameters, same math).

    in_proj rows are [z | x | B | C | dt]; x, B and C go through a causal depthwise conv + SiLU;
    the SSD scan mixes tokens; the output is RMSNorm(y * SiLU(z)) projected back to the model width.
    """

    def __init__(self, dim, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16)):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state, self.headdim, self.ngroups, self.chunk_size = d_state, headdim, ngroups, chunk_size
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(dim, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1)
        # dt_bias is softplus^-1 of a step size drawn log-uniformly in [dt_min, dt_max].
        dt = torch.exp(torch.rand(self.nheads) * math.log(dt_max / dt_min) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, groups=ngroups)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self.last_path = "not run yet"

    def forward(self, u, history=None, state=None):  # u [b, l, dim]
        """`history` (b, d_conv - 1, dim), the mixer inputs just before u, and `state` (b, h, p, n),
        the SSD state after them, continue a longer sequence (context parallelism); that takes
        the PyTorch path: the fused kernel ends in the norm and out_proj and starts from zeros."""
        if history is not None or state is not None:
            self.last_path = "torch_chunked_ssd"
            return self._torch(u, history, state)
        self.last_path = self.kernel_path(u)
        if self.last_path == "mamba_ssm_fused":
            return self._fused(self.in_proj(u))
        if self.last_path == "mamba_ssm_triton_ssd":
            return self._triton_ssd(u)
        return self._torch(u)

    def _torch(self, u, history=None, state=None):
        """The whole mixer, block by block of the device's `ScanPlan` (1,024 tokens on a CPU,
        16,384 on an accelerator), each block handing the next its last conv inputs and its SSD
        state. Every temporary is block-sized, so the cost per token stays flat at any length.
        Under autograd each block is recomputed in the backward pass: it keeps only its input for
        it, as mamba-ssm's fused kernel does, instead of a dozen full-length intermediates. Short
        sequences skip the recompute: their activations are small and its per-operation overhead
        would dominate."""
        plan = scan_plan(u.device)
        recompute = self._recomputes(u, plan)
        conv_tail = None if history is None else self._conv_inputs(history)  # None: zeros
        outputs = []
        for block in u.split(plan.block, dim=1):
            if recompute:
                out, conv_tail, state = checkpoint(self._mix_block, block, conv_tail, state, plan,
                                                   use_reentrant=False)
            else:
                out, conv_tail, state = self._mix_block(block, conv_tail, state, plan)
            outputs.append(out)
        return torch.cat(outputs, dim=1)

    def _recomputes(self, u, plan):
        """Whether the blocks of u are recomputed in the backward pass instead of kept."""
        return (torch.is_grad_enabled() and u.shape[1] >= plan.recompute_from
                and (u.requires_grad or self.in_proj.weight.requires_grad))

    def _conv_inputs(self, u):
        """The causal conv's inputs (x, B and C before the conv) of the tokens u."""
        return self.in_proj(u)[..., self.d_inner:self.d_inner + self.conv_dim]

    def _mix_block(self, u, conv_tail, state, plan):
        """One block of tokens, continuing from the previous block's last d_conv - 1 conv inputs
        (b, d_conv - 1, conv_dim) and SSD state (b, h, p, n); both None at the start."""
        b, l, _ = u.shape
        g, n, h, p = self.ngroups, self.d_state, self.nheads, self.headdim
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, h], dim=-1)
        # Causal conv: output t sees inputs t-3..t, the first ones from the previous block.
        history = self.conv1d.kernel_size[0] - 1
        if conv_tail is None:
            conv_tail = xBC.new_zeros(b, history, self.conv_dim)
        xBC = torch.cat([conv_tail, xBC], dim=1)                          # (b, history + l, c)
        # a copy, not a view: the next block's recompute keeps it, and a view would keep this whole
        # block's conv input alive with it
        conv_tail = xBC[:, xBC.shape[1] - history:].clone()
        xBC = F.conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                       groups=self.conv_dim)
        x, B, C = F.silu(xBC.transpose(1, 2)).split([self.d_inner, g * n, g * n], dim=-1)
        dtype = _compute_dtype(x)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))          # (b, l, h)
        A = -torch.exp(self.A_log.to(dtype))                             # (h,)
        x = x.reshape(b, l, h, p)
        y, state = ssd_chunked(x, dt, A, B.reshape(b, l, g, n), C.reshape(b, l, g, n),
                               min(self.chunk_size, plan.chunk), block_size=plan.block,
                               initial_state=state, return_final_state=True, plan=plan)
        y = y + self.D.to(dtype)[:, None] * x.to(dtype)                  # skip connection
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y.to(u.dtype)), conv_tail, state

    # The kernel tiers ("Optional CUDA kernels", after the models): mamba-ssm's fused op, or its Triton
    # SSD scan between this module's conv and gated norm; each takes and returns what _torch does.

    def kernel_path(self, u):
        """The tier this input takes (see the kernel notes at the top of the file): a kernel
        only on CUDA, below float64, for a configuration the kernels support."""
        if not (USE_KERNELS and u.is_cuda and u.dtype != torch.float64 and self.kernel_accepts_config()):
            return "torch_chunked_ssd"
        if USE_FUSED_MAMBA and _mamba_fused_scan() is not None:
            return "mamba_ssm_fused"
        if _mamba_chunk_scan() is not None:
            return "mamba_ssm_triton_ssd"
        _require_kernels(self)
        return "torch_chunked_ssd"

    def kernel_accepts_config(self):
        """What mamba-ssm's fused op supports: causal-conv1d takes widths 2 to 4 and channel
        counts that are multiples of 8. Other configurations take the PyTorch path."""
        return 2 <= self.conv1d.kernel_size[0] <= 4 and self.conv_dim % 8 == 0

    def _in_kernel_batches(self, run, t):
        """run(t) in batch slices that keep one kernel call under the int32 offset limit (13
        images of Adventurer-B at 224 px, patch 1); a batch that fits is passed as it is."""
        max_batch = kernel_batch_limit(t.shape[1], self.in_proj.out_features)
        if max_batch == 0:
            raise ValueError(f"a single sequence of {t.shape[1]} tokens x {self.in_proj.out_features} "
                             f"channels exceeds the mamba-ssm kernels' int32 limit; "
                             f"set pixelvit.USE_KERNELS = False")
        if t.shape[0] <= max_batch:
            return run(t)
        return torch.cat([run(part) for part in t.split(max_batch)], dim=0)

    def _fused(self, zxbcdt):
        """mamba-ssm's fused conv1d + scan + gated norm + out_proj."""
        fused = functools.partial(
            _mamba_fused_scan(), conv1d_weight=self.conv1d.weight.squeeze(1),
            conv1d_bias=self.conv1d.bias, dt_bias=self.dt_bias, A=-torch.exp(self.A_log.float()),
            D=self.D, chunk_size=self.chunk_size, activation="silu",
            rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.eps,
            outproj_weight=self.out_proj.weight, outproj_bias=None, headdim=self.headdim,
            ngroups=self.ngroups, norm_before_gate=False)
        return self._in_kernel_batches(fused, zxbcdt)

    def _triton_ssd(self, u):
        """mamba-ssm's Triton SSD scan between a PyTorch causal conv and the PyTorch gated norm."""
        return self._in_kernel_batches(self._triton_ssd_batch, u)

    def _triton_ssd_batch(self, u):
        b, l, _ = u.shape
        g, n, h, p = self.ngroups, self.d_state, self.nheads, self.headdim
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, h], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :l].transpose(1, 2))   # causal: crop
        x, B, C = xBC.split([self.d_inner, g * n, g * n], dim=-1)
        y = _mamba_chunk_scan()(x.reshape(b, l, h, p), dt, -torch.exp(self.A_log.float()),
                                B.reshape(b, l, g, n), C.reshape(b, l, g, n), self.chunk_size,
                                D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y.to(u.dtype))

    # Context parallelism ("Context parallelism", at the end of the file): what a rank's stretch adds to
    # the state that the ranks exchange.

    def final_state(self, u, history=None):
        """The SSD state after u from a zero state, and the total log-decay over u (b, h): what a
        rank contributes to the exchange of context parallelism (`ssd_final_state`). Block by
        block as `_torch`, but with only the in_proj rows and conv channels that feed the state
        (x, B and dt; z and C only shape outputs)."""
        plan = scan_plan(u.device)
        recompute = self._recomputes(u, plan)
        conv_tail = None
        if history is not None:        # the conv inputs of x and B only
            conv_tail = self._conv_inputs(history)[..., :self.d_inner + self.ngroups * self.d_state]
        state = log_decay = None
        for block in u.split(plan.block, dim=1):
            if recompute:
                added, decay, conv_tail = checkpoint(self._state_block, block, conv_tail, use_reentrant=False)
            else:
                added, decay, conv_tail = self._state_block(block, conv_tail)
            state = added if state is None else torch.exp(decay)[..., None, None] * state + added
            log_decay = decay if log_decay is None else log_decay + decay
        return state, log_decay

    def _state_block(self, u, conv_tail):
        """One block's (state from zeros, log-decay, last conv inputs of x and B)."""
        b, l, _ = u.shape
        g, n, h, p = self.ngroups, self.d_state, self.nheads, self.headdim
        channels = self.d_inner + g * n                                   # x and B
        xB = F.linear(u, self.in_proj.weight[self.d_inner:self.d_inner + channels])
        dt = F.linear(u, self.in_proj.weight[-h:])
        history = self.conv1d.kernel_size[0] - 1
        if conv_tail is None:
            conv_tail = xB.new_zeros(b, history, channels)
        xB = torch.cat([conv_tail, xB], dim=1)
        conv_tail = xB[:, xB.shape[1] - history:].clone()
        xB = F.conv1d(xB.transpose(1, 2), self.conv1d.weight[:channels], self.conv1d.bias[:channels],
                      groups=channels)
        x, B = F.silu(xB.transpose(1, 2)).split([self.d_inner, g * n], dim=-1)
        dtype = _compute_dtype(x)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
        state, log_decay = ssd_final_state(x.reshape(b, l, h, p), dt, -torch.exp(self.A_log.to(dtype)),
                                           B.reshape(b, l, g, n))
        return state, log_decay, conv_tail


class SwiGLU(nn.Module):
    """Adventurer's MLP: w3(SiLU(w1 x) * w2 x), all three linears with bias."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        block = scan_plan(x.device).block
        if torch.is_grad_enabled() or x.shape[1] <= block:
            return self._hidden_and_out(x)
        # Inference keeps nothing for a backward pass, so long sequences go through in blocks of
        # tokens: the hidden activations (2.5x wider than x) stay block-sized instead of being
        # mapped afresh from the OS in every block.
        return torch.cat([self._hidden_and_out(t) for t in x.split(block, dim=1)], dim=1)

    def _hidden_and_out(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def _flip_patches(t):
    """Reverse the patch tokens of a CLS-last sequence; the CLS token stays last."""
    return torch.cat([t[:, :-1].flip(1), t[:, -1:]], dim=1)


class AdventurerBlock(nn.Module):
    """RMSNorm -> (flip) -> prepend the mean token -> Mamba-2 -> drop it -> (unflip) -> residual,
    then RMSNorm -> SwiGLU -> residual. The prepended mean ("heading average") gives the causal
    scan a summary of the whole image at its first step; it is recomputed in every block."""

    def __init__(self, dim, mixer_kwargs, mlp_hidden, drop_path=0.0, flip=False):
        super().__init__()
        self.flip = flip
        self.mixer = Mamba2Mixer(dim, **mixer_kwargs)   # registration order = official key order
        self.norm = RMSNorm(dim)
        self.drop_path = DropPath(drop_path)              # one module, a fresh mask per call
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.norm_mlp = RMSNorm(dim)

    def forward(self, x, shards=None):  # x [B, N+1, D], CLS last; with shards, this rank's stretch
        t = self.norm(x)
        t = self._mix(t) if shards is None else self._mix_sharded(t, shards)
        x = x + self.drop_path(t)
        return x + self.drop_path(self.mlp(self.norm_mlp(x)))

    def _mix(self, t):
        t = _flip_patches(t) if self.flip else t
        t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)
        t = self.mixer(t)[:, 1:]
        return _flip_patches(t) if self.flip else t

    def _mix_sharded(self, t, shards):
        """`_mix` of a sequence whose patch tokens are split over the ranks of `shards`: t is this
        rank's stretch, with CLS on the last rank. In the order of the scan (the ranks reversed in
        a flip block) each stretch continues the one before it: the mean token starts the first
        one, and CLS, last in both orders, is scanned by its own rank after every stretch."""
        has_cls = shards.rank == shards.size - 1
        patches = t[:, :-1] if has_cls else t
        place = shards.size - 1 - shards.rank if self.flip else shards.rank       # in the scan
        scan = patches.flip(1) if self.flip else patches
        halo = self.mixer.conv1d.kernel_size[0] - 1
        # exchange 1: each rank's token sum (for the mean token) and last scan inputs (the conv halo)
        mine = torch.cat([t.sum(1, keepdim=True), scan[:, scan.shape[1] - halo:]], dim=1)
        every = _AllGather.apply(mine, shards.group)                    # (size, B, 1 + halo, D)
        every = every.flip(0) if self.flip else every                   # in scan order
        tails = every[:, :, 1:]
        if place == 0:
            mean = every[:, :, :1].sum(0) / (shards.length + 1)         # over every token and CLS
            scan, history = torch.cat([mean, scan], dim=1), None
        else:
            history = tails[place - 1]
        # exchange 2: what each stretch adds to the state from a zero start, and its decay
        state, log_decay = self.mixer.final_state(scan, history)
        states = _AllGather.apply(state, shards.group)                  # (size, B, h, p, n)
        log_decays = _AllGather.apply(log_decay, shards.group)          # (size, B, h)
        if self.flip:
            states, log_decays = states.flip(0), log_decays.flip(0)
        out = self.mixer(scan, history, _carried_state(states, log_decays, place))
        out = out[:, 1:] if place == 0 else out
        out = out.flip(1) if self.flip else out
        if has_cls:
            cls = self.mixer(t[:, -1:], tails[-1], _carried_state(states, log_decays, shards.size))
            out = torch.cat([out, cls], dim=1)
        return out


# ----------------------------------------------------------------------------------------------
# Models


# Dense bf16 peak TFLOP/s by GPU name, from the vendors' data sheets (H100/H200 SXM, A100, L40S,
# A10G, RTX 4090): the denominator of `estimate_mfu`.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


def _count(n, noun):
    """'1 token', '4 tokens'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def resample_pos_embed(pos_embed, grid, cls_first):
    """Bicubically resize the patch rows of a (1, N+1, D) table to a `grid` = (h, w) layout.

    The CLS row is taken out before and put back after, at the front (DeiT) or the back
    (Adventurer). The official `--finetune` always takes the front row, which for Adventurer
    mixes the CLS embedding into the last patch row; this does not.
    """
    cls, patches = ((pos_embed[:, :1], pos_embed[:, 1:]) if cls_first
                    else (pos_embed[:, -1:], pos_embed[:, :-1]))
    n, d = patches.shape[1:]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed has {n} patch rows, which is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    patches = patches.reshape(1, side, side, d).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.flatten(2).transpose(1, 2)
    return torch.cat([cls, patches] if cls_first else [patches, cls], dim=1)


class PatchModel(nn.Module):
    """What DeiT and Adventurer share: tokenizer, CLS token, position embeddings, head, the
    classification / feature / dense interfaces, and per-block activation checkpointing.

    Subclasses set `cls_first` and register `blocks` (or `layers`) and the final norm."""

    cls_first: bool

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_size, self.extend, self.grid_size = cfg.patch, cfg.extend, cfg.grid
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_prefix_tokens = 1
        self.cls_index = 0 if self.cls_first else -1
        self.grad_checkpointing = False
        self.context_group = None
        self.pretrained_cfg = dict(
            input_size=(cfg.in_chans, cfg.res, cfg.res), num_classes=cfg.num_classes,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
            crop_pct=1.0 if cfg.patch == 1 else 0.875,  # the official patch-1 evaluation uses 1.0
            first_conv="patch_embed.proj", classifier="head")

    def _init_common(self):
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2 + 1, self.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _depth_drop_rates(self):
        """Stochastic depth rising linearly from 0 at the first block to drop_path at the last."""
        depth = self.cfg.depth
        return [self.cfg.drop_path * i / max(depth - 1, 1) for i in range(depth)]

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def estimate_flops(self, res=None):
        """Analytic forward FLOPs per image at `res` x `res` input (default: the configured size),
        1 multiply-add = 2 FLOPs: the matmuls, convolutions and token mixing of every block, the
        tokenizer and the head; norms and element-wise operations are left out. Training costs
        about 3x this (forward + backward)."""
        res = res or self.cfg.res
        tokens = (res // self.patch_size * self.extend) ** 2 + 1
        d, cfg = self.embed_dim, self.cfg
        return cfg.depth * self._block_flops(tokens) + 2 * res * res * cfg.in_chans * d + 2 * d * cfg.num_classes

    def estimate_mfu(self, images_per_second, res=None, device_name=None):
        """Model FLOPs utilisation of a training run at this throughput: 3x the forward FLOPs per
        image against the device's dense bf16 peak (PEAK_TFLOPS by name; None for other devices)."""
        name = device_name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
        return None if peak is None else 3 * self.estimate_flops(res) * images_per_second / (peak * 1e12)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        """Recompute each block in the backward pass: ~4.5x less activation memory, one extra
        forward of compute."""
        self.grad_checkpointing = enable

    def compile_blocks(self, **kwargs):
        """torch.compile each block in place ("regional" compilation) and return the model.
        The blocks share their compiled code (one graph per flip state), so compiling costs about
        one block's worth, where torch.compile(model) unrolls and compiles every block. The
        Mamba-2 path compiles without graph breaks (fullgraph=True works)."""
        for block in self.blocks:
            block.compile(**kwargs)
        return self

    def set_context_parallel(self, group):
        """Share each image's tokens among the ranks of `group`, a torch.distributed process group
        (None: every rank holds whole images, the default). Every rank of the group passes the
        same images; each tokenizes and keeps one stretch of the sequence, and the mixers exchange
        what they need (see "Context parallelism" above). `forward` and `forward_head` return the
        whole result on every rank; `forward_features` returns this rank's stretch; `forward_dense`
        gathers the whole map onto every rank.

        Gradients: every rank computes the same loss, and each rank's parameter gradients come out
        as `size` times its share, so that averaging over all ranks (DDP over the world does) gives
        the one-device gradient. Drop path must draw the same masks on the ranks of a group."""
        if group is not None:
            size = dist.get_world_size(group)
            if isinstance(self, DeiT) and self.cfg.num_heads % size:
                raise ValueError(f"context parallelism over {size} ranks needs the attention heads "
                                 f"({self.cfg.num_heads}) to divide evenly among them")
            self._check_split(self.grid_size ** 2, size)   # the configured input (extend included)
        self.context_group = group
        return self

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _tokens(self, images):
        """Images -> [B, N+1, D] tokens with position embeddings, the token grid (h, w), and the
        `SequenceShards` (None on one device). With context parallelism the tokens are this
        rank's stretch (with CLS on its rank), and only the image rows under it are tokenized."""
        c, p = self.cfg.in_chans, self.patch_size
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"expected images of shape [B, {c}, H, W], got {tuple(images.shape)}")
        if images.shape[2] % p or images.shape[3] % p:
            raise ValueError(f"H and W must be multiples of the patch size {p}, got "
                             f"{images.shape[2]}x{images.shape[3]}")
        grid = (images.shape[2] // p * self.extend, images.shape[3] // p * self.extend)
        shards = self._shards(grid[0] * grid[1])
        start, stop = (0, grid[0] * grid[1]) if shards is None else shards.bounds()
        if self.extend > 1:  # interpolate tokens: a longer sequence with no new information
            x = F.interpolate(self.patch_embed(images), scale_factor=self.extend, mode="bilinear",
                              align_corners=False).flatten(2).transpose(1, 2)[:, start:stop]
        else:                # the image rows that hold this stretch's tokens
            first, end = start // grid[1], -(-stop // grid[1])
            x = self.patch_embed(images[:, :, first * p:end * p])  # [B, D, rows, W/p]
            x = x.flatten(2).transpose(1, 2)[:, start - first * grid[1]:stop - first * grid[1]]
        pos = resample_pos_embed(self.pos_embed, grid, self.cls_first)
        pos_patches, pos_cls = (pos[:, 1:], pos[:, :1]) if self.cls_first else (pos[:, :-1], pos[:, -1:])
        x = x + pos_patches[:, start:stop]                    # [B, stop - start, D], raster order
        if shards is None or shards.rank == self._cls_rank(shards):
            cls = (self.cls_token + pos_cls).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x] if self.cls_first else [x, cls], dim=1)
        return x, grid, shards

    def _shards(self, length):
        """How this rank's group splits a sequence of `length` patch tokens (None on one device)."""
        if self.context_group is None:
            return None
        shards = SequenceShards(self.context_group, dist.get_rank(self.context_group),
                                dist.get_world_size(self.context_group), length)
        self._check_split(length, shards.size)
        return shards

    def _check_split(self, length, size):
        """Each rank needs a token; each Mamba-2 stretch the conv's whole halo, from one rank."""
        least = self.cfg.d_conv - 1 if isinstance(self, Adventurer) else 1
        if length // size < least:
            raise ValueError(f"{_count(length, 'token')} cannot be split over {_count(size, 'rank')}: each rank "
                             f"needs at least {least} (a larger image or a smaller patch, or fewer ranks)")

    def _cls_rank(self, shards):
        return 0 if self.cls_first else shards.size - 1

    def _run_blocks(self, x, keep=(), shards=None):
        """Run the blocks; return the last output and the outputs of the block indices in keep.
        Stops after the last block that is needed."""
        kept = {}
        last = max(keep) if keep else len(self.blocks) - 1
        for i, block in enumerate(self.blocks[:last + 1]):
            if self.grad_checkpointing and torch.is_grad_enabled():
                # a recompute that stopped early could skip an exchange that the other ranks run
                with set_checkpoint_early_stop(shards is None):
                    x = checkpoint(block, x, shards, use_reentrant=False)
            else:
                x = block(x, shards)
            if i in keep:
                kept[i] = x
        return x, kept

    def _to_map(self, tokens, grid):
        """[B, N+1, D] tokens -> [B, D, h, w] map of the patch tokens (CLS dropped)."""
        patches = tokens[:, 1:] if self.cls_first else tokens[:, :-1]
        return patches.transpose(1, 2).unflatten(2, tuple(grid))

    def forward_features(self, images):
        """[B, N+1, D] tokens after the final norm, CLS first (DeiT) or last (Adventurer); with
        context parallelism, this rank's stretch."""
        x, _, shards = self._tokens(images)
        x, _ = self._run_blocks(x, shards=shards)
        return self.final_norm(x)

    def forward_head(self, tokens, pre_logits=False):
        cls = tokens[:, self.cls_index]
        if self.context_group is not None:   # CLS is on one rank; every rank takes it from there
            owner = 0 if self.cls_first else dist.get_world_size(self.context_group) - 1
            cls = _AllGather.apply(cls, self.context_group)[owner]
        return cls if pre_logits else self.head(cls)

    def forward(self, images):
        return self.forward_head(self.forward_features(images))

    def forward_dense(self, images, layers=None):
        """Dense feature maps at the token grid: [B, D, H/p, W/p] (times `extend`).

        layers=None: the final-normed tokens. A list of block indices (negative ones count from
        the end): the residual stream after each of those blocks, as a list of maps, for heads
        that fuse several depths (UperNet, detection pyramids)."""
        x, grid, shards = self._tokens(images)
        whole = (lambda t: t) if shards is None else (lambda t: _gather_sequence(t, shards, self._cls_rank(shards)))
        if layers is None:
            x, _ = self._run_blocks(x, shards=shards)
            return self._to_map(whole(self.final_norm(x)), grid)
        depth = len(self.blocks)
        if any(not -depth <= i < depth for i in layers):
            raise ValueError(f"layers must be block indices in [-{depth}, {depth}), got {list(layers)}")
        wanted = [i % depth for i in layers]
        _, kept = self._run_blocks(x, keep=set(wanted), shards=shards)
        return [self._to_map(whole(kept[i]), grid) for i in wanted]


class DeiT(PatchModel):
    """ViT / DeiT with timm `VisionTransformer` keys: [CLS, patches] + pos_embed, pre-norm
    attention blocks, LayerNorm, head on the CLS token."""

    cls_first = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch)
        self._init_common()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(DeiTBlock(cfg.embed_dim, cfg.num_heads, hidden, rate)
                                    for rate in self._depth_drop_rates())
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.reset_classifier(cfg.num_classes)
        for m in self.blocks.modules():  # timm/DeiT init: every Linear trunc-normal(0.02), bias 0
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def final_norm(self):
        return self.norm

    def _block_flops(self, tokens):
        """qkv, proj and MLP per token, and 4 L^2 D for QK^T and AV."""
        d, hidden = self.embed_dim, int(self.embed_dim * self.cfg.mlp_ratio)
        return 2 * tokens * (4 * d * d + 2 * d * hidden) + 4 * tokens**2 * d


class Adventurer(PatchModel):
    """Adventurer (Wang et al., 2024) with Patch_Scaling `models_mamba.py` keys: [patches, CLS] +
    pos_embed, Mamba-2 + SwiGLU blocks, RMSNorm, head on the CLS token (last)."""

    cls_first = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch)
        self._init_common()
        self.reset_classifier(cfg.num_classes)
        mixer_kwargs = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                            headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size)
        flips = FLIP_SCHEDULES[cfg.flip_schedule]
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.layers = nn.ModuleList(
            AdventurerBlock(cfg.embed_dim, mixer_kwargs, hidden, rate, flip=flips(i))
            for i, rate in enumerate(self._depth_drop_rates()))
        self.norm_f = RMSNorm(cfg.embed_dim)
        self._init_weights()

    def _depth_drop_rates(self):
        # The official rule is [0] + linspace(0, rate, depth), indexed by block: blocks 0 and 1
        # get 0 and the last block a little less than `rate`. Kept so that recipes reproduce.
        return [0.0] + super()._depth_drop_rates()[:-1]

    def _init_weights(self):
        """The official initialisation: lecun-normal tokenizer, zero Linear biases, and each
        mixer's out_proj re-drawn and scaled by 1/sqrt(depth) (Mamba's prenorm-residual rule)."""
        fan_in = self.cfg.in_chans * self.patch_size**2
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1 / fan_in) / 0.87962566103423978)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, Mamba2Mixer):
                nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    m.out_proj.weight /= math.sqrt(self.cfg.depth)

    @property
    def blocks(self):
        return self.layers

    @property
    def final_norm(self):
        return self.norm_f

    def _block_flops(self, tokens):
        """Per token (the mixer also sees the mean token): in_proj, depthwise conv, out_proj and
        SwiGLU, and the SSD scan with the kernels' chunk Q = 256 (C.B^T, its masked product with x,
        chunk states, state output)."""
        cfg, d = self.cfg, self.embed_dim
        inner, n, g, hidden = cfg.expand * d, cfg.d_state, cfg.ngroups, int(d * cfg.mlp_ratio)
        length = tokens + 1
        heads, q = inner // cfg.headdim, min(256, length)     # a short sequence is one partial chunk
        width = 2 * inner + 2 * g * n + heads
        linear = 2 * (d * width + cfg.d_conv * (inner + 2 * g * n) + inner * d)
        ssd = 2 * q * n * g + 2 * q * inner + 4 * n * inner
        return length * (linear + ssd) + tokens * 6 * d * hidden


def list_models(aliases=False):
    """The model names of the paper's Table 7 (and the accepted official/timm aliases)."""
    return sorted(MODEL_CONFIGS) + (sorted(MODEL_ALIASES) if aliases else [])


# timm's keyword names, accepted by create_model for the ones it documents
TIMM_KEYWORDS = {"patch_size": "patch", "img_size": "res", "drop_path_rate": "drop_path"}


def create_model(name, *, patch=None, res=None, num_classes=1000, in_chans=3, drop_path=0.0,
                 **overrides):
    """Build a model by name at any patch size (default 16, or the one an alias names).

    `overrides` sets any other `ModelConfig` field: embed_dim, depth, num_heads, mlp_ratio,
    extend, flip_schedule, d_state, headdim, ngroups, chunk_size, ... timm's names for the first
    three keywords work too: patch_size, img_size (an int or a square (h, w)), drop_path_rate.
    """
    given = {"patch": patch, "res": res, "drop_path": drop_path}
    for timm_name, ours in TIMM_KEYWORDS.items():
        if timm_name not in overrides:
            continue
        value = overrides.pop(timm_name)
        if timm_name == "img_size" and isinstance(value, (tuple, list)):
            if len(value) != 2 or value[0] != value[1]:
                raise ValueError(f"img_size must be an int or a square (h, w), got {value!r}: models are built "
                                 f"square, and any input size the patch divides works at run time")
            value = value[0]
        if given[ours] not in (None, 0.0) and given[ours] != value:
            raise ValueError(f"{ours}={given[ours]} and {timm_name}={value} were both given: name it once")
        given[ours] = value
    patch, res, drop_path = given["patch"], given["res"], given["drop_path"]
    alias = MODEL_ALIASES.get(name, {})
    base = alias.get("name", name)
    if base not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())} "
                         f"(or an official/timm alias: {', '.join(sorted(MODEL_ALIASES))})")
    for key, value in (("patch", patch), ("res", res)):
        if value is not None and key in alias and value != alias[key]:
            raise ValueError(f"{name} is {key} {alias[key]}, but {key}={value} was asked for")
    valid = {f.name for f in fields(ModelConfig)} - {"arch"}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    cfg = ModelConfig(**{**MODEL_CONFIGS[base], **overrides,
                         "patch": alias.get("patch", 16) if patch is None else patch,
                         "res": alias.get("res", 224) if res is None else res,
                         "num_classes": num_classes, "in_chans": in_chans, "drop_path": drop_path})
    if cfg.arch == "adventurer" and "num_heads" in overrides:
        raise ValueError("num_heads is a DeiT option; Adventurer heads are expand*embed_dim/headdim")
    model = (Adventurer if cfg.arch == "adventurer" else DeiT)(cfg)
    model.name = base
    return model


# ----------------------------------------------------------------------------------------------
# Decoder-free segmentation (paper Sec. 3.2 / Table 2)


class DecoderFreeHead(nn.Module):
    """The paper's decoder-free segmentation head: one linear map from each dense token to the
    class logits (a 1x1 conv on `forward_dense` output), bilinearly upsampled to the image size.
    At patch 1 the logits are already at full resolution and the upsampling is the identity."""

    def __init__(self, embed_dim, num_classes):
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.proj.weight, std=0.01)  # mmseg's init for its final classifier
        nn.init.zeros_(self.proj.bias)

    def forward(self, features, size):  # features [B, D, h, w] -> logits [B, classes, *size]
        logits = self.proj(features)
        if logits.shape[-2:] == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def resample_patch_embed(weight, patch):
    """FlexiViT's pseudo-inverse resize of a (D, C, p, p) tokenizer to (D, C, patch, patch).

    With R the bilinear (antialiased) resize of a p x p patch to patch x patch, the new weights
    solve min ||R^T w_new - w||: a resized patch gives the same token as the original patch,
    exactly when upsampling (R injective) and in the least-squares sense when downsampling.
    """
    old = weight.shape[-1]
    if old == patch:
        return weight
    basis = torch.eye(old * old, dtype=torch.float64).view(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(patch, patch), mode="bilinear", antialias=True,
                            align_corners=False).view(old * old, patch * patch)  # R^T
    flat = weight.to(torch.float64).flatten(2).transpose(1, 2)                      # (D, p*p, C)
    new = torch.linalg.pinv(resized) @ flat                                         # (D, patch^2, C)
    return new.transpose(1, 2).reshape(*weight.shape[:2], patch, patch).to(weight.dtype)


def _read_checkpoint(path):
    """torch.load with weights_only=True. argparse.Namespace (the `args` entry that the official
    main.py pickles) is allowed: rebuilding one only sets attributes and runs no code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} needs pickle to load objects other than tensors ({e}). Refusing to run its code. "
            f"If you trust the file, convert it once to a plain state dict:\n"
            f"  python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save(c.get('model', c), 'weights.pth')\"") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def _state_dict_of(obj, use_ema):
    """Find the weights in a checkpoint container and strip DDP / torch.compile prefixes."""
    keys = (("model_ema", "state_dict_ema") if use_ema else
            ("model", "state_dict", "model_ema", "state_dict_ema"))
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = [k for k in keys if isinstance(obj.get(k), dict)]
        if not found:
            raise ValueError(f"checkpoint has no weights under {list(keys)}; its keys are "
                             f"{sorted(obj)[:10]}")
        obj = obj[found[0]]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict mapping parameter names to tensors")
    prefixes = ("module.", "_orig_mod.")
    stripped = {}
    for key, value in obj.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def read_state_dict(checkpoint, use_ema=False):
    """The weights in a checkpoint (a path, a container such as {"model": ...}, or a state dict),
    with DDP / torch.compile prefixes stripped; a new dict, safe to modify."""
    source = checkpoint if isinstance(checkpoint, dict) else _read_checkpoint(checkpoint)
    return _state_dict_of(source, use_ema)


def load_checkpoint(model, checkpoint, strict=True, use_ema=False):
    """Load weights (a path or a state dict / checkpoint container) into a pixelvit model.

    Adapts what a change of resolution, patch size or class count requires: pos_embed is
    resampled with its CLS row kept apart, the tokenizer is PI-resized, and a head for another
    number of classes is left at the model's own initialisation (with a warning). Any other
    difference is an error that names the keys. Returns (missing_keys, unexpected_keys), which
    strict=False tolerates and strict=True refuses.
    """
    state = read_state_dict(checkpoint, use_ema)
    own = model.state_dict()

    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (model.grid_size,) * 2,
                                                model.cls_first)
    key = "patch_embed.proj.weight"
    if key in state and state[key].shape[-1] != own[key].shape[-1]:
        state[key] = resample_patch_embed(state[key], model.patch_size)
    head, own_head = state.get("head.weight"), own.get("head.weight")
    if (head is not None and own_head is not None and head.shape[1:] == own_head.shape[1:]
            and head.shape[0] != own_head.shape[0]):  # another class count, same width
        warnings.warn(f"checkpoint head has {state['head.weight'].shape[0]} classes, the model "
                      f"{model.num_classes}: the head keeps its fresh initialisation", stacklevel=2)
        state["head.weight"], state["head.bias"] = own["head.weight"], own["head.bias"]

    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError("checkpoint does not fit this model (is it for another model size?):\n  "
                         + "\n  ".join(wrong))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint keys do not match the model (strict=True).\n"
                       f"  missing from checkpoint ({len(missing)}): {missing[:10]}\n"
                       f"  unexpected in checkpoint ({len(unexpected)}): {unexpected[:10]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected


def infer_model_args(checkpoint):
    """The `create_model` arguments that fit a checkpoint (path or dict), read off its shapes:
    name (by width and depth), patch (tokenizer kernel), res (pos_embed grid x patch), num_classes.

    A checkpoint trained with extend > 1 reads as res x extend; pass res yourself for those."""
    state = read_state_dict(checkpoint)
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError("expected a DeiT or Adventurer state dict with patch_embed.proj.weight and pos_embed")
    arch, prefix = ("adventurer", "layers.") if any(k.startswith("layers.") for k in state) else ("deit", "blocks.")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith(prefix))
    name = next((n for n, c in MODEL_CONFIGS.items()
                 if (c["arch"], c["embed_dim"], c["depth"]) == (arch, width, depth)),
                None)
    if name is None:
        raise ValueError(f"no {arch} model in Table 7 has width {width} and depth {depth}")
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    head = state.get("head.weight")
    return dict(name=name, patch=patch, res=grid * patch, num_classes=0 if head is None else head.shape[0])


# ----------------------------------------------------------------------------------------------
# Optional CUDA kernels. Imported lazily: mamba-ssm and flash-attn import only where they were
# built against CUDA, and `import mamba_ssm` alone pulls in far more than the ops we need.
#
# The Mamba-2 mixer takes the first of three tiers that works:
#   "mamba_ssm_fused"       mamba-ssm's fused conv + scan + gated norm + out_proj (needs causal-conv1d)
#   "mamba_ssm_triton_ssd"  mamba-ssm's Triton SSD scan (`mamba_chunk_scan_combined`), with the causal
#                           conv and the gated norm in PyTorch: what mamba-ssm's own `Mamba2` runs
#                           without causal-conv1d; no CUDA build, Triton compiles at run time
#   "torch_chunked_ssd"     the exact PyTorch path above, on every device

# The mamba-ssm Triton kernels compute pointer offsets in int32 (state-spaces/mamba #1015), so
# one call must keep batch * seqlen * in_proj width below 2**31 or it silently corrupts memory.
INT32_LIMIT = 2**31 - 1


def kernel_batch_limit(seqlen, width):
    """Most sequences one mamba-ssm kernel call may take: 13 for Adventurer-B at 224 px, patch 1."""
    return INT32_LIMIT // (seqlen * width)


KERNEL_PROBLEMS = {}   # kernel tier -> why it cannot be used, filled by the lookups below


def _kernel_unavailable(tier, reason):
    """A kernel tier that cannot be used: its reason is kept for `backends()` and, where CUDA is
    present, said once in a warning; the next tier (at last the exact PyTorch path) runs instead."""
    KERNEL_PROBLEMS[tier] = reason
    if torch.cuda.is_available():
        warnings.warn(f"{tier} kernels unavailable ({reason}); the next path is used instead",
                      stacklevel=3)


def _require_kernels(module):
    """With REQUIRE_KERNELS (PIXELVIT_REQUIRE_KERNELS=1: GPU tests, GPU benchmarks), a CUDA forward
    that would take the PyTorch path for want of a kernel is an error instead of a slow run."""
    if REQUIRE_KERNELS:
        raise RuntimeError(f"{type(module).__name__} found no usable kernel on CUDA "
                           f"({backends()['why']}), but PIXELVIT_REQUIRE_KERNELS=1 requires one")


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception as e:  # not installed, or built for another torch/CUDA
        return _kernel_unavailable("flash_attn", f"{type(e).__name__}: {e}")
    return flash_attn_func


@functools.cache
def _mamba_ssd_module():
    try:
        from mamba_ssm.ops.triton import ssd_combined
    except Exception as e:  # not installed, or built for another torch/CUDA
        return f"{type(e).__name__}: {e}"
    return ssd_combined


@functools.cache
def _mamba_chunk_scan():
    module = _mamba_ssd_module()
    if isinstance(module, str):
        return _kernel_unavailable("mamba_ssm_triton_ssd", module)
    return module.mamba_chunk_scan_combined


@functools.cache
def _mamba_fused_scan():
    module = _mamba_ssd_module()
    if isinstance(module, str):
        return _kernel_unavailable("mamba_ssm_fused", module)
    # mamba-ssm imports causal-conv1d inside a try and leaves its functions None when causal-conv1d
    # is missing (or, from mamba-ssm 2.2.5, older than 1.5.1); the fused op then fails at its first
    # call with "'NoneType' object is not callable".
    conv_functions = ("causal_conv1d_fn", "causal_conv1d_cuda", "causal_conv1d_fwd_function",
                      "causal_conv1d_bwd_function")
    if any(hasattr(module, f) and getattr(module, f) is None for f in conv_functions):
        return _kernel_unavailable("mamba_ssm_fused", "mamba-ssm found no usable causal-conv1d; "
                                                      "mamba-ssm >= 2.2.5 needs causal-conv1d >= 1.5.1")
    return module.mamba_split_conv1d_scan_combined


def backends(model=None):
    """Which kernel paths the token mixers can take, and why a missing one is missing.

    Without a model: which optional kernel tiers are importable ("flash_attn", "mamba_ssm_fused",
    "mamba_ssm_triton_ssd") and enabled, with "why" for each one that is not. With a model: also
    the path every mixer took in its most recent forward ("flash_attn", "sdpa", one of the Mamba
    tiers above or "torch_chunked_ssd"), since the path depends on device and dtype at call time.
    """
    report = {
        "kernels_enabled": USE_KERNELS,
        "flash_attn": _flash_attn_func() is not None,
        "mamba_ssm_fused": _mamba_fused_scan() is not None,
        "mamba_ssm_triton_ssd": _mamba_chunk_scan() is not None,
    }
    report["why"] = {tier: KERNEL_PROBLEMS[tier] for tier in report if tier in KERNEL_PROBLEMS}
    if model is not None:
        report["mixers"] = {name: m.last_path for name, m in model.named_modules()
                            if isinstance(m, (Attention, Mamba2Mixer))}
    return report


# ----------------------------------------------------------------------------------------------
# Context parallelism: one image's tokens shared by the ranks of a process group.
#
# Each rank holds one contiguous stretch of the patch tokens in raster order, the stretches as
# equal as the length allows; the CLS token stays with the rank at its end of the sequence (the
# first rank for DeiT, the last for Adventurer). Tokenizer, norms and MLPs work per token and run
# on the stretch alone. Two token mixers need the other ranks:
#   * Mamba-2: the scan is affine in its starting state, S_out = a * S_in + S_ext. Each rank finds
#     its stretch's (S_ext, log a) from a zero state, the ranks all-gather them (a few numbers per
#     head, whatever the length), and each rank scans its stretch from its true starting state,
#     an exclusive scan over the ranks before it. The causal conv takes the previous stretch's last
#     d_conv - 1 inputs (the halo), the mean token is a sum over every rank's tokens.
#   * Attention: an all-to-all trades tokens for heads (DeepSpeed-Ulysses), each rank attends over
#     the whole sequence with its share of the heads, and a second all-to-all trades back.
# The exchanges are autograd functions: the backward of an all-gather sums each piece's gradient
# over the ranks (an all-reduce), that of an all-to-all is the all-to-all back. Every rank runs the
# backward of every exchange, in the same order, so every rank uses part of every gathered tensor.


@dataclass(frozen=True)
class SequenceShards:
    """How `length` patch tokens are split over the `size` ranks of `group`: contiguous stretches
    in raster order, the first `length % size` ranks one token longer; `rank` is this rank's."""
    group: object
    rank: int
    size: int
    length: int

    def bounds(self, rank=None):
        """[start, stop) of a rank's stretch (this rank's by default)."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(self.length, self.size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def lengths(self, cls_rank):
        """Every rank's number of tokens, the CLS token counted on `cls_rank`."""
        stretches = map(self.bounds, range(self.size))
        return [stop - start + (rank == cls_rank) for rank, (start, stop) in enumerate(stretches)]


class _AllGather(torch.autograd.Function):
    """Every rank's x, stacked by rank: (size, *x.shape)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x, group=group)
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)       # every rank's gradient for every piece
        return grad[dist.get_rank(ctx.group)], None


class _AllToAll(torch.autograd.Function):
    """Piece i of x (its first dimension, one piece per rank) goes to rank i; returns the pieces
    received, stacked by sender."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _carried_state(states, log_decays, place):
    """The state entering the stretch at `place` in the scan: sum over the earlier stretches j of
    exp(log-decay of the stretches between j and place) * S_ext_j. states (size, b, h, p, n) and
    log_decays (size, b, h) are in scan order; the later stretches get weight exp(-inf) = 0, so
    that every rank, the first too, takes part in the gradient of both exchanges."""
    j = torch.arange(states.shape[0], device=states.device)
    between = ((j[None, :] > j[:, None]) & (j[None, :] < place)).to(log_decays.dtype)   # [j, k]
    # a masked sum, not a matrix product, which autocast would round to bf16
    log_weight = (between[:, :, None, None] * log_decays[None]).sum(1)     # (size, b, h)
    log_weight = log_weight.masked_fill((j >= place)[:, None, None], -torch.inf)
    return (torch.exp(log_weight)[..., None, None] * states).sum(0)


def _gather_sequence(x, shards, cls_rank):
    """This rank's stretch [B, n_r (+ CLS), D] -> the whole sequence [B, N + 1, D] on every rank."""
    lengths = shards.lengths(cls_rank)
    padded = F.pad(x, (0, 0, 0, max(lengths) - x.shape[1]))
    every = _AllGather.apply(padded, shards.group)                    # (size, B, longest, D)
    return torch.cat([every[r, :, :length] for r, length in enumerate(lengths)], dim=1)


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    """Build a model by name and time one forward pass on random images; returns its outputs."""
    parser = argparse.ArgumentParser(description="Build a model and run one forward pass.")
    parser.add_argument("model", nargs="?", default="adv_t", help=f"one of {list_models()} or an alias")
    parser.add_argument("--patch", type=int, default=None, help="patch size (default: 16, or the alias's)")
    parser.add_argument("--res", type=int, default=None, help="input size in pixels (default: 224)")
    parser.add_argument("--batch", type=int, default=1, help="number of random images")
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks than the model has, for a quick look")
    args = parser.parse_args(argv)
    overrides = {} if args.depth is None else dict(depth=args.depth)
    model = create_model(args.model, patch=args.patch, res=args.res, **overrides).eval()
    images = torch.randn(args.batch, model.cfg.in_chans, model.cfg.res, model.cfg.res)
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.forward_features(images)
        logits = model.forward_head(tokens)
    tokens_text = _count(model.grid_size ** 2, "token")
    print(f"{args.model}: patch {model.patch_size} at {model.cfg.res} px -> {tokens_text} + CLS, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters\n"
          f"logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}, "
          f"mixers: {sorted(set(backends(model)['mixers'].values()))}, "
          f"forward pass: {time.perf_counter() - start:.1f} s")
    return logits, tokens


if __name__ == "__main__":
    main()
