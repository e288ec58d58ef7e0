"""Trainable Weight Averaging (Algorithm 1 of the paper) over saved checkpoints.

Reads <save-dir>/i.pt for i in [params_start, params_end), builds an orthonormal basis P of their span,
evaluates their uniform average (SWA, BatchNorm recomputed), then trains inside the span from that
average (or from checkpoint --train_start): each step's gradient g becomes P g for the coordinates,
i.e. P^T P g for the weights. Writes <save-dir>/twa.pt (final weights, BN recomputed),
<save-dir>/coefficients.json (the alpha with sum_i alpha_i w_i = twa.pt's weights) and
<log-dir>/twa_results.json (SWA and TWA accuracies, timings, args); --output-dir moves the first two.
"""
import argparse
import os
import time

import torch

import distributed
import twa
import utils
from utils import UsageError, log

STATE = "twa_state.pt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    utils.add_common_args(parser)
    add = parser.add_argument
    add("--epochs", type=int, default=10, help="TWA training epochs")
    add("--lr", type=float, default=2.0, help="learning rate of the projected SGD")
    add("--wd", "--weight-decay", dest="weight_decay", type=float, default=1e-5, help="weight decay")
    add("--schedule", default="step", choices=("step", "constant", "linear"),
        help="step: /10 at 50%% and 75%% of the epochs; linear: decays to 0 per step")
    add("--opt", default="SGD", choices=("SGD",), help="optimizer of the projected training")
    add("--params_start", type=int, default=0, help="first checkpoint (i.pt) of the subspace")
    add("--params_end", type=int, default=101, help="one past the last checkpoint of the subspace")
    add("--params_stride", type=int, default=1, help="use every k-th checkpoint of the range")
    add("--train_start", type=int, default=-1,
        help="start from the checkpoints' mean (-1) or from checkpoint i.pt")
    add("--extract", default="Schmidt", choices=("Schmidt", "PCA"),
        help="Schmidt: the full span; PCA: mean + the top --n_components principal directions")
    add("--n_components", type=int, default=None, help="directions kept by --extract PCA")
    add("--pbits", type=int, default=32, choices=(32, 16, 8, 4),
        help="storage of the basis: float32, bfloat16, or 8/4-bit affine quantisation")
    add("--output-dir", default=None, help="folder for twa.pt, coefficients.json and the resume "
        "state (default: --save-dir)")
    add("--tol", type=float, default=1e-5,
        help="a checkpoint within this relative distance of the others' span is left out")
    args = parser.parse_args(argv)
    utils.check_common_args(args)
    check_args(args)
    return args


def check_args(args):
    if not 0 <= args.params_start < args.params_end:
        raise UsageError(f"empty or reversed checkpoint range [{args.params_start}, {args.params_end})")
    if args.params_stride <= 0:
        raise UsageError(f"--params_stride must be positive, not {args.params_stride}")
    if args.train_start != -1 and args.train_start not in checkpoint_indices(args):
        raise UsageError(f"--train_start {args.train_start} is outside [{args.params_start}, "
                         f"{args.params_end}) step {args.params_stride}; use -1 for the mean")
    args.output_dir = args.output_dir or args.save_dir
    n = len(checkpoint_indices(args))
    if args.extract == "PCA" and not (args.n_components and 1 <= args.n_components <= n):
        raise UsageError(f"--extract PCA needs --n_components in [1, {n}]")
    for i in checkpoint_indices(args):
        path = checkpoint_path(args, i)
        if not os.path.isfile(path):
            raise UsageError(f"checkpoint not found: {path}")
        try:
            twa.check_readable(path)
        except twa.CheckpointError as err:
            raise UsageError(str(err)) from None


def checkpoint_indices(args):
    return list(range(args.params_start, args.params_end, args.params_stride))


def checkpoint_path(args, i):
    return os.path.join(args.save_dir, f"{i}.pt")


def load_checkpoint(model, path, args):
    """Load a checkpoint (parameters and buffers) into the model, or say plainly why it does not fit."""
    state, expected = twa.load_state_dict(path), model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        first = (f"'{reshaped[0]}' has shape {tuple(state[reshaped[0]].shape)}, the model "
                 f"{tuple(expected[reshaped[0]].shape)}" if reshaped else
                 f"missing {missing[:1]}, unexpected {unexpected[:1]}")
        raise twa.CheckpointError(f"{path} does not match --arch {args.arch} on {args.datasets}: "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected, "
                                  f"{len(reshaped)} reshaped entries ({first})")
    model.load_state_dict(state)


