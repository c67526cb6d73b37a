"""engine.py, the run skeleton the three scripts share: exact resume with fp16 loss scaling."""
import dataclasses
import inspect
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import engine
from helpers import run_script


class Pairs(torch.utils.data.Dataset):
    """(draw, index) -> a fixed input and target per index."""

    def __len__(self):
        return 8

    def __getitem__(self, key):
        _, index = key
        g = torch.Generator().manual_seed(index)
        return torch.randn(4, generator=g), torch.randn(1, generator=g)


@dataclass(frozen=True)
class Settings:
    output: str
    lr: float = 1e-2


def fit(output, total):
    """A tiny regression trained in fp16 with the loop the dense scripts run (resume, step, report,
    save): its gradients overflow at the initial loss scale, so the scaler skips steps and backs off,
    state that an exact resume needs."""
    torch.manual_seed(0)
    model, settings, run = torch.nn.Linear(4, 1), Settings(output), engine.Run(amp="fp16")
    optimizer = torch.optim.AdamW([dict(params=list(model.parameters()), weight_decay=0.0, lr_scale=1.0)])
    scaler = run.grad_scaler()
    os.makedirs(output, exist_ok=True)
    resume = engine.resume_path(output)
    start = engine.load_training_state(resume, model, optimizer, scaler)["iter"] if resume else 0
    engine.keep_log_lines(os.path.join(output, "log.jsonl"), start + 1 if resume else 0, key="iter")
    if start >= total:
        return engine.finished_results(run, output), None
    batches = iter(engine.draw_loader(Pairs(), 2, run, seed=0, start=start, workers=0))
    metrics = {}
    for it in range(start, total):
        engine.set_lr(optimizer, settings.lr)
        x, y = next(batches)
        with run.autocast():
            loss = ((model(x) - y).float() ** 2).mean() * 1e4   # x 65,536 overflows float16
        engine.backward(loss, scaler)
        engine.optimizer_step(model, optimizer, scaler)
        metrics = engine.report(run, output, settings, dict(weight=model.weight.sum().item()), iter=it + 1)
        engine.save_training_state(os.path.join(output, "checkpoint.pth"), run, settings, model, optimizer, scaler,
                                   iter=it + 1)
    return metrics, torch.load(os.path.join(output, "checkpoint.pth"), weights_only=True)


def test_fp16_resume_restores_the_loss_scaler(tmp_path):
    _, straight = fit(str(tmp_path / "straight"), 6)
    fit(str(tmp_path / "resumed"), 3)
    metrics, resumed = fit(str(tmp_path / "resumed"), 6)   # continues from the iteration-3 checkpoint
    assert straight["scaler"]["scale"] < 65536.0           # the scaler did back off
    assert resumed["scaler"] == straight["scaler"]
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    assert metrics["iter"] == 6
    assert [line.count('"iter"') for line in open(tmp_path / "resumed" / "log.jsonl")] == [1] * 6


def test_a_finished_run_returns_its_results_and_trains_no_more(tmp_path):
    first, _ = fit(str(tmp_path / "run"), 2)
    log, stamp = open(tmp_path / "run" / "log.jsonl").read(), os.stat(tmp_path / "run" / "results.json").st_mtime_ns
    again, _ = fit(str(tmp_path / "run"), 2)
    assert again == first
    assert open(tmp_path / "run" / "log.jsonl").read() == log
    assert os.stat(tmp_path / "run" / "results.json").st_mtime_ns == stamp


def test_a_fresh_start_drops_the_old_log(tmp_path):
    fit(str(tmp_path / "run"), 3)
    os.remove(tmp_path / "run" / "checkpoint.pth")   # as --no-resume ignores it
    fit(str(tmp_path / "run"), 2)
    assert [line.count('"iter"') for line in open(tmp_path / "run" / "log.jsonl")] == [1, 1]


