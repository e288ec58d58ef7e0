"""The setup of a run, shared by train_sgd.py and train_twa.py: processes, logging, threads,
device, seeds and random states, data, model and initial weights, the held-out split, and the checks
that every process set up the same run."""
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch
import torchvision

import data
import distributed
import models
import twa
from loaders import build_loaders
from runfiles import FolderLock, UsageError, check_regular, git_revision, save_json, write_target

log = logging.getLogger("twa")
SPLIT_FILE = "split.json"  # the held-out indices of --val-split, beside the checkpoints
CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)  # ImageNet-style --arch names
# flags that do not shape the weights but decide which collectives run when: ranks must agree
SCHEDULING = ("print_freq", "eval_every", "resume", "amp", "loader", "bn", "fsdp", "fsdp_keep_gathered")


def pick_device(name):
    """'auto' means cuda when available, else cpu; an unavailable cuda is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def pick_threads(requested=0):
    """requested, else OMP_NUM_THREADS when set, else the cores idle right now (at least 1): two jobs
    that each take every core slow each other several times over."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        idle = idle_fraction()
    except (OSError, ValueError, IndexError, ZeroDivisionError):  # no /proc/stat
        return torch.get_num_threads()
    return max(1, min(cores, round(idle * (os.cpu_count() or cores))))


def idle_fraction(seconds=0.2):
    """The share of all CPU time that was idle over a short interval, from /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / (total1 - total0)


def seed_everything(seed, deterministic=False, rank=0):
    """Seed python, numpy and torch (all devices); `deterministic` trades speed for bitwise repeats.
    Ranks other than 0 get seeds of their own, so that their dropout masks differ; anything that
    must agree across ranks (model initialisation) is drawn before with rank 0's seed, and the data
    order has its own generators (loaders.epoch_generator)."""
    seed = seed if rank == 0 else seed + 7919 * rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def rng_state(device):
    """This process's random-number state: the CPU generator's, and the current GPU's on CUDA."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(ctx):
    """Every rank's rng_state, gathered (a list indexed by rank; one collective of a few KB)."""
    mine = rng_state(ctx.device)
    if ctx.world == 1:
        return [mine]
    states = [None] * ctx.world
    torch.distributed.all_gather_object(states, mine)
    return states


def restore_rng(saved, ctx):
    """Restore this rank's saved random state: a list by rank, of as many processes as this run's
    (cli.check_resume), or one CPU state in states saved before they were kept per process."""
    if torch.is_tensor(saved):
        saved = [{"cpu": saved, "cuda": None}]
    set_rng_state(saved[ctx.rank], ctx.device)


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


def load_weights(model, path, args):
    """Load a checkpoint file (parameters and buffers) into the model, or stop with one line that
    says plainly why it does not fit."""
    check_regular(path, folders=True)
    try:
        state = twa.checkpoints.load_state_dict(path, names=model.state_dict().keys())
    except twa.CheckpointError as err:
        raise UsageError(str(err)) from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(getattr(state[k], "shape", ())) !=
                tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        first = (f"'{reshaped[0]}' has shape {tuple(getattr(state[reshaped[0]], 'shape', ()))}, "
                 f"the model {tuple(expected[reshaped[0]].shape)}" if reshaped else
                 f"missing {missing[:1]}, unexpected {unexpected[:1]}")
        raise UsageError(f"{path} does not match --arch {args.arch} on {args.datasets}: "
                         f"{len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(reshaped)} reshaped entries ({first})")
    distributed.load_full_state_dict(model, state)


class EscapingFormatter(logging.Formatter):
    """A path may hold bytes that are not UTF-8 (surrogate escapes in sys.argv): the line shows them
    escaped, where the handlers would drop it with a logging error."""

    def format(self, record):
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


def setup_logging(log_dir, log_name, enabled=True):
    """Log to the console and to <log_dir>/<log_name>.log (rank 0 only: enabled=False silences)."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if enabled else logging.WARNING)
    if not enabled:
        return
    os.makedirs(log_dir, exist_ok=True)
    # appended to, not replaced; a named pipe would block the run until something reads it
    path = write_target(os.path.join(log_dir, f"{log_name}.log"))
    fmt = EscapingFormatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path)):
        handler.setFormatter(fmt)
        log.addHandler(handler)  # also twa.py's logger: it logs under its module name, "twa"


def start_processes(args):
    """Join torchrun's processes, if any, on the chosen device: the distributed context."""
    return distributed.init(pick_device(args.device), args.dist_timeout)


def lock_folders(args, ctx, folders):
    """Rank 0 locks `folders` and the log folder for the run's lifetime (runfiles.FolderLock), before
    anything in them is read: a second run into a busy folder is told so, whatever the first has
    written yet."""
    if ctx.is_main:
        ctx.folders = FolderLock([*folders, args.log_dir])


