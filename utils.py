"""Plumbing shared by the training scripts: device and seeding, atomic file writes, safe loading,
logging and metrics, evaluation, BatchNorm recomputation and LR schedules. Knows nothing of TWA."""
import contextlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

import data
import distributed
import models

log = logging.getLogger("twa")
SPLIT_FILE = "split.json"  # the held-out indices of --val-split, beside the checkpoints
CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)  # ImageNet-style --arch names


class UsageError(Exception):
    """Bad input found before any long work: reported as one line, exit code 2."""


def run_main(main, argv=None):
    """Run a script's main(argv); bad input ends it with one line on stderr and exit code 2."""
    try:
        main(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:  # a diverged run: the last saved state is kept
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------
# Device, seeds, precision
# ---------------------------------------------------------------------------------------------------

def pick_device(name):
    """'auto' means cuda when available, else cpu; an unavailable cuda is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (all devices); `deterministic` trades speed for bitwise repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def autocast(device, enabled):
    """bfloat16 autocast when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build_model(arch, datasets, num_classes, device, channels_last=False):
    """A CIFAR architecture from models/, or any torchvision model name for ImageNet-style data."""
    if arch in models.ARCHS:
        model = models.build_model(arch, num_classes)
    elif datasets in ("ImageNet", "ImageFolder") and arch in CLASSIFIERS:
        model = torchvision.models.get_model(arch, num_classes=num_classes)
    else:
        names = sorted(models.ARCHS) + ["or a torchvision model name for ImageNet/ImageFolder data"]
        raise UsageError(f"unknown --arch {arch!r}; choose one of: {', '.join(names)}")
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


# ---------------------------------------------------------------------------------------------------
# Files: atomic writes, safe reads
# ---------------------------------------------------------------------------------------------------

def atomic_write(path, write):
    """write(tmp_path) into a temp file beside `path`, flush it to disk, then rename it over `path`:
    a crash leaves the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def save_json(obj, path):
    save_text(json.dumps(obj, indent=1) + "\n", path)


def load_torch(path):
    """torch.load with weights_only=True (no code runs on load) and one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except Exception as err:
        raise UsageError(f"cannot load {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def git_revision():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------------
# Logging and metrics
# ---------------------------------------------------------------------------------------------------

def setup_logging(log_dir, log_name, enabled=True):
    """Log to the console and to <log_dir>/<log_name>.log (rank 0 only: enabled=False silences)."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if enabled else logging.WARNING)
    if not enabled:
        return
    os.makedirs(log_dir, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout),
                    logging.FileHandler(os.path.join(log_dir, f"{log_name}.log"))):
        handler.setFormatter(fmt)
        log.addHandler(handler)  # also twa.py's logger: it logs under its module name, "twa"


class Metrics:
    """Per-epoch rows of one stage ("sgd", "twa") in a JSON-lines file that both scripts share: the
    file is rewritten atomically from memory, keeping the other stages' rows as they were. Only an
    enabled (rank 0) instance writes."""

    def __init__(self, path, stage, rows=(), enabled=True):
        self.path, self.stage, self.rows, self.enabled = path, stage, list(rows), enabled
        self.others = [r for r in read_jsonl(path) if r.get("stage") != stage] if enabled else []

    def append(self, row):
        self.rows.append({"stage": self.stage, **row})
        if not self.enabled:
            return
        save_text("".join(json.dumps(r) + "\n" for r in self.others + self.rows), self.path)


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(enabled):
    """A progress(iterable, description) wrapper: tqdm on a terminal, else the iterable itself."""
    if not enabled or not sys.stdout.isatty():
        return lambda items, desc=None, **kw: items
    return lambda items, desc=None, **kw: tqdm(items, desc=desc, leave=False, dynamic_ncols=True, **kw)


class StopRequest:
    """While active (a context manager), SIGINT/SIGTERM set a flag that the training loop checks, so
    that it saves a resumable state and exits; a second signal stops at once."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __bool__(self):
        return self.signal is not None


# ---------------------------------------------------------------------------------------------------
# Training pieces
# ---------------------------------------------------------------------------------------------------

def step_milestones(epochs):
    """Epochs at which the step schedule divides the rate by 10 (50% and 75% of training)."""
    return int(epochs * 0.5), int(epochs * 0.75 + 0.9)


def lr_at(schedule, base_lr, epoch, epochs, fraction, swa_start=None, swa_lr=None):
    """The learning rate in `epoch` at `fraction` (in [0, 1)) of all training steps: a pure function,
    so that resuming needs only counters. step and swa: per epoch; linear and cosine: per step."""
    if schedule == "constant":
        return base_lr
    if schedule == "swa":
        return base_lr * swa_factor(epoch / swa_start, swa_lr / base_lr)
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= m for m in step_milestones(epochs))
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * fraction))
    if schedule == "linear":
        return base_lr * (1 - fraction)
    raise ValueError(f"unknown schedule {schedule!r}")


