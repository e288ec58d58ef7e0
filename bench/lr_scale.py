"""Which learning rate the TWA coefficients need, and why: measured on several architectures.

    python bench/lr_scale.py [--archs resnet20 small-cnn VGG16] [--lrs 0.05 0.2 0.5 2 5]
                             [--epochs 4] [--train-subset 10000] [--seed 1] [--name lr-scale]

Per architecture, on a fixed random subset of CIFAR-10's training images (10% of it held out):
1. SGD (lr 0.1, momentum 0.9, wd 5e-4), 2 snapshots per epoch (and the initial weights).
2. At the snapshots' mean (SWA, BatchNorm recomputed where there is any): its accuracy, the norm of
   the full gradient g, of its part in the snapshots' span |P g| (the gradient of the coordinates,
   P orthonormal), and the spread of the snapshots (rms distance from their mean).
3. TWA over all snapshots from their mean, 2 epochs at each learning rate (momentum 0.9, wd 1e-5,
   the step schedule), scored on the held-out images and on the test set.

A step of lr on the coordinates moves the weights by lr |P g|; the printed ratio lr |P g| / spread
says how far the first step goes relative to the region the snapshots cover. The JSON (every number,
the command line, the revision, the thread count) goes to results/<name>.json.
"""
import argparse
import copy
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import common

sys.path.insert(0, common.ROOT)
import data  # noqa: E402
import loop  # noqa: E402
import models  # noqa: E402
import runfiles  # noqa: E402
import schedules  # noqa: E402
import twa  # noqa: E402
from loaders import build_loaders  # noqa: E402

SNAPSHOTS_PER_EPOCH = 2


def small_cnn(classes):
    """A user's small network without normalisation layers: two conv blocks and a linear head."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, classes))


def build(arch, classes):
    return small_cnn(classes) if arch == "small-cnn" else models.build_model(arch, classes)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet20", "small-cnn", "VGG16"],
                        help="small-cnn or any --arch of the scripts")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.2, 0.5, 2, 5],
                        help="TWA learning rates to try")
    parser.add_argument("--epochs", type=int, default=4, help="SGD epochs")
    parser.add_argument("--twa-epochs", type=int, default=2, help="TWA epochs per learning rate")
    parser.add_argument("--train-subset", type=int, default=10000, help="training images used (0: all)")
    parser.add_argument("--seed", type=int, default=1, help="seed of data order and initialisation")
    parser.add_argument("--name", default="lr-scale", help="results/<name>.json")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 ImageFolder tree (default: "
                        "extracted from ../shared/data into ~/.cache/twa-data)")
    parser.add_argument("--results", default=os.path.join(common.ROOT, "results"),
                        help="where the JSON goes")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="run from a tree with uncommitted changes (the revision says +dirty)")
    args = parser.parse_args()
    for arch in args.archs:
        if arch != "small-cnn" and arch not in models.ARCHS:
            parser.error(f"unknown arch {arch!r}; choose small-cnn or one of {', '.join(models.ARCHS)}")
    if min(args.lrs) <= 0 or args.epochs < 1 or args.twa_epochs < 1 or args.train_subset < 0:
        parser.error("learning rates and epochs must be positive, --train-subset at least 0")
    return args


def sgd_snapshots(model, loader, epochs):
    """Train with SGD; the initial weights and 2 snapshots per epoch, as state_dicts in memory."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    snapshots = [copy.deepcopy(model.state_dict())]
    every = max(1, len(loader) // SNAPSHOTS_PER_EPOCH)
    model.train()
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if (i + 1) % every == 0 and (i + 1) // every <= SNAPSHOTS_PER_EPOCH:
                snapshots.append(copy.deepcopy(model.state_dict()))
    return snapshots


def flat_trainable(state, model):
    return torch.cat([state[name].reshape(-1).double() for name, _ in twa.trainable_parameters(model)])


def spread(snapshots, model):
    """The rms distance of the snapshots' trainable weights from their mean."""
    flats = torch.stack([flat_trainable(s, model) for s in snapshots])
    return (flats - flats.mean(0)).norm(dim=1).square().mean().sqrt().item()


def gradient_scales(model, trainer, space, loader, batches=10):
    """|g| and |P g| of the training loss at the current weights, over `batches` batches."""
    model.train()
    params = [p for _, p in twa.trainable_parameters(model)]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i, (x, y) in zip(range(batches), loader):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        total += torch.cat([g.reshape(-1) for g in grads]).double()
    g = total / batches
    return g.norm().item(), space.gradient(g.float()).norm().item()


def score(model, loaders):
    held = loop.evaluate(model, loaders.held_out_eval)["accuracy"]
    return {"held_out": held, "test": loop.evaluate(model, loaders.test)["accuracy"]}


def twa_run(model, snapshots, loaders, lr, epochs):
    """TWA over the snapshots from their mean: held-out and test accuracy, BatchNorm recomputed."""
    model.load_state_dict(snapshots[-1])
    space = twa.Subspace.from_checkpoints(model, snapshots)
    trainer = twa.TWA(model, space)
    opt = torch.optim.SGD(trainer.parameters(), lr=lr, momentum=0.9, weight_decay=1e-5)
    model.train()
    batches = len(loaders.train)
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loaders.train):
            loop.set_lr(opt, schedules.lr_at("step", lr, epoch, epochs, i / batches))
            F.cross_entropy(model(x), y).backward()
            trainer.step(opt)
    loop.recompute_bn(model, loaders.train)
    return score(model, loaders)