def setup_run(args, ctx, stage, recorded_split=None, record_split_to=None):
    """Logging, seeds, data and model; rank 0 writes the resolved args and the command line. The
    held-out part of the training set is the split recorded in `recorded_split` (a split.json) if
    given, else a new one when --val-split asks for it; rank 0 records it in `record_split_to`.
    Holds no collective, so that it can run inside distributed.agreement. Returns (loaders.Loaders,
    model)."""
    if args.batch_size < ctx.world:
        raise UsageError(f"-b {args.batch_size} is smaller than the {ctx.world} processes: every "
                         "process needs a share of each batch")
    setup_logging(args.log_dir, args.log_name, enabled=ctx.is_main)
    torch.set_num_threads(pick_threads(args.threads))
    seed_everything(args.randomseed, args.deterministic)
    if ctx.is_main:
        save_json({"argv": sys.argv, "args": vars(args), "git": git_revision(), "world": ctx.world},
                  os.path.join(args.log_dir, f"{stage}_args.json"))
    log.info("%s: %s", stage, " ".join(sys.argv))
    log.info("%s on %s from %s%s, %d epochs, into %s", args.arch, args.datasets, args.data_dir,
             " (downloaded there if missing)" if args.datasets in ("CIFAR10", "CIFAR100") else "",
             args.epochs, args.save_dir)
    split = {}

    def held_out(n):
        split.update(resolve_split(args, n, recorded_split))
        return torch.tensor(split["held_out"], dtype=torch.int64) if split else None
    try:
        loaders = build_loaders(args, ctx.device, ctx.rank, ctx.world, held_out)
    except data.DataError as err:
        raise UsageError(str(err)) from None
    if split and ctx.is_main and record_split_to:
        save_json(split, record_split_to)
    model = build_model(args.arch, args.datasets, loaders.classes, ctx.device, args.channels_last)
    model = distributed.synchronise_batchnorm(model, ctx)
    seed_everything(args.randomseed, args.deterministic, ctx.rank)  # the same model, own dropout
    log.info("%d CPU threads per process", torch.get_num_threads())
    log.info("device %s x %d processes, %s on %s: %d train batches%s, %d classes, %d parameters",
             ctx.device, ctx.world, args.arch, args.datasets, len(loaders.train),
             f" ({len(split['held_out'])} images held out)" if split else "", loaders.classes,
             sum(p.numel() for p in model.parameters()))
    return loaders, model


def check_ranks_agree(ctx, args, flags, loaders, **inputs):
    """Stop every rank (exit 2) unless all agree on `flags`, the data's sizes and `inputs` (e.g. the
    checkpoint files): a rank launched with another --train-subset would otherwise abort inside a
    collective, or train on other batches."""
    fields = {f"--{flag.replace('_', '-')}": getattr(args, flag, None)
              for flag in (*flags, *SCHEDULING)}
    fields["the data (sizes, labels and images of the training, test and held-out parts)"] = \
        data_digest(loaders)
    fields.update((name.replace("_", " "), value) for name, value in inputs.items())
    distributed.check_same(ctx, fields)


def check_split(split):
    """Raise ValueError unless `split` has the fields and types that resolve_split writes."""
    def ints(value):
        return isinstance(value, int) and not isinstance(value, bool)
    if not (ints(split["examples"]) and ints(split["seed"]) and
            isinstance(split["percent"], (int, float)) and isinstance(split["held_out"], list)):
        raise ValueError("examples and seed must be integers, percent a number, held_out a list")
    if not split["held_out"] or not all(map(ints, split["held_out"])):
        raise ValueError("held_out must be a non-empty list of image indices")
    if len(set(split["held_out"])) != len(split["held_out"]):
        raise ValueError("held_out repeats an index")


def data_digest(loaders):
    """What identifies the data of a run: the number of classes and, for each part, (examples, a
    position-weighted sum of the labels, one of the images' pixel sums). Equal for the same images
    in the same order; different for another subset, split, order or content. Ranks compare it, and
    a resume state keeps it. The torchvision loader reads its images lazily: its size only."""
    return [loaders.classes, *(_part_digest(loader) for loader in
                               (loaders.train, loaders.test, loaders.held_out) if loader is not None)]


def _part_digest(loader):
    stored = getattr(loader, "labels", None), getattr(loader, "images", None)
    if stored[0] is None:
        return [loader.n, None, None]
    labels, images = stored
    weights = torch.arange(1, len(labels) + 1, device=labels.device)
    # int64 throughout: exact on every device (a wrap past 2^63 is just as deterministic)
    pixels = sum((chunk.flatten(1).sum(1, dtype=torch.int64) * w).sum()
                 for chunk, w in zip(images.split(4096), weights.split(4096)))
    return [loader.n, int((labels * weights).sum()), int(pixels)]


def resolve_split(args, n, recorded):
    """The split of n training images as a dict (percent, seed, examples, held_out indices): the
    recorded one, checked against the data and --val-split, else a new one; {} for none."""
    if recorded:
        try:
            with open(recorded) as f:
                split = json.load(f)
            check_split(split)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UsageError(f"cannot read the split {recorded}: {err}") from None
        if split["examples"] != n:
            raise UsageError(f"{recorded} splits {split['examples']} training images; this data has {n}")
        if args.val_split and (args.val_split, args.split_seed) != (split["percent"], split["seed"]):
            raise UsageError(f"--val-split {args.val_split:g} --split-seed {args.split_seed} differs "
                             f"from the {split['percent']:g}% (seed {split['seed']}) recorded in {recorded}")
        if not all(0 <= i < n for i in split["held_out"]):
            raise UsageError(f"{recorded} holds indices outside the {n} training images")
        if len(split["held_out"]) >= n:  # distinct indices, checked above: every image held out
            raise UsageError(f"{recorded} holds out all {n} training images: none is left to train "
                             "on or to recompute BatchNorm over")
        return split
    if not args.val_split:
        return {}
    held = data.held_out_split(n, args.val_split, args.split_seed)
    return {"percent": args.val_split, "seed": args.split_seed, "examples": n, "held_out": held.tolist()}
