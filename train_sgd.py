"""Regular SGD training that saves the checkpoints TWA averages.

<save-dir>/0.pt holds the initial weights, then 1.pt, 2.pt, ... one per save point (--save-every per
epoch, numbered consecutively): plain state_dicts, interchangeable with the reference code's.
<save-dir>/state.pt holds what --resume needs; <log-dir>/metrics.jsonl one row per epoch. With
--val-split R, R% of the training images are held out and their indices written to <save-dir>/split.json,
where train_twa.py finds them.
"""
import argparse
import os

import torch

import distributed
import twa
import utils
from utils import UsageError, log

STATE = "state.pt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_common_args(parser)
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
    add("--save-every", type=int, default=1, help="checkpoints saved per epoch")
    add("--init", default=None, help="start from the weights in this state_dict file (e.g. to branch "
        "a run at one of its checkpoints) instead of a fresh initialisation")
    args = parser.parse_args(argv)
    utils.check_common_args(args)
    if args.save_every <= 0:
        raise UsageError(f"--save-every must be positive, not {args.save_every}")
    if args.schedule == "swa" and not (args.swa_start and 0 < args.swa_start <= args.epochs):
        raise UsageError(f"--schedule swa needs --swa-start in (0, --epochs], not {args.swa_start}")
    if not args.swa_lr > 0:
        raise UsageError(f"--swa-lr must be positive, not {args.swa_lr}")
    return args


def save_points(batches, per_epoch):
    """Batch indices after which a checkpoint is saved: per_epoch of them, evenly spread."""
    if per_epoch > batches:
        raise UsageError(f"--save-every {per_epoch} exceeds the {batches} batches of an epoch")
    return {round((j + 1) * batches / per_epoch) - 1 for j in range(per_epoch)}


def load_weights(model, path):
    try:
        model.load_state_dict(twa.load_state_dict(path))
    except (twa.CheckpointError, RuntimeError) as err:
        raise UsageError(f"--init {path}: {str(err).splitlines()[0]}") from None


def main(argv=None):
    args = parse_args(argv)
    state_path = os.path.join(args.save_dir, STATE)
    resume = utils.load_torch(state_path) if args.resume else None
    if not args.resume and os.path.exists(os.path.join(args.save_dir, "0.pt")):
        raise UsageError(f"{args.save_dir} already holds checkpoints; use --resume or another --save-dir")
    split = os.path.join(args.save_dir, utils.SPLIT_FILE)  # --val-split's held-out part, for train_twa
    ctx, loaders, model = utils.setup_run(args, "sgd", split if args.resume and os.path.exists(split)
                                          else None, split)
    train_loader, test_loader = loaders.train, loaders.test
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    metrics = utils.Metrics(os.path.join(args.log_dir, "metrics.jsonl"), "sgd",
                            resume["metrics"] if resume else (), enabled=ctx.is_main)
    progress = {"epoch": 0, "batch": 0, "checkpoint": 0, "totals": None, "elapsed": 0.0}
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        progress = resume["progress"]
        log.info("resumed at epoch %d, batch %d, checkpoint %d", progress["epoch"], progress["batch"],
                 progress["checkpoint"])
    else:
        if args.init:
            load_weights(model, args.init)
        if ctx.is_main:
            utils.save_torch(model.state_dict(), os.path.join(args.save_dir, "0.pt"))
    forward = distributed.wrap(model, ctx)
    forward = torch.compile(forward) if args.compile else forward

    def save_state():
        if ctx.is_main:
            utils.save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "rng": torch.get_rng_state(), "progress": progress,
                              "metrics": metrics.rows, "args": vars(args)}, state_path)

    points = save_points(len(train_loader), args.save_every)

    def save_checkpoint(batch):
        if batch not in points:
            return False
        progress["checkpoint"] += 1
        if ctx.is_main:
            path = os.path.join(args.save_dir, f"{progress['checkpoint']}.pt")
            utils.save_torch(model.state_dict(), path)
        return True

    def update(lr):
        utils.set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    utils.run_epochs(args, ctx, model, forward, (train_loader, test_loader), update, progress,
                     metrics, save_state, on_step=save_checkpoint)
    log.info("done: %d checkpoints in %s", progress["checkpoint"] + 1, args.save_dir)
    distributed.shutdown(ctx)


if __name__ == "__main__":
    utils.run_main(main)