def test_per_sample_seeding_leaves_the_accelerators_alone(monkeypatch):
    # Seeding every device costs about 1 ms a call on a machine without CUDA, more than augmenting a small
    # image; the data pipelines seed per sample, so they must seed the host generators only.
    def no_device_seeding(*_):
        raise AssertionError("seed_host seeded an accelerator")
    monkeypatch.setattr(torch.cuda, "manual_seed_all", no_device_seeding)
    engine.seed_host(0, "crop", 7)
    host = (torch.rand(3), random.random(), np.random.rand())
    monkeypatch.undo()
    engine.seed_everything(0, "crop", 7)                       # the same host streams, devices seeded too
    assert torch.equal(host[0], torch.rand(3)) and host[1:] == (random.random(), np.random.rand())
    engine.seed_host(0, "crop", 8)
    assert not torch.equal(host[0], torch.rand(3))             # another sample, another stream


# --- a model run never falls into the demo --------------------------------------------------------

@pytest.mark.parametrize("script,argv,data_help", [
    ("train.py", ["--model", "adv_b", "--patch", "1", "--res", "224"], "an ImageNet-style folder"),
    ("train.py", ["--depth=2", "--patch", "4"], "an ImageNet-style folder"),
    ("eval_seg.py", ["--model", "adv_b", "--patch", "16"], "the ADEChallengeData2016 folder"),
    ("eval_det.py", ["--embed-dim", "64"], "the COCO folder"),
])
def test_a_command_naming_a_model_without_data_stops_with_what_to_add(script, argv, data_help, tmp_path):
    # the paper's command without --data-path would otherwise train that model on the demo's data
    proc = run_script(script, argv + ["--output", str(tmp_path / "run")], tmp_path, check=False)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert "names a model run, which needs --data-path" in error and data_help in error, error
    assert f"`python {script}` with no arguments runs the CPU demo" in error
    assert not (tmp_path / "run").exists()                      # nothing was started


@pytest.mark.parametrize("module,argv,expected", [
    ("train", ["--data", "digits", "--model", "adv_t"], dict(data="digits", recipe="demo")),   # asked for
    ("train", ["--benchmark", "--model", "adv_b"], dict(model="adv_b", benchmark=True)),       # synthetic input
    ("eval_seg", ["--patch", "8"], dict(demo=True, patch=8)),          # demo knobs, no model flag
    ("eval_det", ["--patch", "8"], dict(demo=True, patch=8)),
])
def test_the_demo_and_data_free_runs_still_parse(module, argv, expected):
    args = __import__(module).parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


SHARED_FLAGS = dict(output=("--output", "o"), resume=("--resume", "r.pth"), finetune=("--finetune", "f.pth"),
                    no_resume=("--no-resume",), eval_only=("--eval-only",), save_every=("--save-every", "5"),
                    amp=("--amp", "bf16"), grad_ckpt=("--grad-ckpt",), compile=("--compile",),
                    seed=("--seed", "3"), workers=("--workers", "1"), log_every=("--log-every", "7"),
                    batch_size=("--batch-size", "4"), accum_steps=("--accum-steps", "2"))


@pytest.mark.parametrize("module", ["train", "eval_seg", "eval_det"])
def test_the_shared_flags_exist_in_every_script_with_one_meaning(module):
    argv = [token for flag in SHARED_FLAGS.values() for token in flag]
    args = __import__(module).parse_args(argv)
    parsed = {dest: getattr(args, dest) for dest in SHARED_FLAGS}
    assert parsed == dict(output="o", resume="r.pth", finetune="f.pth", no_resume=True, eval_only=True, save_every=5,
                          amp="bf16", grad_ckpt=True, compile=True, seed=3, workers=1, log_every=7, batch_size=4,
                          accum_steps=2)