def swa_factor(t, ratio):
    """The SWA schedule (Izmailov et al. 2018; the reference's swa/ scripts) at t = epoch / swa_start:
    the full rate for the first half, a linear decay to `ratio` of it by 90%, then `ratio` for good."""
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    return ratio


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def evaluate(model, loader, amp=False, ctx=None):
    """{'loss', 'accuracy' (percent)} of `model` over `loader` (each rank's share, summed)."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images)
        sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += len(labels)
    loss, correct, count = distributed.sum_(sums, ctx).tolist() if ctx else sums.tolist()
    return {"loss": loss / count, "accuracy": 100.0 * correct / count}


def recompute_bn(model, loader):
    """Reset BatchNorm statistics and recompute them as a cumulative average over `loader`."""
    update_bn(loader, model)


# ---------------------------------------------------------------------------------------------------
# What both scripts share: flags, setup, the training epoch
# ---------------------------------------------------------------------------------------------------

def add_common_args(parser):
    """Flags both scripts take, with the reference code's names."""
    add = parser.add_argument
    add("--datasets", default="CIFAR10", help=f"dataset: {', '.join(data.DATASETS)} (ImageFolder: any tree "
        "with train/ and val/ or test/ class folders at --data-dir)")
    add("--data-dir", default="./datasets", help="where the dataset is (CIFAR is downloaded here)")
    add("--arch", "-a", default="VGG16BN", help=f"model: {', '.join(sorted(models.ARCHS))}, or a "
        "torchvision model name for ImageNet/ImageFolder data")
    add("--train-subset", type=int, default=0, help="train on a fixed random subset of this many "
        "training images (0: all); the same subset in both scripts")
    add("--val-split", type=float, default=0, metavar="R", help="hold R%% of the training images out "
        "of training (seeded by --split-seed; recorded as split.json so that both scripts use the "
        "same part); train_twa.py then trains the TWA coefficients on that part (TWA-v)")
    add("--split-seed", type=int, default=0, help="seed of the --val-split hold-out")
    add("-b", "--batch-size", type=int, default=128, help="global mini-batch size")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--label-smoothing", type=float, default=0.0, help="label smoothing of the training loss "
        "(evaluation always uses plain cross-entropy)")
    add("--randomseed", type=int, default=1, help="seed for initialisation, data order and augmentation")
    add("--save-dir", default="save_temp", help="folder of the checkpoints 0.pt, 1.pt, ...")
    add("--log-dir", default=None, help="folder for the log, metrics.jsonl, args and results "
        "(default: --save-dir)")
    add("--log-name", default="log", help="log file name (<log-dir>/<log-name>.log)")
    add("-j", "--workers", type=int, default=min(4, os.cpu_count() or 1),
        help="DataLoader worker processes (torchvision loader only)")
    add("-p", "--print-freq", type=int, default=50, help="log every N training steps")
    add("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    add("--loader", default="memory", choices=data.LOADERS, help="memory: small-image datasets decoded once "
        "and augmented per batch on the device; torchvision: the classic DataLoader path (always "
        "used for large images such as ImageNet)")
    add("--normalize", default=None, choices=data.NORMALIZATIONS,
        help="input normalisation of small images: the reference code's CIFAR constants (default for "
        "CIFAR10/100, so its checkpoints load and score as there) or the training images' own "
        "statistics (default otherwise); both scripts must use the same")
    add("--channels-last", action="store_true", help="channels-last memory format (faster convs on GPU)")
    add("--amp", action="store_true", help="bfloat16 autocast for forward passes")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    add("--resume", action="store_true", help="continue from the last complete state in --save-dir")
    add("--quiet", action="store_true", help="no progress bars")


