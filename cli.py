"""What both scripts do first: their shared flags and checks, the one-line errors of bad input,
and the setup of a run (processes, logging, device, seeds, data, model, held-out split)."""
import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torchvision

import data
import distributed
import models
import twa
from runfiles import FolderLock, UsageError, WriteFailed, git_revision, save_json

log = logging.getLogger("twa")
SPLIT_FILE = "split.json"  # the held-out indices of --val-split, beside the checkpoints
CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)  # ImageNet-style --arch names
# flags that do not shape the weights but decide which collectives run when: ranks must agree
SCHEDULING = ("print_freq", "eval_every", "resume", "amp", "loader")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default appended, unless its help already says what the default is
    or there is none to show."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def run_main(main, argv=None):
    """Run a script's main(argv); bad input ends it with one line on stderr and exit code 2, a
    failure during the run (non-finite values, a failed write, unreadable data) with one line and
    exit code 1."""
    # SIGTERM outside the epochs (which save a state and exit 143 themselves) ends the run as
    # SIGINT does there: one line and exit code 143
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(argv)
    except UsageError as err:
        stop(err, 2)
    except KeyboardInterrupt:
        stop("interrupted; the last saved state is kept", 128 + signal.SIGTERM)
    except (FloatingPointError, WriteFailed, data.DataError) as err:  # the last saved state is kept
        stop(err, 1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop(err, code):
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    message = lines[0]
    if "Original Traceback" in str(err):  # raised in a DataLoader worker: "<type>: <message>" is last
        message = lines[-1].split(": ", 1)[-1]
    print(f"error: {message}", file=sys.stderr)
    distributed.leave()
    sys.exit(code)


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


def restore_rng(saved, ctx, state_path):
    """Restore this rank's saved random state (a list by rank; older states hold one CPU state)."""
    if torch.is_tensor(saved):
        saved = [{"cpu": saved, "cuda": None}]
    if len(saved) == ctx.world:
        set_rng_state(saved[ctx.rank], ctx.device)
        return
    log.warning("%s was saved by %d processes, not %d: the random states go on from process 0's "
                "(dropout masks differ from an uninterrupted run)", state_path, len(saved), ctx.world)
    set_rng_state(saved[0], ctx.device)
    if ctx.rank:  # a stream of its own, drawn from process 0's
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,))) + 7919 * ctx.rank)


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


def check_resume(resume, args, flags, state_path):
    """Refuse, before any long work, a resume state of another script or run: the first of `flags`
    whose value differs from the one it was saved with is named, and impossible counters too."""
    saved = resume.get("args") if isinstance(resume, dict) else None
    progress = resume.get("progress") if isinstance(resume, dict) else None
    if not isinstance(saved, dict) or not isinstance(progress, dict):
        raise UsageError(f"{state_path} is not a resume state of this script")
    for flag in flags:
        if saved.get(flag) != getattr(args, flag):
            raise UsageError(f"{state_path} was saved with --{flag.replace('_', '-')} "
                             f"{saved.get(flag)}, not {getattr(args, flag)}; resume with the same "
                             "flags, or start without --resume in another folder")
    counters = [progress.get(key) for key in ("epoch", "batch")]
    if not all(isinstance(v, int) and v >= 0 for v in counters) or counters[0] > args.epochs:
        raise UsageError(f"{state_path} holds impossible counters {progress}")


def load_weights(model, path, args):
    """Load a checkpoint file (parameters and buffers) into the model, or stop with one line that
    says plainly why it does not fit."""
    try:
        state = twa.load_state_dict(path)
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
    model.load_state_dict(state)


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
    add("-p", "--print-freq", type=int, default=50, help="log every N training steps (also where "
        "the loss is checked to be finite and, under torchrun, a stop request agreed on)")
    add("--eval-every", type=int, default=1, metavar="N", help="evaluate on the test set every N "
        "epochs and after the last")
    add("--threads", type=int, default=0, help="CPU threads of torch (0: OMP_NUM_THREADS when set, "
        "else the cores that other jobs leave idle right now)")
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
    add("--compile", action="store_true", help="torch.compile the whole training step (forward, "
        "backward, projection, optimizer)")
    add("--cuda-graphs", action="store_true", help="with --compile on a GPU: capture the compiled "
        "step with CUDA graphs (torch.compile's reduce-overhead mode; one capture per batch shape, "
        "the last partial batch included); a warning names graphs that could not be captured")
    add("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    add("--dist-timeout", type=float, default=600, metavar="SECONDS",
        help="under torchrun: how long a process waits for the others in one exchange before the "
        "run fails (a node that died or never started)")
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
    if args.cuda_graphs and not args.compile:
        raise UsageError("--cuda-graphs captures the compiled step: add --compile")
    if args.threads < 0:
        raise UsageError(f"--threads must be non-negative, not {args.threads}")
    if not 0 < args.dist_timeout < float("inf"):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, not {args.dist_timeout}")
    for name in ("batch_size", "epochs", "print_freq", "eval_every"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    for flag, value in (("--lr", args.lr), ("--momentum", args.momentum), ("--wd", args.weight_decay),
                        ("--tol", getattr(args, "tol", 0.0))):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, not {value}")
    if args.lr <= 0 or args.momentum < 0 or args.weight_decay < 0 or args.workers < 0:
        raise UsageError("--lr must be positive and --momentum, --wd and --workers non-negative")
    if args.datasets != "CIFAR10" and args.datasets != "CIFAR100" and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir} does not exist")
    args.log_dir = args.log_dir or args.save_dir
    args.normalize = args.normalize or data.default_normalization(args.datasets)


def start_processes(args):
    """Join torchrun's processes, if any, on the chosen device: the distributed context."""
    return distributed.init(pick_device(args.device), args.dist_timeout)


def setup_run(args, ctx, stage, recorded_split=None, record_split_to=None, folders=()):
    """Logging, seeds, data and model; rank 0 writes the resolved args and the command line. The
    held-out part of the training set is the split recorded in `recorded_split` (a split.json) if
    given, else a new one when --val-split asks for it; rank 0 records it in `record_split_to`.
    Rank 0 locks `folders` and the log folder for the run's lifetime. Holds no collective, so that
    it can run inside distributed.agreement. Returns (data.Loaders, model)."""
    if args.batch_size < ctx.world:
        raise UsageError(f"-b {args.batch_size} is smaller than the {ctx.world} processes: every "
                         "process needs a share of each batch")
    if ctx.is_main:
        ctx.folders = FolderLock([*folders, args.log_dir])
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
        loaders = data.build_loaders(args, ctx.device, ctx.rank, ctx.world, held_out)
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
    fields["the data (sizes and labels of the training, test and held-out parts)"] = (
        loaders.classes, *(label_digest(loader) for loader in
                           (loaders.train, loaders.test, loaders.held_out) if loader is not None))
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


def label_digest(loader):
    """(examples, a position-weighted sum of the labels) of a loader: equal for the same examples
    in the same order, different for another subset, split or order (in-memory loader; the
    torchvision loader keeps no labels at hand, so only its size counts)."""
    labels = getattr(loader, "labels", None)
    if labels is None:
        return loader.n, None
    weights = torch.arange(1, len(labels) + 1, device=labels.device)
    return loader.n, int((labels * weights).sum())


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
        return split
    if not args.val_split:
        return {}
    held = data.held_out_split(n, args.val_split, args.split_seed)
    return {"percent": args.val_split, "seed": args.split_seed, "examples": n, "held_out": held.tolist()}
