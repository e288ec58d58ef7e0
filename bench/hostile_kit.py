"""What the hostile sweeps share: a tiny data tree, the scripts run as a user runs them (alone, or
as nodes of one torchrun job), and the checks of what a careful user expects of them."""
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

import common
import runfiles

PY = sys.executable
SGD, TWA = (os.path.join(common.ROOT, name) for name in ("train_sgd.py", "train_twa.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Broken(AssertionError):
    """A case that did not hold."""


# ---------------------------------------------------------------------------------------------------
# Running the scripts
# ---------------------------------------------------------------------------------------------------

def image_tree(root, per_class=16, size=32, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 4)):
        for label, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (size, size, 3))
                pixels[..., label] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, split, name, f"{i}.png"))
    return root


def flags(data, save_dir, *extra):
    return ["--datasets", "ImageFolder", "--data-dir", data, "--arch", "resnet20", "-b", 8,
            "--save-dir", save_dir, "--device", "cpu", "-p", 2, "--quiet", *extra]


def run(script, args, preexec=None, timeout=300):
    proc = subprocess.run([PY, script, *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, preexec_fn=preexec)
    return proc.returncode, proc.stderr


def default_sigint():
    # a sweep started in the background (nohup ... &) hands its children an ignored SIGINT
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(script, args, env=None, cwd=None):
    return subprocess.Popen([PY, script, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env or ENV,
                            preexec_fn=default_sigint, cwd=cwd)


def expect(result, code, *phrases):
    """The run exited with `code`; an error is one line holding every phrase."""
    rc, err = result
    if rc != code:
        raise Broken(f"exit {rc}, not {code}: {err.strip()[-300:]}")
    if code in (1, 2):
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: "):
            raise Broken(f"not one error line: {err.strip()[-300:]}")
        missing = [p for p in phrases if p not in lines[0]]
        if missing:
            raise Broken(f"{missing[0]!r} not in {lines[0]!r}")


def files_whole_and_finite(folder, temp_files_allowed=False):
    """Every .pt file loads (weights_only) and holds only finite floats; no temp file is left
    (unless allowed: after kill -9, which the next run in the folder cleans up)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".tmp") and not temp_files_allowed:
            raise Broken(f"temp file left: {name}")
        if name.endswith(".pt"):
            state = torch.load(path, weights_only=True)
            tensors = state.get("model", state) if isinstance(state, dict) else {}
            if any(torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
                   for t in tensors.values()):
                raise Broken(f"{name} holds non-finite values")


def wait_for(path, proc, seconds=300):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            raise Broken(f"{path} never appeared")
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(script, per_rank, cwds=None):
    """One launch per rank (as two nodes would), each with its own flags (and working folder)."""
    env = {**ENV, "WORLD_SIZE": str(len(per_rank)), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    return [start(script, args, {**env, "RANK": str(rank)}, cwds and cwds[rank])
            for rank, args in enumerate(per_rank)]


def nodes(script, per_rank, timeout=200, cwds=None):
    """start_nodes, waited for: [(rc, stderr)] by rank."""
    procs = start_nodes(script, per_rank, cwds)
    return [(proc.wait(timeout=timeout), proc.stderr.read()) for proc in procs]


def file_limit(size):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


TWA_BASE = ["--params_end", 5, "--epochs", 1]


class Fixture:
    """The shared data tree, `base` (a finished train_sgd run of 2 epochs, 2 checkpoints per
    epoch), and the runs every case makes of them."""

    def __init__(self, data, base):
        self.data, self.base = data, base

    def sgd(self, t, *extra, **kw):
        return run(SGD, flags(self.data, t, "--epochs", 1, *extra), **kw)

    def twa(self, folder, t, *extra, **kw):
        return run(TWA, flags(self.data, folder, *TWA_BASE, "--output-dir", t, "--log-dir", t, *extra),
                   **kw)

    def copy_base(self, t, manifest=True):
        shutil.copytree(self.base, t, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".twa-lock"))
        if not manifest:
            os.remove(os.path.join(t, runfiles.Manifest.FILE))
        return t
