"""Trainable Weight Averaging (Algorithm 1 of the paper) over saved checkpoints.

Reads <save-dir>/i.pt for i in [params_start, params_end) (or the folder i.dcp that train_sgd.py
--sharded-checkpoints writes: under --fsdp each process reads only its shards), or the files of
--checkpoints (soup mode),
builds an orthonormal basis P of their span (per block of layers with --layer-size), evaluates their
uniform average (SWA, BatchNorm recomputed), then trains inside the span from that average (or from
checkpoint --train_start): each step's gradient g becomes P g for the coordinates, i.e. P^T P g for the
weights. The coefficients train on the training images (TWA-t) or, with --val-split, on the held-out
part of them (TWA-v); BatchNorm statistics always come from the training part. Soup mode also reports
the best single model, the uniform soup and the greedy soup, ranked on the held-out part.

Writes <save-dir>/twa.pt (final weights, BN recomputed), <save-dir>/coefficients.json (the alpha with
sum_i alpha_i w_i = twa.pt's weights, per block) and <log-dir>/twa_results.json (accuracies, timings,
args); --output-dir moves the first two.
"""
import glob
import json
import os
import re
import time

import cli
import distributed
import loop
import runfiles
import schedules
import soup
import stage
import twa
import utils
from cli import log
from runfiles import UsageError

STATE = stage.STATE
NOT_CHECKPOINTS = ("state.pt", STATE, "twa.pt")  # what the scripts write beside checkpoints; globs skip them
NOT_CHECKPOINT_FOLDERS = ("state-", ".tmp", ".old")  # and the resume states' shards, unfinished folders
# the flags that shape a TWA run: --resume refuses a state saved with other values, naming the
# first that differs (--opt before --lr, whose default it sets)
SHAPING = ("opt",) + cli.SHAPING + ("warmup_epochs", "params_start", "params_end", "params_stride",
                         "train_start", "extract", "n_components", "bits", "layer_size", "tol",
                         "basis", "train", "bn")
SPLIT_RECORD = "twa_split.json"  # the split a TWA run used, in its log folder (never read back)