def check_common_args(args):
    if args.datasets not in data.DATASETS:
        raise UsageError(f"unknown --datasets {args.datasets!r}; choose one of: "
                         f"{', '.join(data.DATASETS)}")
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must lie in [0, 1), not {args.label_smoothing}")
    if not 0 <= args.val_split < 100:
        raise UsageError(f"--val-split is a percentage in [0, 100), not {args.val_split}")
    if args.train_subset < 0:
        raise UsageError(f"--train-subset must be non-negative, not {args.train_subset}")
    for name in ("batch_size", "epochs", "print_freq"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.lr <= 0 or args.momentum < 0 or args.weight_decay < 0 or args.workers < 0:
        raise UsageError("--lr must be positive and --momentum, --wd and --workers non-negative")
    if args.datasets != "CIFAR10" and args.datasets != "CIFAR100" and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir} does not exist")
    args.log_dir = args.log_dir or args.save_dir
    args.normalize = args.normalize or data.default_normalization(args.datasets)


def setup_run(args, stage, recorded_split=None, record_split_to=None):
    """Processes, logging, device, seeds, data and model; rank 0 writes the resolved args and the
    command line. The held-out part of the training set is the split recorded in `recorded_split`
    (a split.json) if given, else a new one when --val-split asks for it; rank 0 records it in
    `record_split_to`. Returns (distributed context, data.Loaders, model)."""
    ctx = distributed.init(pick_device(args.device))
    setup_logging(args.log_dir, args.log_name, enabled=ctx.is_main)
    seed_everything(args.randomseed, args.deterministic)
    if ctx.is_main:
        save_json({"argv": sys.argv, "args": vars(args), "git": git_revision(), "world": ctx.world},
                  os.path.join(args.log_dir, f"{stage}_args.json"))
    log.info("%s: %s", stage, " ".join(sys.argv))
    split = {}

    def held_out(n):
        split.update(resolve_split(args, n, recorded_split))
        return torch.tensor(split["held_out"], dtype=torch.int64) if split else None
    try:
        loaders = data.build_loaders(args, ctx.device, ctx.rank, ctx.world, held_out)
    except data.DataError as err:
        raise UsageError(str(err)) from None
    if split and ctx.is_main and record_split_to:
        save_json(split, record_split_to)
    model = build_model(args.arch, args.datasets, loaders.classes, ctx.device, args.channels_last)
    model = distributed.synchronise_batchnorm(model, ctx)
    log.info("device %s x %d processes, %s on %s: %d train batches%s, %d classes, %d parameters",
             ctx.device, ctx.world, args.arch, args.datasets, len(loaders.train),
             f" ({len(split['held_out'])} images held out)" if split else "", loaders.classes,
             sum(p.numel() for p in model.parameters()))
    return ctx, loaders, model


def resolve_split(args, n, recorded):
    """The split of n training images as a dict (percent, seed, examples, held_out indices): the
    recorded one, checked against the data and --val-split, else a new one; {} for none."""
    if recorded:
        try:
            with open(recorded) as f:
                split = json.load(f)
            split["examples"], split["percent"], split["seed"], split["held_out"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"cannot read the split {recorded}: {err}") from None
        if split["examples"] != n:
            raise UsageError(f"{recorded} splits {split['examples']} training images; this data has {n}")
        if args.val_split and (args.val_split, args.split_seed) != (split["percent"], split["seed"]):
            raise UsageError(f"--val-split {args.val_split:g} --split-seed {args.split_seed} differs "
                             f"from the {split['percent']:g}% (seed {split['seed']}) recorded in {recorded}")
        if not all(0 <= i < n for i in split["held_out"]):
            raise UsageError(f"{recorded} holds indices outside the {n} training images")
        return split
    if not args.val_split:
        return {}
    held = data.held_out_split(n, args.val_split, args.split_seed)
    return {"percent": args.val_split, "seed": args.split_seed, "examples": n, "held_out": held.tolist()}


