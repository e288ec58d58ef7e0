"""Shared by the benchmarks: the real CIFAR-10 tree, timing, table printing, and what the experiment
runners share (flags, provenance, results records)."""
import argparse
import fcntl
import glob
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models  # noqa: E402
import runfiles  # noqa: E402

ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "twa-data", "cifar10")


def timing_parser(description):
    """The parser of a timing benchmark: the models to time and the interleaved rounds."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet20", "VGG16BN"], help="models to time")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    return parser


def cifar10_dir(path=None, cache=CACHE):
    """The ImageFolder tree of CIFAR-10: `path` as given, or the cache, extracted from ../shared/data
    once. Only the cache is extracted into: a mistyped --data-dir is an error, not 400 MB of images
    and a benchmark on them."""
    if path:
        if not os.path.isdir(os.path.join(path, "train")):
            sys.exit(f"--data-dir {path}: no train/ folder there (a CIFAR-10 ImageFolder tree); "
                     f"without --data-dir the archive is extracted to {cache}")
        return path
    if not os.path.isdir(os.path.join(cache, "train")):
        if not os.path.exists(ARCHIVE):
            sys.exit(f"no CIFAR-10 tree at {cache} and no archive at {ARCHIVE}")
        extract_whole(ARCHIVE, cache)
    return cache


def extract_whole(archive, folder):
    """Extract beside `folder`, then rename, under a lock on the folder's parent: an interrupted
    extraction leaves no partial tree that the next run would take for the data set (only a hidden
    folder, which the next extraction removes), and of two runs extracting at once the second
    finds the first's tree."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    lock = os.open(parent, os.O_RDONLY)  # a lock on the folder itself: no lock file beside the data
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in glob.glob(os.path.join(parent, ".extracting-*")):  # a killed run's
            shutil.rmtree(leftover, ignore_errors=True)
        if os.path.isdir(os.path.join(folder, "train")):
            return  # extracted by another run while this one waited
        _extract_and_rename(archive, folder, parent)
    finally:
        os.close(lock)


