"""What both scripts share on their command line: the common flags and their checks, --resume's
agreement with the saved flags, and the one-line errors (and exit codes) of bad input. The setup of a
run itself is in utils.py."""
import argparse
import logging
import math
import os
import signal
import sys
import traceback

import data
import distributed
import loaders
import loop
import models
import runfiles
from runfiles import UsageError, WriteFailed

log = logging.getLogger("twa")
# the common flags that shape a run's weights or their rounding (each script adds its own):
# --resume refuses a state saved with other values, and every process must have the same. --amp,
# --compile, --channels-last, --loader and --fsdp pick other kernels, fusions, crops or reduction
# orders; --fsdp-keep-gathered, --cuda-graphs and --threads do not (the same kernels run; a thread
# count changes no code path, only how a CPU kernel splits its sums, as a machine's load does)
SHAPING = ("datasets", "arch", "train_subset", "val_split", "split_seed", "batch_size", "momentum",
           "randomseed", "epochs", "lr", "weight_decay", "schedule", "label_smoothing", "normalize",
           "deterministic", "amp", "compile", "channels_last", "loader", "fsdp")


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
    # SIGINT/SIGTERM outside the epochs (which save a state and exit 143 themselves): one line and
    # exit code 143; a SIGINT that the shell told us to ignore (a background job) stays ignored
    interrupt, previous = loop.Interrupt(), {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if not (sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN):
            previous[sig] = signal.signal(sig, interrupt)
    previous_hook, sys.unraisablehook = sys.unraisablehook, interrupt.unraisable(sys.unraisablehook)
    try:
        main(argv)
        distributed.leave(together=True)  # main's models are gone: see distributed.leave
    except UsageError as err:
        stop(err, 2)
    except KeyboardInterrupt:
        stop("interrupted; the last saved state is kept", 128 + signal.SIGTERM)
    except (FloatingPointError, WriteFailed, data.DataError) as err:  # the last saved state is kept
        stop(err, 1)
    except RuntimeError as err:
        if not distributed.lost_peer(err):
            raise
        # a process group with a dead member can abort or hang when torn down: leave at once
        print(f"error: {distributed.lost_peer_message()}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(err, code):
    lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    message = lines[0]
    if "Original Traceback" in str(err):  # raised in a DataLoader worker: "<type>: <message>" is last
        message = lines[-1].split(": ", 1)[-1]
    print(f"error: {message}", file=sys.stderr)
    traceback.clear_frames(sys.exc_info()[2])  # the models of the frames that raised go too
    distributed.leave()
    sys.exit(code)


# what a resume state's inputs are called in the error that refuses other ones
INPUTS = {"checkpoints": "checkpoint files", "sha256": "checkpoint contents (their SHA-256 differ)",
          "data": "data (the images, labels, subset or split differ)",
          "generators": "basis generators (saved by an earlier version)",
          "recorded": "recorded weights"}
# flags and inputs renamed since states were saved under the reference code's names
SAVED_AS = {"bits": "pbits", "train": "coefficients"}


def read_resume(args, state_path, flags, world, inputs=None, missing_ok=False, epochs=None):
    """The resume state at state_path when --resume, checked against the flags and the number of
    processes (world) it was saved with (check_resume) and, when given, the inputs it was built
    from; None without --resume. With missing_ok, a run stopped before its first state starts
    afresh (with a warning). epochs: the stage's length, when not --epochs."""
    if not args.resume:
        return None
    if missing_ok and not os.path.exists(state_path):
        log.warning("--resume: no %s yet (stopped before its first state): starting afresh", state_path)
        return None
    resume = runfiles.load_torch(state_path)
    check_resume(resume, args, flags, state_path, args.epochs if epochs is None else epochs, world)
    saved = resume.get("inputs") or {}
    for key in inputs or ():
        if saved_value(saved, key) != inputs[key]:
            raise UsageError(f"{state_path} was saved for other {INPUTS.get(key, key)}; start without "
                             "--resume or use another output folder")
    return resume


def check_resume(resume, args, flags, state_path, epochs, world):
    """Refuse, before any long work, a resume state of another script or run: the first of `flags`
    whose value differs from the one it was saved with is named, another number of processes (the
    global batch is summed, and BatchNorm's statistics reduced, in another order; each process
    draws its own dropout), and impossible counters."""
    saved = resume.get("args") if isinstance(resume, dict) else None
    progress = resume.get("progress") if isinstance(resume, dict) else None
    if not isinstance(saved, dict) or not isinstance(progress, dict):
        raise UsageError(f"{state_path} is not a resume state of this script")
    for flag in flags:
        value = getattr(args, flag)  # a switch that a state predates was off
        if saved_value(saved, flag, False if isinstance(value, bool) else None) != value:
            raise UsageError(f"{state_path} was saved with --{flag.replace('_', '-')} "
                             f"{as_given(saved_value(saved, flag))}, not {as_given(value)}; resume "
                             "with the same flags, or start without --resume in another folder")
    if saved_world(resume) != world:
        raise UsageError(f"{state_path} was saved by {saved_world(resume)} processes, not {world}; "
                         "resume with as many, or start without --resume in another folder")
    counters = [progress.get(key) for key in ("epoch", "batch")]
    if not all(isinstance(v, int) and v >= 0 for v in counters) or counters[0] > epochs:
        raise UsageError(f"{state_path} holds impossible counters {progress}")


def saved_value(saved, key, default=None):
    """saved[key], or what a state saved before the rename holds under the old name."""
    return saved.get(key, saved.get(SAVED_AS.get(key), default))


def as_given(value):
    """A flag's value as a command line gives it (a list as its words)."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def saved_world(resume):
    """The number of processes that saved a resume state: one random state each (a lone tensor in
    states saved before they were kept per process)."""
    rng = resume.get("rng")
    return len(rng) if isinstance(rng, (list, tuple)) else 1


def script_parser(description):
    """The parser of a script: its docstring as the description, --help listing every default, and
    the common flags; the script adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_common_args(parser)
    return parser


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
    add("--loader", default="memory", choices=loaders.LOADERS, help="memory: small-image datasets decoded once "
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
    add("--fsdp", action="store_true", help="under torchrun: shard the model, its optimizer state "
        "and TWA's basis over the processes (FSDP2's fully_shard per block), where plain torchrun "
        "keeps a whole model on each (DistributedDataParallel); checkpoint files are the same")
    add("--fsdp-keep-gathered", action="store_true", help="with --fsdp: keep each block's weights "
        "gathered from its forward to its backward (FSDP2's reshard_after_forward=False): one "
        "all-gather of the weights per step instead of two, but the whole model's weights in each "
        "process's memory during a step, as without --fsdp")
    add("--resume", action="store_true", help="continue from the last complete state in --save-dir")
    add("--quiet", action="store_true", help="no progress bars")


def check_common_args(args):
    if args.fsdp_keep_gathered and not args.fsdp:
        raise UsageError("--fsdp-keep-gathered needs --fsdp")
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
    if args.fsdp and args.compile:
        raise UsageError("--fsdp with --compile is not supported yet: drop one of them")
    if args.threads < 0:
        raise UsageError(f"--threads must be non-negative, not {args.threads}")
    if not 0 < args.dist_timeout < float("inf"):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, not {args.dist_timeout}")
    for name in ("batch_size", "epochs", "print_freq", "eval_every"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    floats = {name: value for name, value in vars(args).items() if isinstance(value, float)}
    for name, value in floats.items():  # NaN passes every comparison below, and is no JSON
        if not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, not {value}")
    for name in ("randomseed", "split_seed"):  # numpy's generators take [0, 2^32), plus the rank
        if not 0 <= getattr(args, name) < 2 ** 31:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 2^31), not {getattr(args, name)}")
    if args.lr <= 0 or args.momentum < 0 or args.weight_decay < 0 or args.workers < 0:
        raise UsageError("--lr must be positive and --momentum, --wd and --workers non-negative")
    if args.datasets != "CIFAR10" and args.datasets != "CIFAR100" and not os.path.isdir(args.data_dir):
        raise UsageError(f"--data-dir {args.data_dir} does not exist")
    args.log_dir = args.log_dir or args.save_dir
    check_log_name(args.log_name, args.log_dir)
    args.normalize = args.normalize or data.default_normalization(args.datasets)


def check_log_name(name, log_dir):
    """--log-name names one file, <log-dir>/<name>.log: no folder, and short enough for the file
    system of --log-dir (the nearest folder of it that exists; 255 bytes where it cannot say)."""
    if name in ("", ".", "..") or os.sep in name:
        raise UsageError(f"--log-name {name!r} must be a file name: not empty, '.' or '..', and "
                         f"without '{os.sep}' (the folder is --log-dir)")
    size, limit = len(os.fsencode(f"{name}.log")), name_limit(log_dir)
    if size > limit:
        raise UsageError(f"--log-name is too long: {name[:20]}....log is {size} bytes, and the file "
                         f"system of {log_dir} takes names of at most {limit}")


def name_limit(folder):
    """The longest file name, in bytes, that the file system holding `folder` takes."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
