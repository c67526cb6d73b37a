"""The chunked SSD fallback against the token-by-token recurrence and the quadratic (dual) form."""
import pytest
import torch

import pixelvit as pv
from reference import ssd_quadratic


@pytest.fixture(autouse=True, params=["cpu", "accelerator"])
def shape(request, monkeypatch):
    """Every test below in both shapes of the PyTorch path: the CPU's (cache-sized blocks, a loop over
    chunks, float64 decay sums) and the accelerators' (large blocks, the chunk states passed with one
    decay matrix, decay sums in the compute dtype), both forced here on the CPU."""
    monkeypatch.setattr(pv, "SCAN_PLAN", request.param)
    return request.param


def random_ssd_inputs(b, l, h, p, g, n, dtype=torch.float64, dt_range=(1e-3, 0.1), seed=0):
    """Inputs in the ranges Adventurer's init produces: A in [-16, -1], dt in [1e-3, 0.1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    lo, hi = dt_range
    dt = lo + (hi - lo) * torch.rand(b, l, h, generator=gen, dtype=dtype)
    A = -(1 + 15 * torch.rand(h, generator=gen, dtype=dtype))
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk,length", [(1, 9), (7, 7), (7, 50), (256, 300), (256, 600), (256, 100)])
def test_chunked_matches_recurrence_float64(chunk, length):
    inputs = random_ssd_inputs(2, length, 4, 8, 1, 16)
    expected = pv.ssd_recurrent(*inputs)
    assert torch.allclose(pv.ssd_chunked(*inputs, chunk_size=chunk), expected, rtol=0, atol=1e-12)


def test_recurrence_matches_quadratic_form():
    inputs = random_ssd_inputs(2, 40, 4, 8, 1, 16, dt_range=(0.01, 0.5))
    assert torch.allclose(pv.ssd_recurrent(*inputs), ssd_quadratic(*inputs), rtol=0, atol=1e-12)


def test_groups_broadcast_to_their_heads():
    # 6 heads, 3 groups: heads 0-1 read group 0, 2-3 group 1, 4-5 group 2 (mamba-ssm's layout).
    inputs = random_ssd_inputs(1, 45, 6, 4, 3, 8)
    expected = ssd_quadratic(*inputs)
    assert torch.allclose(pv.ssd_chunked(*inputs, chunk_size=16), expected, atol=1e-12)
    x, dt, A, B, C = inputs
    B2 = B.clone()
    B2[:, :, 1] += 1.0  # only heads 2 and 3 may change
    changed = (pv.ssd_chunked(x, dt, A, B2, C, 16) - pv.ssd_chunked(x, dt, A, B, C, 16)).abs().amax((0, 1, 3))
    assert changed[[2, 3]].min() > 1e-3 and changed[[0, 1, 4, 5]].max() == 0


def test_causal():
    x, dt, A, B, C = random_ssd_inputs(1, 70, 2, 4, 1, 8)
    y = pv.ssd_chunked(x, dt, A, B, C, 16)
    t = 33
    for tensor in (x, dt, B, C):
        tensor[:, t] += 1.0
    y2 = pv.ssd_chunked(x, dt, A, B, C, 16)
    assert torch.equal(y[:, :t], y2[:, :t])
    assert (y[:, t:] - y2[:, t:]).abs().max() > 1e-3


def test_float32_long_chunks_with_strong_decay_stay_finite_and_accurate():
    # dt*A down to -1.6 per step: a 256-token chunk accumulates ~-400 of log-decay, where
    # exp(cs_i)/exp(cs_j) would be 0/0. Forward and backward must stay finite and accurate.
    x, dt, A, B, C = random_ssd_inputs(1, 700, 2, 8, 1, 16, dtype=torch.float32, dt_range=(0.05, 0.1))
    expected = pv.ssd_recurrent(*(t.double() for t in (x, dt, A, B, C)))
    x.requires_grad_(True)
    dt.requires_grad_(True)
    y = pv.ssd_chunked(x, dt, A, B, C, 256)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(dt.grad).all()
    assert (y.double() - expected).abs().max() < 1e-4 * expected.abs().max()


def test_bfloat16_input_is_computed_in_float32():
    inputs = random_ssd_inputs(1, 60, 2, 4, 1, 8, dtype=torch.float32)
    low = [t.bfloat16() for t in inputs]
    y = pv.ssd_chunked(*low, chunk_size=16)
    assert y.dtype == torch.float32
    assert torch.allclose(y, pv.ssd_chunked(*(t.float() for t in low), chunk_size=16))


def test_mixer_is_causal_and_matches_float64():
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(32, d_state=8, headdim=16, chunk_size=8).double()
    u = torch.randn(2, 29, 32, dtype=torch.float64)
    y = mixer(u)
    u2 = u.clone()
    u2[:, 17] += 1.0
    y2 = mixer(u2)
    assert torch.equal(y[:, :17], y2[:, :17])
    assert (y[:, 17:] - y2[:, 17:]).abs().max() > 1e-6
    assert mixer.last_path == "torch_chunked_ssd"


@pytest.mark.parametrize("block", [21, 1024])   # blocks of 3 chunks (recomputed in backward), or one block
def test_blocks_forward_and_every_gradient_match_the_recurrence(block):
    inputs = [t.requires_grad_(True) for t in random_ssd_inputs(2, 100, 4, 8, 2, 16)]
    weights = torch.randn(2, 100, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = pv.ssd_chunked(*inputs, chunk_size=7, block_size=block)
    grads = torch.autograd.grad((y * weights).sum(), inputs)
    expected = pv.ssd_recurrent(*inputs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)
    for name, got, want in zip("x dt A B C".split(), grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), name


def test_a_sequence_continued_from_its_state_equals_the_whole():
    # mamba-ssm's initial_states / return_final_states contract, which the mixer's blocks rely on
    inputs = [t.requires_grad_(True) for t in random_ssd_inputs(2, 90, 4, 8, 2, 16)]
    cut = 37
    first = [t if t.dim() == 1 else t[:, :cut] for t in inputs]
    rest = [t if t.dim() == 1 else t[:, cut:] for t in inputs]
    y1, state = pv.ssd_chunked(*first, chunk_size=16, return_final_state=True)
    y2 = pv.ssd_chunked(*rest, chunk_size=16, initial_state=state)
    expected = pv.ssd_recurrent(*inputs)
    assert state.shape == (2, 4, 8, 16)
    assert torch.allclose(torch.cat([y1, y2], dim=1), expected, rtol=0, atol=1e-12)
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((torch.cat([y1, y2], dim=1) * weights).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for name, got, want in zip("x dt A B C".split(), grads, expected_grads):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), name


def test_final_state_from_zero_equals_the_recurrence_and_is_affine_in_the_start():
    # context parallelism's exchange: S_out = exp(log_decay) * S_in + state, the state from a zero start
    x, dt, A, B, C = random_ssd_inputs(2, 45, 4, 8, 2, 16)
    state, log_decay = pv.ssd_final_state(x, dt, A, B)
    expected = torch.zeros(2, 4, 8, 16, dtype=torch.float64)
    B_heads = B.repeat_interleave(2, dim=2)                      # 2 groups of 2 heads
    for t in range(45):                                         # the recurrence, token by token
        expected = torch.exp(dt[:, t] * A)[..., None, None] * expected + \
            (dt[:, t, :, None] * x[:, t])[..., None] * B_heads[:, t, :, None, :]
    assert torch.allclose(state, expected, rtol=0, atol=1e-12)
    assert torch.allclose(log_decay, (dt * A).sum(1), rtol=0, atol=1e-12)
    start = torch.randn(2, 4, 8, 16, dtype=torch.float64)
    _, after = pv.ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=start, return_final_state=True)
    assert torch.allclose(after, torch.exp(log_decay)[..., None, None] * start + state, rtol=0, atol=1e-12)


def test_mixer_continues_a_sequence_from_its_history_and_state():
    # a stretch of the sequence, run from the previous stretch's last conv inputs and SSD state, gives the
    # whole sequence's outputs there; the state of two stretches chains as the exchange assumes
    torch.manual_seed(0)
    mixer = pv.Mamba2Mixer(32, d_state=8, headdim=16, chunk_size=8).double()
    u = torch.randn(2, 70, 32, dtype=torch.float64)
    cut, halo = 29, mixer.conv1d.kernel_size[0] - 1
    first_state, first_decay = mixer.final_state(u[:, :cut])
    rest = mixer(u[:, cut:], history=u[:, cut - halo:cut], state=first_state)
    assert torch.allclose(rest, mixer(u)[:, cut:], rtol=0, atol=1e-12)
    rest_state, rest_decay = mixer.final_state(u[:, cut:], history=u[:, cut - halo:cut])
    whole_state, whole_decay = mixer.final_state(u)
    chained = torch.exp(rest_decay)[..., None, None] * first_state + rest_state
    assert torch.allclose(chained, whole_state, rtol=0, atol=1e-12)
    assert torch.allclose(first_decay + rest_decay, whole_decay, rtol=0, atol=1e-12)


def test_bfloat16_autocast_stays_within_the_kernels_tolerance():
    # Under autocast the matrix products run in bf16 (as mamba-ssm's kernels take bf16 operands);
    # decays and the state passing stay float32. Yardstick: mamba-ssm's own SSD kernel tests,
    # allclose(rtol=1e-2, atol=3e-3) on outputs of order 1, here with atol scaled to the output.
    x, dt, A, B, C = random_ssd_inputs(1, 600, 4, 16, 1, 16, dtype=torch.float32, dt_range=(1e-3, 0.1))
    x, B, C = (t.bfloat16().float() for t in (x, B, C))
    inputs = [t.requires_grad_(True) for t in (x, dt, A, B, C)]
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pv.ssd_chunked(*inputs, chunk_size=64)
    grads = torch.autograd.grad((y.float() * weights).sum(), inputs)
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    expected = pv.ssd_recurrent(*exact)
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), exact)
    for name, got, want in zip("y dx ddt dA dB dC".split(), (y, *grads), (expected, *expected_grads)):
        scale = want.abs().max().item()
        assert torch.allclose(got.double(), want, rtol=1e-2, atol=3e-3 * scale), name


def test_the_two_shapes_agree_on_the_same_inputs(shape):
    inputs = [t.requires_grad_(True) for t in random_ssd_inputs(2, 300, 4, 8, 2, 16, dtype=torch.float32)]
    weights = torch.randn(2, 300, 4, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for name in ("cpu", "accelerator"):
        y = pv.ssd_chunked(*inputs, chunk_size=64, block_size=128, plan=pv.SCAN_PLANS[name])
        results.append((y, *torch.autograd.grad((y * weights).sum(), inputs)))
    for what, cpu, accelerator in zip("y dx ddt dA dB dC".split(), *results):
        assert torch.allclose(cpu, accelerator, rtol=1e-4, atol=1e-5 * cpu.abs().max().item()), what


def test_segment_sums_without_float64_by_hand(shape):
    a = torch.tensor([1.0, 2.0, 4.0])
    inf = float("-inf")
    expected = torch.tensor([[0.0, inf, inf], [2.0, 0.0, inf], [6.0, 4.0, 0.0]])   # a[j+1] + ... + a[i]
    assert torch.equal(pv.segsum_direct(a), expected) and torch.equal(pv.segsum(a), expected)
