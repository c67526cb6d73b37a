"""Context parallelism: one image's tokens split over 2 and 4 processes (gloo) give what one process
gives, in float64, for the Adventurer block (with and without flip), whole Adventurer and DeiT models
(CLS, heading average, sequence lengths the group does not divide, block recompute, --extend) and their
dense maps; each rank keeps about 1/N of the activations; the Mamba-2 exchange does not grow with the
sequence. The ranks run tests/context_parallel_worker.py under torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

import pixelvit as pv
from helpers import ROOT, clean_env

EXACT = 1e-10


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, tmp_path_factory):
    """Every rank's measurements from one torchrun of the worker with `request.param` processes."""
    size = request.param
    out = tmp_path_factory.mktemp(f"cp{size}")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(size), "--master_port",
                str(29500 + (os.getpid() + size) % 2000)]
    proc = subprocess.run(launcher + [os.path.join(ROOT, "tests", "context_parallel_worker.py"), str(out)],
                          env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return size, [json.load(open(out / f"rank{r}.json")) for r in range(size)]


@pytest.mark.parametrize("case", ["adventurer", "adventurer_recompute", "adventurer_extend", "deit"])
def test_model_matches_one_process(ranks, case):
    size, results = ranks
    for rank, result in enumerate(results):
        errors = result[case]
        assert errors["logits"] < EXACT, (size, rank, errors)
        assert errors["grads"] < EXACT, (size, rank, errors)     # every parameter, averaged as DDP does
        assert errors["dense"] < EXACT, (size, rank, errors)


@pytest.mark.parametrize("case", ["block", "block_flip"])
def test_block_matches_one_process(ranks, case):
    size, results = ranks
    for rank, result in enumerate(results):
        errors = result[case]
        assert max(errors.values()) < EXACT, (size, rank, errors)


def test_each_rank_keeps_about_its_share_of_the_activations(ranks):
    size, results = ranks
    for result in results:
        saved = result["saved_bytes"]
        assert saved["this_rank"] < 1.25 * saved["one_device"] / size, saved


def test_mamba_exchange_does_not_grow_with_the_sequence(ranks):
    _, results = ranks
    for result in results:
        sent = result["bytes_per_block"]
        assert sent["64"] == sent["256"] > 0, sent


def test_bad_groups_are_clear_errors(ranks):
    size, results = ranks
    errors = results[0]["errors"]
    assert f"context parallelism over {size} ranks needs the attention heads ({size + 1})" in errors["heads"]
    for key in ("short", "short_input"):
        assert f"4 tokens cannot be split over {size} ranks: each rank needs at least 3" in errors[key]


def test_shards_cover_the_sequence_once_and_evenly():
    for length, size in [(81, 2), (81, 4), (7, 7), (1_000_003, 8)]:
        shards = [pv.SequenceShards(dist.group.WORLD, r, size, length) for r in range(size)]
        bounds = [s.bounds() for s in shards]
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1
        assert sum(shards[0].lengths(cls_rank=size - 1)) == length + 1


def test_the_configured_input_is_checked_with_extend_counted_once(monkeypatch):
    # patch 2 at 4 px with extend 2: a 4 x 4 grid, 16 tokens, too few for 8 ranks (each Mamba-2 stretch
    # needs the conv's 3-token halo) and enough for 4; the check must not count extend twice (64 tokens)
    monkeypatch.setattr(pv.dist, "get_world_size", lambda group: group)
    model = pv.create_model("adv_t", patch=2, res=4, extend=2, embed_dim=32, depth=1)
    assert model.grid_size ** 2 == 16
    with pytest.raises(ValueError, match=r"^16 tokens cannot be split over 8 ranks: each rank needs at least 3 "):
        model.set_context_parallel(8)
    assert model.set_context_parallel(4).context_group == 4
    one = pv.create_model("deit_t", patch=4, res=4, embed_dim=24, num_heads=2, depth=1)
    with pytest.raises(ValueError, match=r"^1 token cannot be split over 2 ranks: each rank needs at least 1 "):
        one.set_context_parallel(2)