def parse_args(argv=None):
    parser = cli.script_parser(__doc__)
    add = parser.add_argument
    add("--epochs", type=int, default=10, help="TWA training epochs")
    add("--lr", type=float, default=None, help="learning rate of the coefficients (default: 2 for "
        "SGD, the paper's, 0.01 for AdamW). With SGD, 0.2-0.5 trained ResNet-20, a small CNN and VGG16 "
        "without normalisation; 2 trained the first two but took VGG16 to chance (docs/library.md): "
        "compare a few rates on held-out data")
    add("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-5, help="weight decay")
    add("--schedule", default="step", choices=schedules.TWA_SCHEDULES,
        help="step: /10 at 50%% and 75%% of the epochs (the reference's; 1 or 2 epochs never reach "
        "lr/100); step-fraction: /10 at 50%% and 75%% of the steps; linear and cosine: decay to 0 "
        "per step")
    add("--bn", nargs="+", default=["recompute"], choices=loop.BN_MODES, metavar="MODE",
        help="BatchNorm statistics of the final TWA weights: recompute (reset, then a cumulative "
        "average over one pass of the training images) or running (the reference's bn_update: one "
        "more train-mode pass with momentum 0.1, no reset); with both, each is measured and twa.pt "
        "keeps the first")
    add("--warmup-epochs", type=float, default=0.0,
        help="epochs over which the learning rate first rises linearly from 0")
    add("--opt", default="SGD", choices=("SGD", "AdamW"),
        help="optimizer of the coefficients (SGD with --momentum, or AdamW)")
    add("--checkpoints", nargs="+", default=None, metavar="FILE",
        help="soup mode: these checkpoint files (or quoted globs) of one architecture instead of "
        "the --save-dir range; also reports best single model, uniform and greedy soups")
    add("--split", default=None, metavar="FILE", help="the split.json of the held-out part "
        "(default: <save-dir>/split.json when it exists, as train_sgd.py --val-split writes it)")
    add("--layer-size", type=int, default=None, metavar="S",
        help="layer-wise TWA, grouped as the journal code does: a tensor starts a new block once "
        "the current one holds more than S entries (0: one block per tensor), one coefficient per "
        "checkpoint and block; unset: one coefficient per checkpoint")
    add("--params_start", type=int, default=0, help="first checkpoint (i.pt) of the subspace")
    add("--params_end", type=int, default=101, help="one past the last checkpoint of the subspace")
    add("--params_stride", type=int, default=1, help="use every k-th checkpoint of the range")
    add("--train_start", type=int, default=-1,
        help="start from the checkpoints' mean (-1) or from checkpoint i.pt")
    add("--extract", default="Schmidt", choices=("Schmidt", "PCA"),
        help="Schmidt: the full span; PCA: mean + the top --n_components principal directions")
    add("--n_components", type=int, default=None, help="directions kept by --extract PCA")
    add("--bits", "--pbits", dest="bits", type=int, default=32, choices=(32, 16, 8, 4),
        help="storage of the basis: float32, float16 (scaled), or 8/4-bit affine quantisation "
        "(--pbits: the reference code's name)")
    add("--output-dir", default=None, help="folder for twa.pt, coefficients.json and the resume "
        "state (default: --save-dir)")
    add("--overwrite", action="store_true", help="replace the outputs of an earlier TWA run in "
        "--output-dir and --log-dir (refused without this flag or --resume)")
    add("--basis", default="orthonormal", choices=("orthonormal", "reference"),
        help="orthonormal: Gram-Schmidt applied twice to the first checkpoint and the differences "
        "from it (exact projection); reference: the ICLR code's one pass in float32 over the raw "
        "checkpoints, whose P^T P g is only a preconditioned projection in the tail (an ablation; "
        "one block, 32 bits)")
    add("--train", "--coefficients", dest="train", default="coordinates",
        choices=("coordinates", "alpha"), help="what the optimizer trains: the orthonormal coordinates, or (as the journal code) one "
        "coefficient per checkpoint and block along its unit deviation from the mean, which makes "
        "AdamW independent of the checkpoints' order")
    add("--tol", type=float, default=1e-5,
        help="a checkpoint within this relative distance of the others' span is left out")
    args = parser.parse_args(argv)
    args.lr = args.lr if args.lr is not None else {"SGD": 2.0, "AdamW": 0.01}[args.opt]
    cli.check_common_args(args)
    check_args(args)
    return args


def check_args(args):
    if args.checkpoints is None and not 0 <= args.params_start < args.params_end:
        raise UsageError(f"empty or reversed checkpoint range [{args.params_start}, {args.params_end})")
    if args.params_stride <= 0:
        raise UsageError(f"--params_stride must be positive, not {args.params_stride}")
    if args.fsdp and args.checkpoints:
        raise UsageError("soup mode (--checkpoints) loads whole models one after another: run it "
                         "without --fsdp")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --output-dir, --overwrite replaces it: "
                         "give one of them")
    if args.layer_size is not None and args.layer_size < 0:
        raise UsageError(f"--layer-size must be non-negative, not {args.layer_size}")
    if not 0 < args.tol < 1:
        raise UsageError(f"--tol must lie in (0, 1), not {args.tol}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup-epochs must lie in [0, --epochs], not {args.warmup_epochs}")
    if args.basis == "reference" and (args.layer_size is not None or args.bits != 32 or
                                      args.extract != "Schmidt" or args.train != "coordinates"):
        raise UsageError("--basis reference is the ICLR code's single float32 basis: it takes no "
                         "--layer-size, --bits, --extract PCA or --train alpha")
    args.output_dir = args.output_dir or args.save_dir


def check_inputs(args, ctx):
    """The checks that read files (which one node of several may lack): the checkpoints exist, are
    whole, and match checkpoints.json where train_sgd.py wrote one. Returns (their SHA-256, how many
    matched an entry) on the first process of each node, which alone hashes them; (None, 0) on the
    others."""
    files = checkpoint_files(args)
    if args.train_start != -1 and args.train_start not in checkpoint_indices(args):
        where = (f"0..{len(files) - 1} (positions in --checkpoints)" if args.checkpoints else
                 f"[{args.params_start}, {args.params_end}) step {args.params_stride}")
        raise UsageError(f"--train_start {args.train_start} is outside {where}; use -1 for the mean")
    if args.extract == "PCA" and not (args.n_components and 1 <= args.n_components <= len(files)):
        raise UsageError(f"--extract PCA needs --n_components in [1, {len(files)}]")
    if args.split and not os.path.isfile(args.split):
        raise UsageError(f"--split {args.split} does not exist")
    for path in files:
        if not os.path.exists(path):
            raise UsageError(f"checkpoint not found: {path}")
        runfiles.check_regular(path, folders=True)
        try:
            twa.checkpoints.check_readable(path)
        except twa.CheckpointError as err:
            raise UsageError(str(err)) from None
    return runfiles.hash_checkpoints(files) if ctx.is_node_main else (None, 0)


