"""Running the project's scripts from the tests: clean environments, torchrun, kill-and-resume."""
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


def command(script, nproc=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(29500 + os.getpid() % 2000)] if nproc > 1 else [sys.executable])
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