def _extract_and_rename(archive, folder, parent):
    staging = tempfile.mkdtemp(prefix=".extracting-", dir=parent)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        os.replace(staging, folder)  # fails where a folder that is not the data is in the way
    except (OSError, EOFError, tarfile.TarError, zlib.error) as err:  # also a cut or corrupt archive
        if not os.path.isdir(os.path.join(folder, "train")):
            raise SystemExit(f"cannot extract {archive} to {folder}: {err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def model_and_checkpoints(parser, args, least=2):
    """The model of --arch and the files i.pt, i in [params_start, params_end), of args.save_dir; a
    range of fewer than `least`, a missing file or an unknown --arch is a one-line usage error."""
    if args.params_start < 0 or args.params_end - args.params_start < least:
        parser.error(f"--params_start {args.params_start} --params_end {args.params_end}: need at least "
                     f"{least} checkpoints, numbered from 0")
    try:
        model = models.build_model(args.arch, args.classes)
    except ValueError as err:  # an unknown --arch
        parser.error(str(err))
    paths = [os.path.join(args.save_dir, f"{i}.pt") for i in range(args.params_start, args.params_end)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        parser.error(f"{len(missing)} of the {len(paths)} checkpoints are missing, the first {missing[0]}")
    return model, paths


def add_experiment_args(parser):
    """The flags every experiment runner (reproduce.py, head.py, tail_swa.py) takes."""
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 ImageFolder tree (default: "
                        "extracted from ../shared/data into ~/.cache/twa-data)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "runs"), help="run folders")
    parser.add_argument("--results", default=os.path.join(ROOT, "results"), help="where the JSON goes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run from a tree with uncommitted changes (the revision says +dirty)")


class Experiment:
    """What every experiment runner holds: its flags, the data, its run folder <out>/<name> and its
    results file <results>/<name>.json."""

    def __init__(self, args, name, fresh=None):
        """fresh: the results record to start from (see experiment_record), if the runner keeps one."""
        self.args = args
        self.data_dir = cifar10_dir(args.data_dir)
        self.run_dir = os.path.join(args.out, name)
        self.path = os.path.join(args.results, f"{name}.json")
        try:  # two runners of one name would each rewrite the record from their own memory
            self.lock = runfiles.FolderLock([self.run_dir])
        except runfiles.UsageError as err:
            sys.exit(f"error: {err}")
        if fresh is not None:
            self.report = experiment_record(self.path, {**fresh, "data_dir": self.data_dir},
                                            args.allow_dirty)
            self.commands = self.report["commands"]
            self.report.setdefault("invocations", []).append(invocation())


def invocation():
    """This runner's own command line (as run from the repository root) and the thread count its
    scripts inherit: a resumed run at another thread count rounds differently from there on."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return {"command": shlex.join(["python", script, *sys.argv[1:]]), "threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def portable_command(script, flags):
    """A script's command line as anyone can rerun it from the repository root: paths relative to
    the repository, the data folder as given (the default cache written as ~/...)."""
    words, previous = ["python", shlex.quote(script)], None
    for flag in map(str, flags):
        if previous == "--data-dir" and flag == CACHE:
            words.append("~/.cache/twa-data/cifar10")  # unquoted, so that a shell expands the ~
        elif os.path.isabs(flag) and previous != "--data-dir":
            words.append(shlex.quote(os.path.relpath(flag, ROOT)))
        else:
            words.append(shlex.quote(flag))
        previous = flag
    return " ".join(words)


def clean_revision(allow_dirty):
    """The git revision the experiment runs from; a tree with uncommitted changes is refused (its
    results would name no commit that reproduces them) unless allow_dirty, which marks it +dirty."""
    revision = runfiles.git_revision()
    if revision is None or (revision.endswith("+dirty") and not allow_dirty):
        sys.exit(f"{ROOT} is {'not a git checkout' if revision is None else 'a tree with uncommitted changes'}"
                 "; commit first, or pass --allow-dirty (the results then say +dirty)")
    return revision


def experiment_record(path, fresh, allow_dirty):
    """The results record of an experiment: the JSON at `path` that an earlier, stopped call left
    (its finished steps are kept, with their commands) or `fresh`, holding "git" (the revision,
    refused if dirty unless allow_dirty) and "commands"; a record of another revision is refused."""
    git = clean_revision(allow_dirty)
    record = {**fresh, "git": git, "commands": []}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    if record["git"] != git:
        sys.exit(f"{path} was started at revision {record['git']}, this is {git}: continue it from "
                 "that revision, or remove the file to start again")
    return record


def sgd_record(folder):
    """The per-epoch test metrics of a train_sgd.py run, with which test images each epoch's model
    got right (packed bits, where recorded)."""
    rows = [r for r in runfiles.read_jsonl(os.path.join(folder, "metrics.jsonl")) if r["stage"] == "sgd"]
    return {"test_acc": [r["test_acc"] for r in rows], "test_loss": [r["test_loss"] for r in rows],
            "train_loss": [r["train_loss"] for r in rows], "seconds": [r["time"] for r in rows],
            "test_correct": [r.get("test_correct") for r in rows]}


class Scripts:
    """The project's scripts that a runner starts, as a user would (output to their log files), each
    command line recorded in `commands` and printed with the time. While in effect (a context
    manager), a SIGTERM to the runner reaches every running script once (it saves its state and
    exits; a second would stop it unsaved), and no script starts after it: the default handler would
    end the runner alone and leave its scripts running with nobody to record them."""

    def __init__(self, commands):
        self.commands, self.running, self.stopping, self.previous = commands, [], False, None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._stop)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)

    def _stop(self, *_):
        self.stopping = True
        for child in self.running:
            self.stop(child)

    @staticmethod
    def stop(child):
        if child.poll() is None and not getattr(child, "stop_sent", False):
            child.stop_sent = True
            child.terminate()

    def start(self, script, flags):
        if self.stopping:
            sys.exit(f"error: interrupted before {script} started; calling this again continues")
        cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
        command = portable_command(script, flags)
        if command not in self.commands:
            self.commands.append(command)
        print(f"[{time.strftime('%H:%M:%S')}] {command}", flush=True)
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        child.script = script
        self.running.append(child)
        return child

    def wait(self, child):
        """Wait for a started script; a failing one ends the runner with one line, not a traceback
        of the runner's own."""
        code = child.wait()
        if code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            sys.exit(f"error: {child.script} was interrupted (its last saved state is kept); calling "
                     "this again continues")
        if code:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            sys.exit(f"error: {child.script} {how} (its message, if any, is above); the steps finished "
                     "before it are kept")

    def run(self, script, flags):
        self.wait(self.start(script, flags))


def run_script(script, flags, commands):
    """Run one of the project's scripts to its end (see Scripts)."""
    with Scripts(commands) as scripts:
        scripts.run(script, flags)


def data_args(data_dir, batch_size, loader="memory", workers=None, subset=0):
    """The fields loaders.build_loaders reads, as the scripts' flags would set them."""
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


def markdown(header, rows):
    """A Markdown table of `rows` under `header`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values):
    """A table cell: the mean +- the standard deviation of `values` (one value as it is)."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"