def check_no_earlier_run(args):
    """A folder that holds another TWA run's outputs is not replaced without --overwrite (or
    continued without --resume): its results would be lost without a word. An output path that
    no file can replace (a folder, a named pipe) is refused here too, not after the training."""
    outputs = [os.path.join(args.output_dir, name) for name in ("twa.pt", "coefficients.json", STATE)]
    outputs.append(os.path.join(args.log_dir, "twa_results.json"))
    for path in outputs:
        try:
            runfiles.write_target(path)
        except runfiles.WriteFailed as err:
            raise UsageError(str(err)) from None
    if args.resume or args.overwrite:
        return
    found = next((path for path in outputs if os.path.exists(path)), None)
    if found:
        raise UsageError(f"{found} is an earlier TWA run's; --resume continues it, --overwrite "
                         "replaces it, or choose another --output-dir")


def check_range(args):
    """Refuse a --params range that reaches past the checkpoints in --save-dir before listing it
    (a range of a billion paths would fill the memory first)."""
    if args.checkpoints:
        return
    for i in range(args.params_start, args.params_end, args.params_stride):  # stops at the first gap
        if not os.path.exists(checkpoint_path(args, i)):
            raise UsageError(f"checkpoint not found: {checkpoint_path(args, i)} (of --params_start "
                             f"{args.params_start} --params_end {args.params_end})")


def checkpoint_indices(args):
    if args.checkpoints:
        return list(range(len(checkpoint_files(args))))
    return list(range(args.params_start, args.params_end, args.params_stride))


def checkpoint_files(args):
    """The checkpoints of the subspace, in order: --checkpoints (globs expanded), or the range."""
    if args.checkpoints is None:
        return [checkpoint_path(args, i) for i in checkpoint_indices(args)]
    files = []
    for pattern in args.checkpoints:
        matches = [path for path in sorted(glob.glob(pattern), key=in_number_order)
                   if is_checkpoint(path)] if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"--checkpoints {pattern} matches no file")
        files += matches
    return files


def in_number_order(path):
    """A sort key that puts numbered names in number order (2.pt before 10.pt), as the saving run
    wrote them: the first checkpoint anchors the basis, and --train_start counts in this order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


def is_checkpoint(path):
    """Whether a file or folder that a glob matched may be a checkpoint (not another output)."""
    name = os.path.basename(path.rstrip(os.sep))
    if os.path.isdir(path):
        return not (name.startswith(NOT_CHECKPOINT_FOLDERS) or name.endswith(NOT_CHECKPOINT_FOLDERS))
    return name not in NOT_CHECKPOINTS


def checkpoint_path(args, i):
    """Checkpoint i of --save-dir: i.pt, or the sharded folder i.dcp where only that exists."""
    if args.checkpoints:
        return checkpoint_files(args)[i]
    path = os.path.join(args.save_dir, f"{i}.pt")
    sharded = os.path.join(args.save_dir, f"{i}.dcp")
    return sharded if not os.path.exists(path) and os.path.isdir(sharded) else path


def head_epoch(args):
    """The SGD epoch of the subspace's last checkpoint, where TWA's epochs continue in plots; from
    train_sgd's sgd_args.json in --log-dir or --save-dir, None when unknown or in soup mode."""
    if args.checkpoints:
        return None
    for folder in (args.log_dir, args.save_dir):
        try:
            with open(os.path.join(folder, "sgd_args.json")) as f:
                per_epoch = json.load(f)["args"]["save_every"]
            return checkpoint_indices(args)[-1] / per_epoch
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
    return None


def build_subspace(args, model, ctx):
    files = checkpoint_files(args)
    try:
        started = time.time()
        progress = loop.progress_bar(not args.quiet and ctx.is_main)
        if args.basis == "reference":
            space = twa.Subspace.reference_from_checkpoints(model, files, device=ctx.device,
                                                            progress=progress)
        else:
            space = twa.Subspace.from_checkpoints(model, files, bits=args.bits, tol=args.tol,
                                                  device=ctx.device, layer_size=args.layer_size,
                                                  progress=progress)
    except twa.CheckpointError as err:
        raise UsageError(str(err)) from None
    try:
        explained = space.to_principal_components(args.n_components) if args.extract == "PCA" else None
    except ValueError as err:  # fewer independent checkpoints than components
        raise UsageError(f"--n_components: {err}") from None
    report = stage.basis_report(space, time.time() - started, args.bits, ctx, basis=args.basis,
                                explained_variance=explained)
    log.info("subspace: %d checkpoints, %d block(s), rank %d, max|PP^T-I| %.1e, %.1f MB per process "
             "at %d bits (%d processes), %.1f s", len(files), len(space.blocks), space.rank,
             report["orthogonality_error"], report["basis_bytes_per_process"] / 1e6, args.bits,
             ctx.world, report["seconds"])
    if args.basis == "reference":
        log.warning("--basis reference: P is not orthonormal (eigenvalues of PP^T in [%.3g, %.3g]), "
                    "so each step is P^T P g, a preconditioned projection", *report["gram_eigenvalues"])
    return space, report


