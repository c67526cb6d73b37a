"""Independent references for the tests, written from the official sources (wangf3014/Patch_Scaling
`models_mamba.py` and `mamba_custom.py`, state-spaces/mamba 2.0.4 `Mamba2`) and the papers,
sharing no code with pixelvit.py.

* `ssd_quadratic`: the SSD layer in its "attention" (dual) form, one full L x L matrix.
* `adventurer_reference`: the whole official Adventurer forward as plain functions of a state dict
  keyed like the released checkpoints (explicit unfold tokenizer, shifted-sum causal conv, the
  quadratic SSD, CLS last, heading average, flips).
"""
import torch
import torch.nn.functional as F


def ssd_quadratic(x, dt, A, B, C):
    """y_t = sum_{s<=t} (C_t . B_s) exp(A * (dt_{s+1} + ... + dt_t)) dt_s x_s, as one matrix product.

    x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n). Float64 only (no care for range).
    """
    h, g = x.shape[2], B.shape[2]
    Bh = B.repeat_interleave(h // g, dim=2)
    Ch = C.repeat_interleave(h // g, dim=2)
    log_decay = torch.cumsum(dt * A, dim=1)                              # (b, l, h)
    diff = log_decay[:, :, None, :] - log_decay[:, None, :, :]           # (b, t, s, h)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, :, :, None]
    L = torch.where(causal, torch.exp(torch.where(causal, diff, 0.0)), 0.0)
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh) * L
    return torch.einsum("btsh,bshp->bthp", scores, x * dt[..., None])


def _rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _mixer(sd, pre, u):
    return mixer_after_in_proj(sd, pre, u @ sd[pre + "in_proj.weight"].T)


def mixer_after_in_proj(sd, pre, zxbcdt):
    """Mamba-2 from the in_proj output on (what mamba-ssm's fused `mamba_split_conv1d_scan_combined`
    computes): conv, SSD, D skip, gated RMSNorm, out_proj."""
    d_inner = sd[pre + "out_proj.weight"].shape[1]
    nheads = sd[pre + "A_log"].shape[0]
    d_state = (zxbcdt.shape[-1] - 2 * d_inner - nheads) // 2   # in_proj rows: [z | x | B | C | dt]
    headdim = d_inner // nheads
    z = zxbcdt[..., :d_inner]
    xBC = zxbcdt[..., d_inner:2 * d_inner + 2 * d_state]
    dt = zxbcdt[..., 2 * d_inner + 2 * d_state:]
    # Causal depthwise conv, width 4: out_t = sum_k w_k * in_{t-3+k} + bias.
    w, bias = sd[pre + "conv1d.weight"][:, 0], sd[pre + "conv1d.bias"]
    k = w.shape[1]
    conv = bias.expand_as(xBC).clone()
    for j in range(k):
        shift = k - 1 - j
        shifted = torch.zeros_like(xBC)
        shifted[:, shift:] = xBC[:, :xBC.shape[1] - shift]
        conv = conv + shifted * w[:, j]
    xBC = conv * torch.sigmoid(conv)
    x = xBC[..., :d_inner]
    Bm = xBC[..., d_inner:d_inner + d_state]
    Cm = xBC[..., d_inner + d_state:]
    dt = F.softplus(dt + sd[pre + "dt_bias"])
    A = -torch.exp(sd[pre + "A_log"])
    b, l = zxbcdt.shape[:2]
    xh = x.reshape(b, l, nheads, headdim)
    y = ssd_quadratic(xh, dt, A, Bm[:, :, None], Cm[:, :, None])
    y = y + sd[pre + "D"][:, None] * xh
    y = y.reshape(b, l, d_inner)
    gated = y * (z * torch.sigmoid(z))
    return _rms(gated, sd[pre + "norm.weight"]) @ sd[pre + "out_proj.weight"].T


def _swiglu(sd, pre, x):
    a = x @ sd[pre + "w1.weight"].T + sd[pre + "w1.bias"]
    b = x @ sd[pre + "w2.weight"].T + sd[pre + "w2.bias"]
    return (a * torch.sigmoid(a) * b) @ sd[pre + "w3.weight"].T + sd[pre + "w3.bias"]


def _flip(t):
    return torch.cat([t[:, :-1].flip(1), t[:, -1:]], dim=1)


def adventurer_reference(sd, images, patch, flip_blocks):
    """Logits of the official Adventurer (eval mode) from a state dict with official keys."""
    D = sd["cls_token"].shape[-1]
    b = images.shape[0]
    cols = F.unfold(images, kernel_size=patch, stride=patch).transpose(1, 2)  # (b, N, C*p*p)
    tokens = cols @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    x = torch.cat([tokens, sd["cls_token"].expand(b, 1, D)], dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(depth):
        pre = f"layers.{i}."
        t = _rms(x, sd[pre + "norm.weight"])
        t = _flip(t) if i in flip_blocks else t
        t = torch.cat([t.mean(1, keepdim=True), t], dim=1)
        t = _mixer(sd, pre + "mixer.", t)[:, 1:]
        t = _flip(t) if i in flip_blocks else t
        x = x + t
        x = x + _swiglu(sd, pre + "mlp.", _rms(x, sd[pre + "norm_mlp.weight"]))
    feat = _rms(x, sd["norm_f.weight"])[:, -1]
    return feat @ sd["head.weight"].T + sd["head.bias"]