def build_subspace(args, model, ctx):
    files = [checkpoint_path(args, i) for i in checkpoint_indices(args)]
    try:
        load_checkpoint(model, files[0], args)  # fails fast on another architecture or class count
        started = time.time()
        space = twa.Subspace.from_checkpoints(model, files, bits=args.pbits, tol=args.tol,
                                              device=ctx.device,
                                              progress=utils.progress_bar(not args.quiet and ctx.is_main))
    except twa.CheckpointError as err:
        raise UsageError(str(err)) from None
    explained = space.to_principal_components(args.n_components) if args.extract == "PCA" else None
    report = {"checkpoints": len(files), "rank": space.rank, "seconds": time.time() - started,
              "orthogonality_error": space.orthogonality_error(), "pbits": args.pbits,
              "basis_bytes_per_process": space.basis.nbytes(), "processes": ctx.world,
              "columns_per_process": space.shard.size, "explained_variance": explained}
    log.info("subspace: %d checkpoints, rank %d, max|PP^T-I| %.1e, %.1f MB per process at %d bits "
             "(%d processes), %.1f s", len(files), space.rank, report["orthogonality_error"],
             report["basis_bytes_per_process"] / 1e6, args.pbits, ctx.world, report["seconds"])
    return space, report


def evaluate_swa(model, train_loader, test_loader, args, ctx):
    """Test metrics of the model as it is, after recomputing its BatchNorm statistics."""
    utils.recompute_bn(model, train_loader)
    result = utils.evaluate(model, test_loader, args.amp, ctx)
    log.info("SWA: test loss %.4f acc %.2f", result["loss"], result["accuracy"])
    return result


def main(argv=None):
    args = parse_args(argv)
    state_path = os.path.join(args.output_dir, STATE)
    resume = utils.load_torch(state_path) if args.resume else None
    ctx, train_loader, test_loader, model = utils.setup_run(args, "twa")
    space, basis_report = build_subspace(args, model, ctx)
    trainer = twa.TWA(model, space)  # the model now holds the checkpoints' mean: SWA
    swa = evaluate_swa(model, train_loader, test_loader, args, ctx)
    if args.train_start >= 0:
        load_checkpoint(model, checkpoint_path(args, args.train_start), args)
        trainer.move_to(checkpoint_indices(args).index(args.train_start))
    optimizer = torch.optim.SGD(trainer.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    metrics = utils.Metrics(os.path.join(args.log_dir, "metrics.jsonl"), "twa",
                            resume["metrics"] if resume else (), enabled=ctx.is_main)
    progress = {"epoch": 0, "batch": 0, "totals": None, "elapsed": 0.0}
    if resume:
        trainer.move_to(resume["coordinates"])
        model.load_state_dict(resume["buffers"], strict=False)
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        progress = resume["progress"]
        log.info("resumed at epoch %d, batch %d", progress["epoch"], progress["batch"])
    forward = distributed.wrap(model, ctx)
    forward = torch.compile(forward) if args.compile else forward

    def save_state():
        if not ctx.is_main:
            return
        buffers = {k: v for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
        utils.save_torch({"coordinates": trainer.coordinates.detach(), "buffers": buffers,
                          "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                          "progress": progress, "metrics": metrics.rows, "args": vars(args)}, state_path)

    def update(lr):
        utils.set_lr(optimizer, lr)
        trainer.step(optimizer)

    train_started = time.time()
    utils.run_epochs(args, ctx, model, forward, (train_loader, test_loader), update, progress,
                     metrics, save_state)
    utils.recompute_bn(model, train_loader)
    final = utils.evaluate(model, test_loader, args.amp, ctx)
    log.info("TWA after BN update: test loss %.4f acc %.2f (SWA %.2f)", final["loss"],
             final["accuracy"], swa["accuracy"])
    if ctx.is_main:
        write_results(args, model, space, trainer, swa, final, basis_report,
                      time.time() - train_started)
    distributed.shutdown(ctx)


def write_results(args, model, space, trainer, swa, final, basis_report, seconds):
    alpha = space.checkpoint_coefficients(trainer.coordinates)
    utils.save_torch(model.state_dict(), os.path.join(args.output_dir, "twa.pt"))
    utils.save_json({"checkpoints": [os.path.basename(name) for name in space.names],
                     "alpha": alpha.tolist(), "uniform": 1.0 / len(space.names),
                     "coordinates": trainer.coordinates.detach().cpu().double().tolist()},
                    os.path.join(args.output_dir, "coefficients.json"))
    utils.save_json({"swa": swa, "twa": final, "basis": basis_report, "train_seconds": seconds,
                     "args": vars(args), "git": utils.git_revision()},
                    os.path.join(args.log_dir, "twa_results.json"))
    log.info("wrote twa.pt and coefficients.json to %s", args.output_dir)


if __name__ == "__main__":
    utils.run_main(main)
