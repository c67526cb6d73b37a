"""train.py: recipes against the paper, distributed runs, exact resume, bad data, the benchmark."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_notebooks import import_common

import demo_data
import engine
import pixelvit as pv
import train
from helpers import ROOT, check_one_run_per_folder, check_refused, run_and_kill, run_elastic_and_kill, run_script

PAPER = json.load(open(os.path.join(ROOT, "notebooks", "paper_tables.json")))
TINY = ["--model", "adv_t", "--embed-dim", "32", "--depth", "2", "--d-state", "16", "--patch", "4",
        "--res", "16", "--workers", "0", "--recipe", "demo", "--warmup-epochs", "1"]
DEMO_DATA = TINY + ["--data", "digits"]   # the tiny model on the bundled digits


# --- recipes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,table,column,model", [
    ("pretrain", "table8", "Tiny/Small/Base", "adv_b"), ("pretrain", "table8", "Large/Huge", "adv_l"),
    ("intermediate", "table10", "Small/Base", "adv_b"), ("intermediate", "table10", "Large", "adv_l"),
    ("finetune", "table9", "Small/Base", "adv_b"), ("finetune", "table9", "Large", "adv_l")])
def test_adventurer_recipes_equal_the_paper(stage, table, column, model):
    paper, ours = PAPER[table], train.recipe(stage, model)
    assert ours["blr"] == paper["base_learning_rate"][column]
    assert ours["weight_decay"] == paper["weight_decay"][column]
    assert ours["epochs"] == paper["epochs"][column]
    assert list(ours["opt_betas"]) == paper["optimizer_betas"][column]
    assert ours["batch_size"] == paper["batch_size"][column]
    assert ours["warmup_epochs"] == paper["warmup_epochs"][column]
    depth = paper["stochastic_depth"][column]
    assert ours["drop_path"] == (depth["Base"] if isinstance(depth, dict) else depth)
    if paper["layer_wise_lr_decay"] is not None:
        assert ours["layer_decay"] == paper["layer_wise_lr_decay"]
    if isinstance(paper.get("rand_augmentation"), str):
        assert ours["aa"] == paper["rand_augmentation"] and not ours["three_augment"]
    if isinstance(paper.get("label_smoothing"), float):
        assert ours["smoothing"] == paper["label_smoothing"]
    # the resolutions of the three stages (Tables 8-10 captions, appendix A)
    assert ours["res"] == {"pretrain": 128, "intermediate": 224, "finetune": 224}[stage]


def test_small_uses_its_own_drop_path():
    small = PAPER["table10"]["stochastic_depth"]["Small/Base"]["Small"]
    assert train.recipe("intermediate", "adv_s")["drop_path"] == small
    assert train.recipe("finetune", "adv_s")["drop_path"] == PAPER["table9"]["stochastic_depth"]["Small/Base"]["Small"]


def test_deit_recipe_equals_the_paper_text():
    text, ours = PAPER["text_numbers"]["vit_imagenet_recipe_sec4_1"], train.recipe("deit", "deit_b")
    assert (ours["epochs"], ours["batch_size"], ours["weight_decay"]) == (text["epochs"], text["batch_size"],
                                                                          text["weight_decay"])
    assert ours["blr"] * ours["batch_size"] / 512 == text["learning_rate"]  # scaled as the official code does
    assert train.parse_args(["--recipe", "deit", "--model", "deit_b", "--data-path", "x"]).lr == text["learning_rate"]


def test_flags_override_the_recipe():
    args = train.parse_args(["--stage", "finetune", "--model", "adv_b", "--data-path", "x", "--lr", "3e-5",
                             "--no-repeated-aug", "--aa", "none"])
    assert (args.lr, args.repeated_aug, args.aa, args.weight_decay, args.res) == (3e-5, False, None, 0.1, 224)


def test_color_jitter_flag_reaches_both_pipelines():
    from torchvision import transforms

    def jitters(transform):
        steps = transform.transforms if hasattr(transform, "transforms") else transform.finish.transforms
        return [(t.brightness, t.contrast, t.saturation) for t in steps if isinstance(t, transforms.ColorJitter)]

    demo = train.parse_args(DEMO_DATA)
    assert demo.color_jitter == 0.0 and jitters(train.train_transform(demo)) == []   # gray 8x8 digits: off
    strong = train.parse_args(DEMO_DATA + ["--color-jitter", "0.4"])
    assert jitters(train.train_transform(strong)) == [((0.6, 1.4),) * 3]
    pretrain = train.parse_args(["--stage", "pretrain", "--model", "adv_b", "--data-path", "x"])
    assert pretrain.three_augment and jitters(train.train_transform(pretrain)) == [((0.7, 1.3),) * 3]  # DeiT III's 0.3


def test_lr_schedule_by_hand():
    args = train.parse_args(DEMO_DATA + ["--epochs", "10", "--lr", "1e-3", "--min-lr", "1e-5", "--warmup-lr", "1e-6"])
    assert (args.lr, args.blr) == (1e-3, None)   # --lr is the peak, in every script
    assert train.parse_args(DEMO_DATA + ["--blr", "1e-3", "--batch-size", "256"]).lr == 5e-4   # 1e-3 x 256 / 512
    stage1 = train.parse_args(["--stage", "pretrain", "--model", "adv_b", "--data-path", "x", "--batch-size", "2048"])
    assert (stage1.blr, stage1.lr) == (5e-4, 2e-3)   # Table 8's base rate at twice its batch
    with pytest.raises(SystemExit):
        train.parse_args(DEMO_DATA + ["--lr", "1e-3", "--blr", "1e-3"])
    assert train.lr_at(0, args, 100) == pytest.approx(1e-6)
    assert train.lr_at(50, args, 100) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))   # half-way through warm-up
    assert train.lr_at(100, args, 100) == pytest.approx(1e-3)                           # peak after 1 epoch
    assert train.lr_at(550, args, 100) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))   # cosine mid-point
    assert train.lr_at(1000, args, 100) == pytest.approx(1e-5)


def test_param_groups_follow_the_official_rule():
    model = pv.create_model("adv_t", depth=4, embed_dim=32, d_state=16)
    groups = engine.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # layer 0 = tokenizer, cls, pos; block i = i + 1; head/final norm = depth + 1 = 5
    assert where[id(named["patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** 5
    assert where[id(named["layers.2.mixer.in_proj.weight"])]["lr_scale"] == 0.5 ** 2
    assert where[id(named["head.weight"])]["lr_scale"] == 1.0
    for name in ("pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.0.mixer.dt_bias", "norm_f.weight",
                 "layers.1.mlp.w1.bias"):
        assert where[id(named[name])]["weight_decay"] == 0.0, name
    for name in ("layers.0.mixer.conv1d.weight", "layers.0.mlp.w3.weight", "head.weight", "patch_embed.proj.weight"):
        assert where[id(named[name])]["weight_decay"] == 0.05, name  # conv1d.weight (3-D) is decayed


# --- FLOPs and the benchmark ----------------------------------------------------------------------

@pytest.mark.parametrize("name,patch,expected", [  # derived by hand from the layer shapes
    ("adv_b", 16, 41.0e9), ("adv_b", 4, 654e9), ("adv_b", 1, 10.47e12),
    ("deit_b", 16, 35.1e9), ("deit_b", 4, 896e9), ("deit_b", 1, 101.3e12)])
def test_analytic_flops_match_the_hand_derivation(name, patch, expected):
    with torch.device("meta"):
        model = pv.create_model(name, patch=patch)
    assert model.estimate_flops(224) == pytest.approx(expected, rel=0.01)


def test_analytic_flops_match_torch_flop_counter_for_deit():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = pv.create_model("deit_t", patch=4, res=32, depth=2).eval()
    # the counter sees attention only as the math backend's two matmuls, not as CPU's fused kernel
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, 32, 32))
    assert model.estimate_flops(32) == pytest.approx(counter.get_total_flops(), rel=1e-6)


def test_benchmark_prints_one_json_line(capsys):
    train.main(train.parse_args(TINY + ["--benchmark", "--batch-size", "2", "--benchmark-steps", "1"]))
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    described = (result["model"], result["patch"], result["res"], result["tokens"], result["batch"])
    assert described == ("adv_t", 4, 16, 16, 2)
    assert result["images_per_s"] > 0 and result["tflops"] > 0 and result["memory_mb_per_image"] > 0
    assert result["memory_measure"] == "saved for backward"   # CPU: no allocator statistics
    assert result["backends"] == ["torch_chunked_ssd"] and result["flops_count"] == "analytic"


# --- runs on a tiny image folder ---------------------------------------------------------------

def write_image_folder(root, per_class=(12, 5), classes=3, corrupt=False):
    """ImageNet-style train/ and val/ folders of real images: scikit-learn's 8x8 digits as 16x16 PNGs."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for split, count in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            images = digits.images[digits.target == c][(0 if split == "train" else 50):][:count]
            for i, img in enumerate(images):
                Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((16, 16)).save(f"{folder}/{i}.png")
    if corrupt:  # one file that is not an image, one that is cut short, in each split
        for split in ("train", "val"):
            with open(os.path.join(root, split, "class_0", "garbage.png"), "wb") as f:
                f.write(b"not an image at all")
            good = open(os.path.join(root, split, "class_1", "0.png"), "rb").read()
            with open(os.path.join(root, split, "class_1", "truncated.png"), "wb") as f:
                f.write(good[: len(good) // 2])
    return str(root)


def run(args, cwd, nproc=1, timeout=300, check=True):
    return run_script("train.py", args, cwd, nproc, check, timeout)


def final_weights(output, key="model"):
    return torch.load(os.path.join(output, "checkpoint.pth"), weights_only=True)[key]


def test_two_process_run_counts_every_validation_image_once(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(12, 5))   # 15 val images: 8 + 7 over 2 ranks
    out = str(tmp_path / "ddp")
    run(TINY + ["--data-path", data, "--output", out, "--epochs", "2", "--batch-size", "8", "--accum-steps", "2"],
        tmp_path, nproc=2)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    results = json.load(open(os.path.join(out, "results.json")))
    assert [entry["epoch"] for entry in log] == [0, 1] and results["val_images"] == 15
    assert results["run_state"]["world"] == 2 and results["run_state"]["micro_batch"] == 2  # 8 / (2 ranks x 2 accum)
    # one process evaluating the same weights gets the same numbers
    run(TINY + ["--data-path", data, "--output", str(tmp_path / "eval"), "--eval", "--resume",
                os.path.join(out, "checkpoint.pth")], tmp_path)
    single = json.load(open(tmp_path / "eval" / "eval.json"))
    assert single["val_images"] == 15
    assert single["top1"] == pytest.approx(results["top1"]) and single["val_loss"] == pytest.approx(results["val_loss"])


def test_fsdp_and_an_elastic_restart_train_the_same_weights_as_ddp(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(8, 3))
    common = TINY + ["--data-path", data, "--epochs", "2", "--batch-size", "4"]
    run(common + ["--output", str(tmp_path / "ddp")], tmp_path, nproc=2)
    # torchrun --max-restarts 1 restarts both processes after rank 1 is killed mid-epoch; they resume
    # from the checkpoint and end with the uninterrupted run's weights, bit for bit
    elastic = str(tmp_path / "elastic")
    status, output, state = run_elastic_and_kill("train.py", common + ["--output", elastic, "--save-every", "1"],
                                                 tmp_path, os.path.join(elastic, "checkpoint.pth"),
                                                 ready=lambda ckpt: ckpt["step"] >= 1)
    assert status == 0 and (state["epoch"], state["step"]) != (2, 0), output[-3000:]
    assert f"resumed from {elastic}/checkpoint.pth" in output, output[-3000:]
    a, b = final_weights(str(tmp_path / "ddp")), final_weights(elastic)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run(common + ["--output", str(tmp_path / "fsdp"), "--fsdp"], tmp_path, nproc=2)
    a, b = final_weights(str(tmp_path / "ddp")), final_weights(str(tmp_path / "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    # the FSDP checkpoint is a full, unsharded state dict that loads into a plain model
    model = pv.create_model("adv_t", embed_dim=32, depth=2, d_state=16, patch=4, res=16, num_classes=3)
    assert pv.load_checkpoint(model, str(tmp_path / "fsdp" / "checkpoint.pth")) == ([], [])


def test_resume_after_a_kill_is_bit_exact(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(16, 3))
    common = TINY + ["--data-path", data, "--epochs", "3", "--batch-size", "4", "--save-every", "2",
                     "--mixup", "0.8", "--drop-path", "0.2", "--ema", "--ema-decay", "0.9"]
    run(common + ["--output", str(tmp_path / "straight")], tmp_path)

    killed = str(tmp_path / "killed")
    state = run_and_kill("train.py", common + ["--output", killed], tmp_path, os.path.join(killed, "checkpoint.pth"),
                         ready=lambda ckpt: ckpt["epoch"] >= 1)  # a checkpoint from inside epoch 1
    assert (state["epoch"], state["step"]) != (3, 0), "the run finished before it could be killed"
    check_refused("train.py", common + ["--output", killed, "--lr", "0.01"], tmp_path, killed, "lr ")
    # resumes automatically from OUTPUT/checkpoint.pth, the same run with loader processes of its own
    run(common + ["--output", killed, "--workers", "1"], tmp_path)

    for key in ("model", "ema"):
        a, b = final_weights(str(tmp_path / "straight"), key), final_weights(killed, key)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    log = [json.loads(line)["epoch"] for line in open(os.path.join(killed, "log.jsonl"))]
    assert log == [0, 1, 2]
    # running a finished run again (as the notebooks do) trains nothing and keeps its results
    before = open(os.path.join(killed, "results.json")).read()
    run(common + ["--output", killed], tmp_path)
    assert open(os.path.join(killed, "results.json")).read() == before
    read_results = import_common().read_results    # what the notebooks collect
    assert [entry["run"] for entry in read_results(tmp_path)] == [str(tmp_path / "killed"),
                                                                  str(tmp_path / "straight")]


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(8, 4), corrupt=True)
    out = str(tmp_path / "run")
    proc = run(TINY + ["--data-path", data, "--output", out, "--epochs", "1", "--batch-size", "4",
                       "--no-repeated-aug"], tmp_path)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["val_images"] == 12 and results["val_skipped"] == 2
    assert results["train_skipped"] >= 1 and proc.stderr.count("UserWarning: skipping unreadable images") == 1


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(8, 2))
    out = str(tmp_path / "run")
    run(TINY + ["--data-path", data, "--output", out, "--epochs", "1", "--batch-size", "4"], tmp_path)
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    # a new run in that folder (--no-resume) whose loss turns NaN writes no checkpoint over the last one
    proc = run(TINY + ["--data-path", data, "--output", out, "--epochs", "2", "--batch-size", "4", "--lr", "1e30",
                       "--warmup-epochs", "0", "--log-every", "1", "--no-resume"], tmp_path, check=False)
    assert proc.returncode != 0 and "loss is nan" in proc.stderr.lower() and "checkpoint" in proc.stderr
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before


def test_bad_data_path_and_checkpoint(tmp_path):
    proc = run(TINY + ["--data-path", str(tmp_path / "nowhere")], tmp_path, check=False)
    assert proc.returncode != 0 and "train/<class>" in proc.stderr
    proc = run(TINY + ["--data-path", "x", "--patch", "3"], tmp_path, check=False)
    assert proc.returncode != 0 and "multiple of --patch 3" in proc.stderr
    data = write_image_folder(tmp_path / "data", per_class=(4, 2))
    deit = str(tmp_path / "deit.pth")
    torch.save(pv.create_model("deit_t", depth=2, embed_dim=32, num_heads=2).state_dict(), deit)
    proc = run(TINY + ["--data-path", data, "--finetune", deit, "--output", str(tmp_path / "o"), "--batch-size", "4"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--finetune {deit} holds a DeiT at patch 16, 224 px (width 32, depth 2, 1000 classes)" in proc.stderr
    assert "which does not fit the model asked for, adv_t at patch 4" in proc.stderr


def test_three_augment_and_seeded_samples():
    from torchvision import transforms
    ds = train.Images(demo_data.DigitsDataset(True), train.ThreeAugment(16, 0.5, 0.5, 0.3), seed=1)
    a, b, c = ds[(0, 5)], ds[(0, 5)], ds[(1, 5)]  # same draw: same augmentation; another draw: another
    assert a[2] == 0  # no unreadable image passed over
    assert a[0].shape == (3, 16, 16) and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert isinstance(ds.transform.one_of[0], transforms.Grayscale)
    assert len(demo_data.DigitsDataset(True)) == 1437 and len(demo_data.DigitsDataset(False)) == 360


def test_context_parallel_trains_the_weights_of_one_process(tmp_path):
    """--context-parallel 2 on 2 processes (each image's 256 pixel tokens split in two) against one process
    with the same global batch: drop path drawn alike on both ranks, the same weights to float32 rounding."""
    data = write_image_folder(tmp_path / "data", per_class=(8, 3))
    common = TINY + ["--patch", "1", "--data-path", data, "--epochs", "2", "--batch-size", "4", "--drop-path", "0.1"]
    run(common + ["--output", str(tmp_path / "one")], tmp_path)
    run(common + ["--output", str(tmp_path / "cp"), "--context-parallel", "2"], tmp_path, nproc=2)
    a, b = final_weights(str(tmp_path / "one")), final_weights(str(tmp_path / "cp"))
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    print(f"largest relative difference over the parameters: {worst:.1e}")
    assert worst < 1e-4
    one, cp = (json.load(open(tmp_path / name / "results.json")) for name in ("one", "cp"))
    assert cp["val_images"] == one["val_images"] == 9 and cp["run_state"]["replicas"] == 1
    assert cp["top1"] == pytest.approx(one["top1"]) and cp["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)


def test_context_parallel_needs_torchrun_and_a_dividing_group(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(4, 1))
    common = TINY + ["--data-path", data, "--epochs", "1", "--batch-size", "2", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="launch with torchrun"):
        train.main(train.parse_args(common + ["--context-parallel", "2"]))
    proc = run(common + ["--context-parallel", "3"], tmp_path, nproc=2, check=False)
    assert proc.returncode != 0 and "--context-parallel 3 must divide the 2 processes" in proc.stderr + proc.stdout


def test_readme_context_parallel_command_at_paper_size(tmp_path):
    """The README's `torchrun ... train.py --model adv_b --patch 1 --res 448 --context-parallel 4`, with the
    recipe it picks, on 2 processes sharing each 448 px image: 200,704 pixel tokens, 100,352 per rank.
    Adventurer-B shrunk to one block, 64 wide; one training step and one evaluation."""
    data = write_image_folder(tmp_path / "data", per_class=(1, 1), classes=2)
    out = tmp_path / "cp"
    run(["--model", "adv_b", "--patch", "1", "--res", "448", "--context-parallel", "2", "--data-path", data,
         "--depth", "1", "--embed-dim", "64", "--batch-size", "2", "--epochs", "1", "--workers", "0",
         "--output", str(out)], tmp_path, nproc=2, timeout=900)
    results = json.load(open(out / "results.json"))
    assert results["val_images"] == 2 and results["args"]["recipe"] == "pretrain" and results["args"]["res"] == 448
    assert (results["run_state"]["world"], results["run_state"]["replicas"]) == (2, 1)
    assert np.isfinite(results["train_loss"])


def test_a_run_folder_holds_one_run(tmp_path):
    out = str(tmp_path / "run")
    args = DEMO_DATA + ["--epochs", "1", "--output", out]
    run(args, tmp_path)
    check_one_run_per_folder("train.py", args, tmp_path, out, lr="0.01")
