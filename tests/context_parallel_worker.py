"""Run under torchrun by tests/test_context_parallel.py: every rank builds the same float64 models and
inputs, runs them on one device (the reference) and with the sequence split over all ranks, and writes
the largest differences it sees to OUT/rank<r>.json.

    torchrun --nproc_per_node N tests/context_parallel_worker.py OUT
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import pixelvit as pv  # noqa: E402

# Small blocks, so that a few hundred tokens per rank cross block borders and take the recompute path.
pv.SCAN_PLANS["cpu"] = pv.ScanPlan(chunk=8, block=32, recompute_from=24, state_passing="loop", float64_sums=True)
ADVENTURER = dict(embed_dim=32, depth=4, d_state=8, headdim=16)     # blocks 1 and 3 flip ("official")


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def averaged(param):
    """The gradient DDP would hand this rank: the mean over the ranks (the CLS token has no gradient on
    the ranks that do not hold it)."""
    grad = torch.zeros_like(param) if param.grad is None else param.grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def model_case(name, shards_image, grad_ckpt=False, **config):
    """Logits and every parameter gradient of a whole model (loss on every rank, as in training)."""
    torch.manual_seed(0)
    model = pv.create_model(name, num_classes=5, **config).double()
    model.set_grad_checkpointing(grad_ckpt)
    images = torch.randn(2, 3, shards_image, shards_image, dtype=torch.float64)
    labels = torch.tensor([1, 3])
    reference = model(images)
    F.cross_entropy(reference, labels).backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_context_parallel(dist.group.WORLD)
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    worst = max(relative(averaged(p), expected[k]) for k, p in model.named_parameters())
    dense = model.forward_dense(images)
    model.set_context_parallel(None)
    return dict(logits=relative(logits, reference), grads=worst, dense=relative(dense, model.forward_dense(images)))


def block_case(flip, length):
    """One Adventurer block on a sequence of `length` patch tokens + CLS: outputs and gradients."""
    torch.manual_seed(1)
    block = pv.AdventurerBlock(32, dict(d_state=8, headdim=16, chunk_size=16), 80, flip=flip).double()
    x = torch.randn(2, length + 1, 32, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, length + 1, 32, dtype=torch.float64)
    reference = block(x)
    (reference * weights).sum().backward()
    expected = {k: p.grad.clone() for k, p in block.named_parameters()}
    expected_x, x.grad = x.grad.clone(), None
    block.zero_grad()

    shards = pv.SequenceShards(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), length)
    start, stop = shards.bounds()
    last = shards.rank == shards.size - 1
    mine = torch.cat([x[:, start:stop], x[:, -1:]], 1) if last else x[:, start:stop]
    mine_weights = torch.cat([weights[:, start:stop], weights[:, -1:]], 1) if last else weights[:, start:stop]
    out = block(mine, shards)
    (out * mine_weights).sum().backward()        # each rank's share of the loss: the gradients add up
    want = torch.cat([reference[:, start:stop], reference[:, -1:]], 1) if last else reference[:, start:stop]
    grad_x = x.grad.clone()
    dist.all_reduce(grad_x)
    summed = {}
    for k, p in block.named_parameters():
        summed[k] = p.grad.clone()
        dist.all_reduce(summed[k])
    return dict(out=relative(out, want), grad_x=relative(grad_x, expected_x),
                grads=max(relative(summed[k], expected[k]) for k in expected))


def exchanged_bytes(length):
    """Bytes this rank sends per Adventurer block forward, counted at the collectives."""
    sent = []
    gather = dist.all_gather

    def counting(pieces, tensor, group=None):
        sent.append(tensor.numel() * tensor.element_size())
        return gather(pieces, tensor, group=group)

    dist.all_gather = counting
    try:
        block_case(flip=False, length=length)
    finally:
        dist.all_gather = gather
    return sum(sent)


def saved_bytes(context_parallel):
    """Bytes of activations this rank keeps for the backward pass of an Adventurer at 1,024 tokens
    (parameters, which every rank keeps whole, left out)."""
    torch.manual_seed(0)
    model = pv.create_model("adv_t", patch=2, res=64, num_classes=5, **ADVENTURER).double()
    model.set_context_parallel(dist.group.WORLD if context_parallel else None)
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    return engine.saved_activation_bytes(lambda: model(images).sum().backward(), model.parameters())


def errors():
    """The clear errors: heads that do not split over the ranks, a sequence too short for them (as built,
    and as passed)."""
    found = {}
    size = dist.get_world_size()
    try:
        pv.create_model("deit_t", embed_dim=size * 3 + 3, num_heads=size + 1, depth=1).set_context_parallel(
            dist.group.WORLD)
    except ValueError as e:
        found["heads"] = str(e)
    try:   # the configured input
        pv.create_model("adv_t", patch=2, res=4, **ADVENTURER).set_context_parallel(dist.group.WORLD)
    except ValueError as e:
        found["short"] = str(e)
    model = pv.create_model("adv_t", patch=2, res=16, **ADVENTURER).set_context_parallel(dist.group.WORLD)
    try:   # an input smaller than configured
        model(torch.randn(1, 3, 4, 4))
    except ValueError as e:
        found["short_input"] = str(e)
    return found


def main(out):
    dist.init_process_group("gloo")
    size = dist.get_world_size()
    results = dict(
        adventurer=model_case("adv_t", 18, patch=2, **ADVENTURER),                    # 81 tokens: uneven
        adventurer_recompute=model_case("adv_t", 36, grad_ckpt=True, patch=2, **ADVENTURER),   # 324 tokens
        adventurer_extend=model_case("adv_t", 20, patch=4, extend=2, **ADVENTURER),
        deit=model_case("deit_t", 18, patch=2, embed_dim=8 * size, num_heads=2 * size, depth=2),
        block=block_case(flip=False, length=101),
        block_flip=block_case(flip=True, length=101),
        bytes_per_block={str(n): exchanged_bytes(n) for n in (64, 256)},
        saved_bytes=dict(one_device=saved_bytes(False), this_rank=saved_bytes(True)),
        errors=errors(),
    )
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
