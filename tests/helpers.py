"""Running the project's scripts from the tests: clean environments, torchrun, kill-and-resume."""
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
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    one, cp = (json.load(open(os.path.join(folder, name, "results.json"))) for name in ("one", "cp"))
    assert (cp["run_state"]["world"], cp["run_state"]["replicas"]) == (2, 1)
    return one, cp