@pytest.mark.parametrize("module", ["train", "eval_seg", "eval_det"])
def test_settings_are_resolved_once_and_frozen(module):
    cfg = __import__(module).parse_args(["--seed", "3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4
    assert engine.jsonable(cfg)["seed"] == 3 and None not in (cfg.model, cfg.patch, cfg.batch_size, cfg.output)


def test_a_typed_flag_beats_every_recipe_and_the_first_recipe_beats_the_next():
    flags = dict(lr=None, patch=4, epochs=None, depth=None)
    merged = engine.merge_recipe(flags, dict(lr=1.0, patch=8), dict(lr=2.0, epochs=3, betas=(0.9, 0.95)))
    assert merged == dict(lr=1.0, patch=4, epochs=3, depth=None, betas=(0.9, 0.95))


@pytest.mark.parametrize("batch,accum", [(8, 0), (8, -2), (0, 1), (6, 4)])
def test_impossible_batch_splits_stop_with_the_flags_named(batch, accum):
    with pytest.raises(SystemExit, match="--batch-size"):
        engine.micro_batch(batch, engine.Run(), accum)


@pytest.mark.parametrize("module", ["train", "eval_seg", "eval_det"])
def test_advice_on_a_loss_that_is_not_finite_names_only_the_scripts_flags(module):
    script = __import__(module)
    remedies = getattr(script, "NONFINITE_REMEDIES",
                       inspect.signature(engine.check_finite).parameters["remedies"].default)
    with pytest.raises(SystemExit, match=re.escape(remedies)):
        engine.check_finite(torch.tensor(float("nan")), "step 1", "out", remedies)
    named = set(re.findall(r"--[a-z][a-z0-9-]*", remedies))
    options = {option for action in script.get_args_parser()._actions for option in action.option_strings}
    assert named and named <= options, named - options


RECIPES = {"train": lambda m: [m.COMMON, m.DEMO_MODEL] + [r for recipe in m.RECIPES.values()
                                                          for r in (recipe, recipe.get("large", {}))],
           "eval_seg": lambda m: [m.PAPER, m.DEMO], "eval_det": lambda m: [m.PAPER, m.DEMO]}


@pytest.mark.parametrize("module", ["train", "eval_seg", "eval_det"])
def test_no_parser_default_shadows_a_recipe_value(module):
    # merge_recipe lets a flag's non-None value win over every recipe: a flag that a recipe sets must
    # default to None, or the recipe's value would never be used
    script = __import__(module)
    keys = {key for recipe in RECIPES[module](script) for key in recipe}
    defaults = {action.dest: action.default for action in script.get_args_parser()._actions}
    shadowing = {key: defaults[key] for key in keys & set(defaults) if defaults[key] is not None}
    assert shadowing == {}
    assert len(keys & set(defaults)) >= 10   # the recipes do set flags


def test_a_sweep_without_output_gives_each_run_a_folder_of_its_own():
    import eval_seg
    import train
    base = ["--data", "digits", "--model", "adv_t", "--epochs", "1", "--patch", "8", "--embed-dim", "32"]
    assert train.parse_args([]).output == os.path.join("runs", "adv_t_p2_16_demo")   # the demo as it always was
    assert train.parse_args(base + ["--lr", "0.01"]).output == \
        os.path.join("runs", "adv_t_p8_16_demo_data-digits_embed-dim-32_epochs-1_lr-0.01")
    # every setting that decides the result and differs from the recipe is in the name; how a run
    # executes (workers, compile, cadence) is not
    sweep = [[], ["--lr", "0.01"], ["--seed", "1"], ["--batch-size", "32"], ["--drop-path", "0.1"], ["--ema"]]
    assert len({train.parse_args(base + extra).output for extra in sweep}) == len(sweep)
    assert train.parse_args(base + ["--workers", "2", "--compile", "--save-every", "5"]).output == \
        train.parse_args(base).output
    assert train.parse_args(base + ["--lr", "2e-3"]).output == train.parse_args(base).output   # the recipe's own
    assert eval_seg.parse_args(["--mode", "whole"]).output == os.path.join("runs", "seg_adv_t_p4_linear_mode-whole")
    many = ["--smoothing", "0.2", "--mixup", "0.5", "--cutmix", "0.3", "--reprob", "0.1"]
    assert re.fullmatch(r"runs/adv_t_p8_16_demo_[0-9a-f]{10}", train.parse_args(base + many).output)   # a digest
