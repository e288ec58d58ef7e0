"""Shared by the benchmarks: the real CIFAR-10 tree, timing, and table printing."""
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import runfiles  # noqa: E402

ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "twa-data", "cifar10")


def cifar10_dir(path=None):
    """The ImageFolder tree of CIFAR-10, extracted from ../shared/data once if needed."""
    path = path or CACHE
    if not os.path.isdir(os.path.join(path, "train")):
        if not os.path.exists(ARCHIVE):
            sys.exit(f"no CIFAR-10 tree at {path} and no archive at {ARCHIVE}")
        os.makedirs(path, exist_ok=True)
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(path, filter="data")
    return path


def one_pass_gram_schmidt_(rows):
    """The ICLR code's basis, in place: one classical Gram-Schmidt pass over the raw rows held in
    one matrix (what train_twa.py --basis reference streams instead)."""
    for i in range(len(rows)):
        if i:
            rows[i] -= rows[:i].t() @ (rows[:i] @ rows[i])
        rows[i] /= rows[i].norm()
    return rows


def add_checkpoint_range_args(parser):
    """The flags of the benchmarks that read a range of train_sgd.py checkpoints."""
    parser.add_argument("--save-dir", required=True, help="folder of the checkpoints i.pt")
    parser.add_argument("--params_start", type=int, required=True, help="first checkpoint")
    parser.add_argument("--params_end", type=int, required=True, help="one past the last")
    parser.add_argument("--arch", default="resnet20", help="architecture of the checkpoints")
    parser.add_argument("--classes", type=int, default=10, help="classes of the architecture")


def clean_revision(allow_dirty):
    """The git revision the experiment runs from; a tree with uncommitted changes is refused (its
    results would name no commit that reproduces them) unless allow_dirty, which marks it +dirty."""
    revision = runfiles.git_revision()
    if revision is None or (revision.endswith("+dirty") and not allow_dirty):
        sys.exit(f"{ROOT} is {'not a git checkout' if revision is None else 'a tree with uncommitted changes'}"
                 "; commit first, or pass --allow-dirty (the results then say +dirty)")
    return revision


def results_record(path, fresh):
    """The results JSON at `path` if an earlier, stopped call of the same experiment left one (its
    finished steps are kept, with their commands), else `fresh`."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return fresh


def run_script(script, flags, commands):
    """Run one of the project's scripts as a user would (output to its log files), recording the
    command line in `commands` and printing it with the time."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
    if " ".join(cmd[1:]) not in commands:
        commands.append(" ".join(cmd[1:]))
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def data_args(data_dir, batch_size, loader="memory", workers=None, subset=0):
    """The fields data.build_loaders reads, as the scripts' flags would set them."""
    return SimpleNamespace(datasets="ImageFolder", data_dir=data_dir, batch_size=batch_size,
                           workers=min(4, os.cpu_count() or 1) if workers is None else workers,
                           loader=loader, randomseed=0, channels_last=False, train_subset=subset)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values):
    return statistics.median(values)


def print_table(header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