def run_epochs(args, ctx, model, forward, loaders, update, progress, metrics, save_state,
               on_step=lambda batch: False, until=None):
    """Train epochs progress["epoch"] .. args.epochs - 1 (or until - 1: the schedule still spans
    args.epochs) and evaluate after each. update(lr) applies
    one optimizer step; on_step(batch) may save a checkpoint and says whether the resume state must
    be saved as well. SIGINT/SIGTERM (on any rank) save the state at the next step and exit with
    code 143."""
    train_loader, test_loader = loaders
    steps = len(train_loader)
    bar = progress_bar(not args.quiet and ctx.is_main)
    last = until or args.epochs
    epochs = bar(range(progress["epoch"], last), desc=metrics.stage, initial=progress["epoch"],
                 total=last)
    with StopRequest() as stop:
        for epoch in epochs:
            started, spent_before = time.time(), progress["elapsed"]
            train_loader.set_epoch(epoch)

            def lr_for_batch(batch):
                fraction = (epoch * steps + batch) / (args.epochs * steps)
                warmup = getattr(args, "warmup_epochs", 0) * steps  # steps of linear warm-up
                scale = min(1.0, (epoch * steps + batch + 1) / warmup) if warmup else 1.0
                return scale * lr_at(args.schedule, args.lr, epoch, args.epochs, fraction,
                                     getattr(args, "swa_start", None), getattr(args, "swa_lr", None))

            def after_step(batch, totals):
                stopping = distributed.any_(bool(stop), ctx)
                if on_step(batch) and batch + 1 < steps or stopping:
                    progress.update(batch=batch + 1, totals=totals(),
                                    elapsed=spent_before + time.time() - started)
                    save_state()
                return stopping

            totals = train_epoch(model, forward, train_loader, epoch, lr_for_batch, update, args, ctx,
                                 progress["batch"], progress["totals"], after_step)
            if totals is None:
                log.info("stopped by %s in epoch %d at step %d; state saved, continue with --resume",
                         stop.signal or "another rank", epoch, progress["batch"])
                raise SystemExit(128 + signal.SIGTERM)
            elapsed = spent_before + time.time() - started
            test = evaluate(model, test_loader, args.amp, ctx)
            metrics.append({"epoch": epoch + 1, "lr": lr_for_batch(steps - 1),
                            "train_loss": totals["loss"] / totals["count"],
                            "train_acc": 100 * totals["correct"] / totals["count"],
                            "test_loss": test["loss"], "test_acc": test["accuracy"], "time": elapsed})
            log.info("%s epoch %d/%d: test loss %.4f acc %.2f (%.0f s)", metrics.stage, epoch + 1,
                     args.epochs, test["loss"], test["accuracy"], elapsed)
            progress.update(epoch=epoch + 1, batch=0, totals=None, elapsed=0.0)
            save_state()


def train_epoch(model, forward, loader, epoch, lr_for_batch, update, args, ctx, start_batch=0,
                totals=None, after_step=lambda batch, totals: False):
    """One epoch from batch `start_batch` on: forward, backward, update(lr) per step. Loss and
    accuracy are summed on the device (no per-step host sync), over all ranks at each log line,
    and checked to be finite there. Returns the epoch's totals, or None when
    after_step(batch, totals) asks to stop."""
    model.train()
    device = next(model.parameters()).device
    base = totals or {"loss": 0.0, "correct": 0, "count": 0}
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count of this rank

    def merged():
        loss, correct, count = distributed.sum_(sums.clone(), ctx).tolist()
        return {"loss": base["loss"] + loss, "correct": base["correct"] + int(correct),
                "count": base["count"] + int(count)}

    batches = progress_bar(not args.quiet and ctx.is_main)(
        loader.batches(start_batch), desc=f"epoch {epoch}", total=len(loader) - start_batch)
    for batch, (images, labels) in enumerate(batches, start=start_batch):
        lr = lr_for_batch(batch)
        with autocast(device, args.amp):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        loss.backward()
        update(lr)
        sums[0] += loss.detach() * len(labels)
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += len(labels)
        if (batch + 1) % args.print_freq == 0 or batch + 1 == len(loader):
            now = merged()
            if not math.isfinite(now["loss"]):
                raise FloatingPointError(f"non-finite loss in epoch {epoch} by step {batch + 1}; the "
                                         "last saved state is kept")
            log.info("epoch %d [%d/%d] lr %.4g loss %.4f acc %.2f", epoch, batch + 1, len(loader), lr,
                     now["loss"] / now["count"], 100 * now["correct"] / now["count"])
        if after_step(batch, merged):
            return None
    return merged()