def compare_soups(args, model, loaders, ctx, uniform):
    """Soup mode's baselines: every model alone, the best of them on the held-out part, the uniform
    soup (= SWA, measured already) and the greedy soup."""
    files = checkpoint_files(args)
    ingredients = []
    for path in files:
        utils.load_weights(model, path, args)
        scores = stage.evaluate(model, loaders, args.amp, ctx, bn=None)
        ingredients.append({"checkpoint": path, **scores})
        log.info("ingredient %s: held-out acc %.2f, test acc %.2f", path,
                 ingredients[-1]["held_out"]["accuracy"], ingredients[-1]["accuracy"])
    ranked = sorted(range(len(files)), key=lambda i: -ingredients[i]["held_out"]["accuracy"])
    soups = {}

    def score(members):
        model.load_state_dict(soup.average_state_dicts([files[i] for i in members]))
        soups[tuple(members)] = stage.evaluate(model, loaders, args.amp, ctx)
        return soups[tuple(members)]["held_out"]["accuracy"]
    members, _ = soup.greedy_soup(ranked, score)
    greedy = soups[tuple(members)]  # as scored: BatchNorm recomputed, also for a soup of one
    best = ingredients[ranked[0]]
    log.info("best single %.2f, uniform soup %.2f, greedy soup of %d: %.2f (test accuracy)",
             best["accuracy"], uniform["accuracy"], len(members), greedy["accuracy"])
    return {"ingredients": ingredients, "best_single": best, "uniform": uniform,
            "greedy": {**greedy, "members": [files[i] for i in members]}}


def main(argv=None):
    args = parse_args(argv)
    ctx = utils.start_processes(args)
    state_path = os.path.join(args.output_dir, STATE)
    with distributed.agreement(ctx):  # what a node may lack or hold wrongly stops every process
        check_range(args)
        files = checkpoint_files(args)
        recorded = args.split or os.path.join(args.save_dir, utils.SPLIT_FILE)
        recorded = recorded if os.path.isfile(recorded) else None
        digests, verified = check_inputs(args, ctx)
        utils.lock_folders(args, ctx, [args.output_dir])
        loaders, model = utils.setup_run(args, ctx, "twa", recorded,
                                       os.path.join(args.log_dir, SPLIT_RECORD))
        check_no_earlier_run(args)  # under the folders' lock: a run still going is named as such
        if args.checkpoints and loaders.held_out is None:
            raise UsageError("soup mode ranks the models on held-out images: give --val-split R, or "
                             "--split FILE from train_sgd.py --val-split")
        utils.load_weights(model, files[0], args)  # another architecture fails here
        runfiles.read_jsonl(os.path.join(args.log_dir, "metrics.jsonl"))  # appended to at the end
    # what the saved coordinates belong to: the files' contents, the data, and the generators
    # (states saved with the earlier centred generators cannot be resumed in this basis)
    inputs = {"checkpoints": files, "sha256": distributed.from_node_main(ctx, digests),
              "data": utils.data_digest(loaders), "generators": "anchored"}
    with distributed.agreement(ctx):
        resume = cli.read_resume(args, state_path, SHAPING, ctx.world, inputs, missing_ok=True)
    # nodes that hold other files under the same names would build a patchwork basis
    utils.check_ranks_agree(ctx, args, SHAPING, loaders, resume_progress=resume and resume["progress"],
                            checkpoint_files=(files, inputs["sha256"]))
    if args.fsdp:  # the basis follows its shards
        model = distributed.shard(model, ctx, args.fsdp_keep_gathered)
    if verified:
        log.info("%d of %d checkpoints verified against their SHA-256 in %s", verified,
                 len(inputs["checkpoints"]), runfiles.Manifest.FILE)
    if args.val_split and not recorded:
        log.warning("no recorded split: holding out a new %g%% of the training images, which the "
                    "checkpoints may have been trained on", args.val_split)
    space, basis_report = build_subspace(args, model, ctx)

    def soups_beside(swa):  # soup mode's baselines, then the model is back at the SWA point
        swa_state = {k: v.clone() for k, v in model.state_dict().items()}
        soups = compare_soups(args, model, loaders, ctx, swa)
        model.load_state_dict(swa_state)  # copied into the trainer's flat views
        return soups

    def start_at_checkpoint(trainer):
        utils.load_weights(model, checkpoint_path(args, args.train_start), args)  # and its buffers
        trainer.move_to(checkpoint_indices(args).index(args.train_start))

    report = {"basis": basis_report, "start_epoch": head_epoch(args)}
    stage.train_in_subspace(stage.TWASettings.of_train_twa(args), ctx, loaders, model, space, report,
                            state_path, inputs, resume, soups_beside if args.checkpoints else None,
                            start_at_checkpoint if args.train_start >= 0 else None)


if __name__ == "__main__":
    cli.run_main(main)