def measure(arch, args, loaders):
    torch.manual_seed(args.seed)
    model = build(arch, loaders.classes)
    started = time.time()
    snapshots = sgd_snapshots(model, loaders.train, args.epochs)
    row = {"arch": arch, "snapshots": len(snapshots), "sgd_seconds": time.time() - started,
           "last": score(model, loaders)}
    space = twa.Subspace.from_checkpoints(model, snapshots)
    trainer = twa.TWA(model, space)  # the model now holds the snapshots' mean
    row["grad_norm"], row["span_grad_norm"] = gradient_scales(model, trainer, space, loaders.train)
    row["spread"] = spread(snapshots, model)
    loop.recompute_bn(model, loaders.train)
    row["swa"] = score(model, loaders)
    row["twa"] = {}
    for lr in args.lrs:
        row["twa"][f"{lr:g}"] = {**twa_run(model, snapshots, loaders, lr, args.twa_epochs),
                                 "first_step_over_spread": lr * row["span_grad_norm"] / row["spread"]}
        print(f"  {arch} lr {lr:g}: {row['twa'][f'{lr:g}']}", flush=True)
    return row


def print_rows(rows):
    header = ["arch", "|g|", "|P g|", "spread", "last", "SWA", *[f"lr {lr}" for lr in rows[0]["twa"]]]
    table = [[r["arch"], f"{r['grad_norm']:.3f}", f"{r['span_grad_norm']:.3f}", f"{r['spread']:.2f}",
              f"{r['last']['held_out']:.1f}", f"{r['swa']['held_out']:.1f}",
              *[f"{t['held_out']:.1f} ({t['first_step_over_spread']:.2f})" for t in r["twa"].values()]]
             for r in rows]
    print("held-out accuracy (%); for TWA, (lr |P g| / spread) in brackets")
    common.print_table(header, table)


def main():
    args = parse_args()
    revision = common.clean_revision(args.allow_dirty)
    flags = common.data_args(common.cifar10_dir(args.data_dir), batch_size=128, subset=args.train_subset)
    flags.randomseed = args.seed
    device = torch.device("cpu")
    try:
        loaders = build_loaders(flags, device, split=lambda n: data.held_out_split(n, 10, args.seed))
    except data.DataError as err:  # e.g. --train-subset beyond the data
        sys.exit(f"error: {err}")
    rows = []
    for arch in args.archs:
        rows.append(measure(arch, args, loaders))
        record = {"rows": rows, "git": revision, "threads": torch.get_num_threads(),
                  "commands": [shlex.join(["python", "bench/lr_scale.py", *sys.argv[1:]])]}
        runfiles.save_json(record, os.path.join(args.results, f"{args.name}.json"))
    print_rows(rows)


if __name__ == "__main__":
    main()
