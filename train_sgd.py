"""Regular SGD training that saves the checkpoints TWA averages.

<save-dir>/0.pt holds the initial weights, then 1.pt, 2.pt, ... one per save point (--save-every per
epoch, numbered consecutively): plain state_dicts, interchangeable with the reference code's. With
--sharded-checkpoints they are folders 0.dcp, 1.dcp, ... written by torch.distributed.checkpoint, each
process its own shards, and the model and momentum of the resume state go to a folder state-<id>.dcp.
<save-dir>/state.pt holds what --resume needs; <log-dir>/metrics.jsonl one row per epoch. With
--val-split R, R% of the training images are held out and their indices written to <save-dir>/split.json,
where train_twa.py finds them.
"""
import os
import shutil
import time

import torch

import cli
import distributed
import loop
import runfiles
import schedules
import stage
import twa
import utils
from cli import log
from runfiles import UsageError

STATE = "state.pt"
# the flags that shape a run: --resume refuses a state saved with other values
SHAPING = cli.SHAPING + ("sharded_checkpoints", "swa_start", "swa_lr", "save_every", "init",
                         "twa_at", "record_every", "twa_epochs", "twa_opt", "twa_lr", "twa_wd",
                         "twa_schedule", "train", "bits", "layer_size", "tol")


def parse_args(argv=None):
    parser = cli.script_parser(__doc__)
    add = parser.add_argument
    add("--epochs", type=int, default=200, help="training epochs")
    add("--lr", "--learning-rate", type=float, default=0.1, help="initial learning rate")
    add("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-4, help="weight decay")
    add("--schedule", default="step", choices=("step", "cosine", "constant", "swa"),
        help="learning-rate schedule; step: /10 at 50%% and 75%% of the epochs; swa: --lr for the "
        "first half of --swa-start epochs, linear decay to --swa-lr by 90%% of it, then --swa-lr")
    add("--swa-start", type=float, default=None, metavar="S",
        help="with --schedule swa: the epoch from which the rate is --swa-lr and the checkpoints "
        "form SWA's tail (the reference: 161 of 300 for VGG16BN, 126 of 225 for PreResNet164)")
    add("--swa-lr", type=float, default=0.05, help="with --schedule swa: the constant rate of the tail")
    add("--optimizer", default="sgd", choices=("sgd", "SGD"), help="kept for the reference's flags")
    add("--save-every", type=int, default=None, help="checkpoint files saved per epoch (default 1; "
        "with --twa-at 0: none)")
    add("--init", default=None, help="start from the weights in this state_dict file (e.g. to branch "
        "a run at one of its checkpoints) instead of a fresh initialisation")
    add("--sharded-checkpoints", action="store_true",
        help="save each checkpoint as a folder <i>.dcp written with torch.distributed.checkpoint, every "
        "process its own shards (with --fsdp nothing is gathered onto one process: for models whose "
        "whole state_dict does not fit one), and the resume state's model and momentum likewise; "
        "train_twa.py reads them shard by shard, and any script reads them whole")
    online = parser.add_argument_group("TWA in the same run (no checkpoint files needed)")
    add = online.add_argument
    add("--twa-at", type=int, default=None, metavar="E", help="stop SGD after E epochs (of the "
        "--epochs schedule), then run SWA and TWA over the weights recorded so far, kept in memory")
    add("--record-every", type=int, default=1, metavar="K",
        help="with --twa-at: weights recorded per epoch (plus the initial ones)")
    add("--twa-epochs", type=int, default=2, help="with --twa-at: TWA epochs")
    add("--twa-lr", type=float, default=None, help="with --twa-at: TWA learning rate (default: 2 "
        "for SGD, 0.01 for AdamW)")
    add("--twa-wd", type=float, default=1e-5, help="with --twa-at: TWA weight decay")
    add("--twa-schedule", default="step", choices=schedules.TWA_SCHEDULES,
        help="with --twa-at: TWA learning-rate schedule")
    add("--twa-opt", default="SGD", choices=("SGD", "AdamW"), help="with --twa-at: TWA optimizer")
    add("--train", "--coefficients", dest="train", default="coordinates",
        choices=("coordinates", "alpha"), help="with --twa-at: what TWA trains (see train_twa.py --help)")
    add("--bits", "--pbits", dest="bits", type=int, default=32, choices=(32, 16, 8, 4),
        help="with --twa-at: storage of the recorded basis (see train_twa.py --help)")
    add("--layer-size", type=int, default=None, metavar="S",
        help="with --twa-at: layer-wise TWA (see train_twa.py --help)")
    add("--tol", type=float, default=1e-5,
        help="with --twa-at: recorded weights within this relative distance of the span are left out")
    args = parser.parse_args(argv)
    cli.check_common_args(args)
    check_online_args(args)
    if args.save_every is None:
        args.save_every = 0 if args.twa_at else 1
    if args.save_every < 0 or (args.save_every == 0 and not args.twa_at):
        raise UsageError(f"--save-every must be positive, not {args.save_every}")
    if args.schedule == "swa" and not (args.swa_start and 0 < args.swa_start <= args.epochs):
        raise UsageError(f"--schedule swa needs --swa-start in (0, --epochs], not {args.swa_start}")
    if not 0 < args.swa_lr < float("inf"):
        raise UsageError(f"--swa-lr must be positive, not {args.swa_lr}")
    return args


def check_online_args(args):
    if args.twa_at is None:
        return
    if not 0 < args.twa_at <= args.epochs:
        raise UsageError(f"--twa-at must lie in [1, --epochs], not {args.twa_at}")
    for name in ("record_every", "twa_epochs"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.layer_size is not None and args.layer_size < 0:
        raise UsageError(f"--layer-size must be non-negative, not {args.layer_size}")
    if not 0 < args.tol < 1:
        raise UsageError(f"--tol must lie in (0, 1), not {args.tol}")
    args.twa_lr = args.twa_lr if args.twa_lr is not None else {"SGD": 2.0, "AdamW": 0.01}[args.twa_opt]
    if not 0 < args.twa_lr < float("inf") or not 0 <= args.twa_wd < float("inf"):
        raise UsageError("--twa-lr must be positive and --twa-wd non-negative")


def save_points(batches, per_epoch, flag="--save-every"):
    """Batch indices after which a checkpoint is saved (or weights recorded): per_epoch of them,
    evenly spread."""
    if per_epoch > batches:
        raise UsageError(f"{flag} {per_epoch} exceeds the {batches} batches of an epoch")
    return {round((j + 1) * batches / per_epoch) - 1 for j in range(per_epoch)}


def main(argv=None):
    args = parse_args(argv)
    ctx = utils.start_processes(args)
    state_path = os.path.join(args.save_dir, STATE)
    with distributed.agreement(ctx):  # what a node may lack or hold wrongly stops every process
        utils.lock_folders(args, ctx, [args.save_dir])
        resume = read_resume(args, state_path, ctx.world)
        split = os.path.join(args.save_dir, utils.SPLIT_FILE)  # --val-split's held-out part
        loaders, model = utils.setup_run(args, ctx, "sgd", split if resume and os.path.exists(split)
                                       else None, split)
        data_digest = utils.data_digest(loaders)
        if resume:
            check_same_data(resume, data_digest, state_path)
            if "shards" not in resume:  # else loaded once sharded, below
                model.load_state_dict(resume["model"])
        elif args.init:
            utils.load_weights(model, args.init, args)
        metrics = runfiles.Metrics(os.path.join(args.log_dir, "metrics.jsonl"), "sgd",
                                   resume["metrics"] if resume else (), enabled=ctx.is_main)
        manifest = runfiles.Manifest(args.save_dir, enabled=ctx.is_main and bool(args.save_every),
                                     keep=resume is not None)
    utils.check_ranks_agree(ctx, args, SHAPING, loaders, resume_progress=resume and resume["progress"])
    if args.fsdp:  # after the weights are loaded
        model = distributed.shard(model, ctx, args.fsdp_keep_gathered)
    train_loader, test_loader = loaders.train, loaders.test
    # checked before 0.pt is written
    points = save_points(len(train_loader), args.save_every)
    recording = save_points(len(train_loader), args.record_every, "--record-every") if args.twa_at \
        else set()
    settings = loop.LoopSettings.from_flags(args)
    optimizer = torch.optim.SGD(model.parameters(), lr=loop.learning_rate(settings, ctx.device),
                                momentum=args.momentum, weight_decay=args.weight_decay)
    recorder = make_recorder(args, model, ctx)
    progress = {"epoch": 0, "batch": 0, "checkpoint": 0, "totals": None, "elapsed": 0.0}
    if resume:
        load_resume_state(args, model, optimizer, settings, ctx, resume)
        utils.restore_rng(resume["rng"], ctx)
        progress = resume["progress"]
        restore_recorder(recorder, resume, state_path)
        log.info("resumed at epoch %d, batch %d, checkpoint %d", progress["epoch"], progress["batch"],
                 progress["checkpoint"])
    else:
        loop.check_finite(model.state_dict().values(), "the initial weights")
        if args.save_every:
            save_checkpoint(args, model, ctx, manifest, 0, epochs=0.0, step=0)
        if recorder:
            recorder.add(model)
    forward = distributed.wrap(model, ctx)  # --compile compiles the whole step (loop.make_step)

    def save_state():
        loop.check_finite(model.state_dict().values(), "the model")
        rng = utils.all_rng_states(ctx)
        if args.sharded_checkpoints:  # a new folder each time: state.pt names the one it goes with
            tensors = {"shards": f"state-{distributed.common_token(ctx):012x}.dcp"}
            distributed.save_sharded(model, os.path.join(args.save_dir, tensors["shards"]), ctx, optimizer)
        else:
            tensors = {"model": distributed.full_state_dict(model, ctx),
                       "optimizer": distributed.optimizer_state(model, optimizer)}
        if ctx.is_main:
            runfiles.save_torch({**tensors, "rng": rng, "progress": progress, "metrics": metrics.rows,
                                 "args": vars(args), "data": data_digest,
                                 "recorder": recorder.state_dict() if recorder else None}, state_path)
            remove_old_states(args.save_dir, tensors.get("shards"))


    def on_step(batch):
        """Record the weights and save a checkpoint file where asked; True when a file was saved
        (the resume state must then be saved too, to keep the numbering)."""
        if batch in recording:
            loop.check_finite(model.state_dict().values(), "the weights to record")
            recorder.add(model)
        if batch not in points:
            return False
        progress["checkpoint"] += 1
        loop.check_finite(model.state_dict().values(), f"checkpoint {progress['checkpoint']}")
        step = progress["epoch"] * len(train_loader) + batch + 1  # optimizer steps so far
        save_checkpoint(args, model, ctx, manifest, progress["checkpoint"],
                        epochs=step / len(train_loader), step=step)
        return True

    def update(lr):
        loop.set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    schedule = schedules.Schedule(args.schedule, args.lr, args.epochs, swa_start=args.swa_start,
                                  swa_lr=args.swa_lr)
    loop.run_epochs(settings, ctx, model, forward, (train_loader, test_loader), update, progress,
                    metrics, save_state, schedule, on_step=on_step, until=args.twa_at)
    if args.save_every:
        log.info("done: %d checkpoints in %s", progress["checkpoint"] + 1, args.save_dir)
    if recorder:
        train_recorded_subspace(args, ctx, loaders, model, recorder)


def save_checkpoint(args, model, ctx, manifest, i, **where):
    """Checkpoint i: <save-dir>/<i>.pt, whole tensors written by rank 0 (a sharded model's gathered
    one parameter at a time), or with --sharded-checkpoints the folder <i>.dcp of every process's
    shards. Every rank must call it."""
    if args.sharded_checkpoints:
        distributed.save_sharded(model, os.path.join(args.save_dir, f"{i}.dcp"), ctx)
        if ctx.is_main:
            manifest.record(f"{i}.dcp", **where)
        return
    weights = distributed.full_state_dict(model, ctx)
    if ctx.is_main:
        manifest.save(weights, f"{i}.pt", **where)


def load_resume_state(args, model, optimizer, settings, ctx, resume):
    """The model and optimizer state of a resume state (the model's already, unless sharded)."""
    if "shards" in resume:
        try:
            distributed.load_sharded_state(model, optimizer,
                                           os.path.join(args.save_dir, resume["shards"]))
        except twa.CheckpointError as err:
            raise UsageError(f"the resume state's shards: {err}") from None
        loop.restore_rate_form(optimizer, settings, ctx.device)
    else:
        loop.load_optimizer(optimizer, resume["optimizer"], settings, ctx.device, model)


def remove_old_states(folder, keep):
    """The state-<id>.dcp folders of earlier resume states (all but `keep`)."""
    for name in os.listdir(folder):
        if name.startswith("state-") and name.endswith((".dcp", ".dcp.tmp")) and name != keep:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def has_checkpoint(folder, i):
    return any(os.path.exists(os.path.join(folder, f"{i}{suffix}")) for suffix in (".pt", ".dcp"))


def read_resume(args, state_path, world):
    """The resume state when --resume (checked against the flags), else None. A folder killed
    between its 0.pt and its first state (nothing past 0.pt) holds no progress: --resume starts
    it afresh."""
    if not args.resume:
        if has_checkpoint(args.save_dir, 0) or os.path.exists(state_path):
            raise UsageError(f"{args.save_dir} already holds checkpoints; use --resume or another "
                             "--save-dir")
        return None
    if not os.path.exists(state_path) and has_checkpoint(args.save_dir, 0):
        if has_checkpoint(args.save_dir, 1):
            raise UsageError(f"{args.save_dir} holds checkpoints past 0.pt but no {STATE}: it cannot "
                             "be resumed, and starting afresh would overwrite them")
        log.warning("%s holds 0.pt but no %s: starting afresh", args.save_dir, STATE)
        return None
    return cli.read_resume(args, state_path, SHAPING, world)


def check_same_data(resume, digest, state_path):
    """Refuse to resume on other data: images added to the tree draw another --train-subset, and
    the run would go on on images that its first epochs never saw."""
    if "data" not in resume:
        log.warning("%s records no data digest (saved by an earlier version): the data cannot be "
                    "checked against the run's", state_path)
    elif resume["data"] != digest:
        raise UsageError(f"{state_path} was saved on other data (the images, labels, subset or "
                         "split differ); resume on the same data, or start without --resume")


def make_recorder(args, model, ctx):
    """With --twa-at: the recorder of 1 + K x E weights (initial, then K per epoch), else None."""
    if not args.twa_at:
        return None
    return twa.SubspaceRecorder(model, 1 + args.record_every * args.twa_at, bits=args.bits,
                                tol=args.tol, layer_size=args.layer_size, device=ctx.device)


def restore_recorder(recorder, resume, state_path):
    if recorder is None:
        return
    if recorder.shard.world > 1:
        raise UsageError("--resume of --twa-at under torchrun is not supported: each process holds "
                         "its own shard of the recorded basis; use --save-every k and train_twa.py")
    if not resume.get("recorder"):
        raise UsageError(f"{state_path} holds no recorded weights: it was saved without --twa-at")
    try:
        recorder.load_state_dict(resume["recorder"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise UsageError(f"{state_path}: the recorded weights do not fit these flags ({err})") from None


def train_recorded_subspace(args, ctx, loaders, model, recorder):
    """SWA and TWA over the recorded weights, as train_twa.py does over files; resumable through
    <save-dir>/twa_state.pt."""
    started = time.time()
    space = recorder.subspace()
    report = {"basis": stage.basis_report(space, time.time() - started, args.bits, ctx,
                                          recorded_online=True), "start_epoch": args.twa_at}
    log.info("subspace of %d recorded weights: rank %d, max|PP^T-I| %.1e, %.1f MB", len(space.names),
             space.rank, report["basis"]["orthogonality_error"], space.nbytes() / 1e6)
    state_path = os.path.join(args.save_dir, stage.STATE)
    inputs = {"recorded": list(space.names), "bits": args.bits, "layer_size": args.layer_size,
              "train": args.train, "val_split": args.val_split,
              "batch_size": args.batch_size, "data": utils.data_digest(loaders)}
    with distributed.agreement(ctx):  # no TWA state yet is normal: SGD was what ran
        resume = cli.read_resume(args, state_path, SHAPING, ctx.world, inputs,
                                 epochs=args.twa_epochs) if os.path.exists(state_path) else None
    stage.train_in_subspace(stage.TWASettings.of_train_sgd(args), ctx, loaders, model, space, report,
                            state_path, inputs, resume)


if __name__ == "__main__":
    cli.run_main(main)
