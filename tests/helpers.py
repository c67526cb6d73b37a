"""Running the project's scripts from the tests: clean environments, torchrun, kill-and-resume."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env():
    """No inherited torchrun variables; one thread, so that runs are comparable bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def command(script, nproc=1, max_restarts=0):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(29500 + os.getpid() % 2000), "--max-restarts", str(max_restarts)]
                if nproc > 1 else [sys.executable])
    return launcher + [os.path.join(ROOT, script)]


def run_script(script, args, cwd, nproc=1, check=True, timeout=300):
    proc = subprocess.run(command(script, nproc) + args, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_and_kill(script, args, cwd, checkpoint, ready, timeout=120):
    """Start a run and SIGKILL it as soon as `ready(checkpoint contents)` holds; return those contents."""
    proc = subprocess.Popen(command(script) + args, cwd=cwd, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(checkpoint) and ready(torch.load(checkpoint, weights_only=True)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return torch.load(checkpoint, weights_only=True)


def worker_pids(launcher):
    """{rank: pid} of torchrun's worker processes (the launcher's children, each with RANK set)."""
    workers = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent == launcher:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                workers[int(env[b"RANK"])] = int(entry)
        except (OSError, KeyError, ValueError):   # a process that ended while it was read, or not a worker
            continue
    return workers


def run_elastic_and_kill(script, args, cwd, checkpoint, ready, nproc=2, timeout=300):
    """Start a `torchrun --max-restarts 1` run, SIGKILL its rank 1 as soon as `ready(checkpoint contents)`
    holds, and let torchrun restart the workers, which resume from the checkpoint. Returns the launcher's
    exit status, its output and the checkpoint's contents at the kill."""
    log = os.path.join(cwd, "elastic.log")   # a file, not a pipe: a full pipe would stall the run
    with open(log, "w") as out:
        proc = subprocess.Popen(command(script, nproc, max_restarts=1) + args, cwd=cwd, env=clean_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, state = time.time() + timeout, None
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(checkpoint):
                state = torch.load(checkpoint, weights_only=True)
                if ready(state):
                    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
                    break
            time.sleep(0.02)
        try:
            proc.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:   # stop torchrun and its workers (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    with open(log) as f:
        return proc.returncode, f.read(), state


def same_run_without_and_with_context_parallel(folder):
    """The runs in folder/one (one process) and folder/cp (2 processes, --context-parallel 2): their
    floating-point weights agree to float32 rounding, and cp ran as one data-parallel replica of 2 ranks.
    Returns both results.json."""
    a, b = (torch.load(os.path.join(folder, name, "checkpoint.pth"), weights_only=True)["model"]
            for name in ("one", "cp"))
    one, cp = (json.load(open(os.path.join(folder, name, "results.json"))) for name in ("one", "cp"))
    # AdamW divides each gradient by its own running scale, so a gradient near zero, whose last bits the
    # two runs round apart, can move its weight up to a step of the learning rate apart per iteration:
    # such elements are rare (a few per thousand at most) and within 2 lr per iteration of each other
    steps = cp["args"].get("max_iters") or cp["args"]["iters"]
    for k in a:
        if a[k].is_floating_point():
            apart = ~torch.isclose(a[k], b[k], rtol=1e-4, atol=1e-6)
            assert apart.sum() <= max(1, a[k].numel() // 1000), k
            assert all((a[k] - b[k])[apart].abs() <= 2 * cp["args"]["lr"] * steps), k
    assert (cp["run_state"]["world"], cp["run_state"]["replicas"]) == (2, 1)
    return one, cp


def folder_checksums(output):
    """sha256 of every file in a run folder, by name."""
    sums = {}
    for folder, _, names in os.walk(output):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                sums[os.path.relpath(os.path.join(folder, name), output)] = hashlib.sha256(f.read()).hexdigest()
    return sums


def check_refused(script, args, cwd, output, named):
    """`args` differ from the run in `output`: exit status 2 naming the difference (`named`), the ways on,
    no traceback, and not a byte of the folder changed."""
    before = folder_checksums(output)
    proc = run_script(script, args, cwd, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "holds a run with other settings: " in proc.stderr and named in proc.stderr, proc.stderr
    assert "--no-resume" in proc.stderr and "--output" in proc.stderr and "Traceback" not in proc.stderr
    assert folder_checksums(output) == before


def check_one_run_per_folder(script, args, cwd, output, lr):
    """A finished run in `output` (made by `args`): a re-run with another --lr or width stops with exit
    status 2 before anything in the folder changes, naming what differs, without a traceback; one that
    changes only --workers returns the finished run's results; --eval-only with another width says what
    the checkpoint holds; --no-resume starts over and says so."""
    before = folder_checksums(output)
    for changed, named in ((["--lr", lr], "lr "), (["--embed-dim", "64"], "embed_dim 32 -> 64")):
        check_refused(script, args + changed, cwd, output, named)
    proc = run_script(script, args + ["--workers", "1"], cwd)
    assert "already finished" in proc.stdout and folder_checksums(output) == before
    proc = run_script(script, args + ["--eval-only", "--embed-dim", "64"], cwd, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "holds an Adventurer at patch" in proc.stderr and "(width 32, depth" in proc.stderr, proc.stderr
    assert "which does not fit the model asked for, " in proc.stderr and "adv_t" in proc.stderr, proc.stderr
    assert "(width 64" in proc.stderr
    proc = run_script(script, args + ["--lr", lr, "--no-resume"], cwd)
    assert f"--no-resume: starting over in {output}" in proc.stdout
