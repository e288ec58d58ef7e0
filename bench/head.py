"""The paper's head claim at its own protocol, at CPU scale, one seed per call.

    python bench/head.py --seed 1 [--epochs 30] [--twa-end 15] [--data-dir DIR]

1. SGD as the paper's CIFAR runs (and the reference's run.sh): ResNet-20, lr 0.1, momentum 0.9,
   wd 1e-4 (--wd), batch 128, E epochs, step schedule (/10 at 50% and 75%), --per-epoch checkpoints
   per epoch (default 4, so that one run gives both densities below).
2. TWA from the checkpoints' mean over the checkpoints of epochs 0..--twa-end, at 1 per epoch (the
   paper's density, --params_stride 4) and at --per-epoch per epoch (or at the densities
   --twa-per-epoch names), for each of --twa-epochs: lr 2, wd 1e-5, the step schedule by steps
   (step-fraction: lr 2, 0.2 and 0.02 however few the epochs, as the paper's 10 epochs at
   2/0.2/0.02), the final BatchNorm statistics both recomputed (ours) and updated by one more
   running pass (the reference's bn_update).

Every evaluated model records which test images it got right (packed bits), so that bench/report.py
gives paired intervals: SGD at every epoch, SWA, TWA before and after each BatchNorm pass.

The scripts run as a user runs them, in <out>/<name>-seed<k>/; a step whose outputs exist is skipped
and an interrupted SGD run resumed. The commands, the revision and every number go to
results/<name>-seed<k>.json, rewritten after every step ("complete" turns true at the end). A tree
with uncommitted changes is refused unless --allow-dirty.
"""
import argparse
import json
import os
import sys
import time

import torch

import common

ROOT = common.ROOT
sys.path.insert(0, ROOT)
import runfiles  # noqa: E402

TWA = {"lr": 2.0, "wd": 1e-5, "schedule": "step-fraction", "bn": ["recompute", "running"]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="seed of the whole pipeline")
    parser.add_argument("--epochs", type=int, default=30, help="SGD epochs E")
    parser.add_argument("--twa-end", type=int, default=None,
                        help="TWA over the checkpoints of epochs 0..this (default E/2)")
    parser.add_argument("--twa-epochs", type=int, nargs="+", default=[2, 4], help="TWA lengths")
    parser.add_argument("--per-epoch", type=int, default=4, help="checkpoints per SGD epoch")
    parser.add_argument("--twa-per-epoch", type=int, nargs="+", default=None,
                        help="checkpoints per epoch that TWA spans, each dividing --per-epoch "
                             "(default: 1, the paper's, and --per-epoch)")
    parser.add_argument("--wd", type=float, default=1e-4, help="SGD weight decay")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="batch size of every run")
    parser.add_argument("--train-subset", type=int, default=0,
                        help="train on this many images (0: all; small values for a dry run)")
    parser.add_argument("--name", default="head-paper", help="results/<name>-seed<k>.json")
    common.add_experiment_args(parser)
    args = parser.parse_args()
    args.twa_end = args.epochs // 2 if args.twa_end is None else args.twa_end
    if not 0 < args.twa_end < args.epochs:
        parser.error("--twa-end must lie in 1..E-1")
    if args.per_epoch < 1 or min(args.twa_epochs) < 1:
        parser.error("--per-epoch and --twa-epochs must be positive")
    args.twa_per_epoch = sorted(set(args.twa_per_epoch or [1, args.per_epoch]))
    if any(n < 1 or args.per_epoch % n for n in args.twa_per_epoch):
        parser.error(f"each --twa-per-epoch must divide --per-epoch ({args.per_epoch})")
    return args


class Pipeline(common.Experiment):
    def __init__(self, args):
        super().__init__(args, f"{args.name}-seed{args.seed}", {
            "name": args.name, "seed": args.seed, "epochs": args.epochs, "arch": "resnet20",
            "sgd_wd": args.wd, "checkpoints_per_epoch": args.per_epoch, "twa_end": args.twa_end,
            "train_subset": args.train_subset, "batch_size": args.batch_size, "twa": TWA,
            "device": f"{args.device} (torch {torch.__version__})",
            "head": [], "complete": False})

    def run(self, script, flags):
        common.run_script(script, ["--datasets", "ImageFolder", "--data-dir", self.data_dir, "--arch",
                                   "resnet20", "--randomseed", self.args.seed, "--device",
                                   self.args.device, "--quiet", "-p", 100, "-b", self.args.batch_size,
                                   "--train-subset", self.args.train_subset, *flags], self.commands)

    def sgd(self):
        folder = os.path.join(self.run_dir, "sgd")
        state = os.path.join(folder, "state.pt")
        if os.path.exists(state) and runfiles.load_torch(state)["progress"]["epoch"] >= self.args.epochs:
            return folder
        resume = ["--resume"] if os.path.exists(state) else []
        self.run("train_sgd.py", ["--epochs", self.args.epochs, "--lr", 0.1, "--wd", self.args.wd,
                                  "--schedule", "step", "--save-every", self.args.per_epoch,
                                  "--save-dir", folder, *resume])
        return folder

    def twa(self, checkpoints, stride, epochs):
        per = self.args.per_epoch
        name = f"twa-{per // stride}pe-{epochs}ep"
        folder = os.path.join(self.run_dir, name)
        results = os.path.join(folder, "twa_results.json")
        if not os.path.exists(results):
            self.run("train_twa.py", [
                "--save-dir", checkpoints, "--output-dir", folder, "--log-dir", folder,
                "--params_start", 0, "--params_end", self.args.twa_end * per + 1,
                "--params_stride", stride, "--train_start", -1, "--epochs", epochs,
                "--lr", TWA["lr"], "--wd", TWA["wd"], "--schedule", TWA["schedule"],
                "--bn", *TWA["bn"], "--resume"])  # --resume: a killed run's state continues
        with open(results) as f:
            out = json.load(f)
        with open(os.path.join(folder, "coefficients.json")) as f:
            alpha = json.load(f)["alpha"]
        rows = [r for r in runfiles.read_jsonl(os.path.join(folder, "metrics.jsonl"))
                if r["stage"] == "twa"]
        return {"name": name, "checkpoints_per_epoch": per // stride, "n": len(alpha),
                "sgd_epochs": self.args.twa_end, "twa_epochs": epochs,
                "lr_phases": sorted({TWA["lr"] * 0.1 ** k for k in range(3)}, reverse=True),
                "swa": score(out["swa"]), "before_bn": {"accuracy": rows[-1]["test_acc"],
                                                        "correct": rows[-1]["test_correct"]},
                "twa": {mode: score(r) for mode, r in out["twa_by_bn"].items()},
                "twa_curve_before_bn": [r["test_acc"] for r in rows], "alpha": alpha,
                "rank": out["basis"]["rank"], "seconds": out["train_seconds"]}

    def save(self):
        runfiles.save_json(self.report, self.path)


def score(result):
    return {"accuracy": result["accuracy"], "loss": result["loss"], "correct": result["correct"]}


def main():
    args = parse_args()
    pipe = Pipeline(args)
    started = time.time()
    checkpoints = pipe.sgd()
    pipe.report["sgd"] = common.sgd_record(checkpoints)
    pipe.save()
    done = {h["name"] for h in pipe.report["head"]}
    # the paper's density first, the shortest TWA first: what a stopped job leaves is the core
    for epochs in sorted(args.twa_epochs):
        for per_epoch in args.twa_per_epoch:
            result = pipe.twa(checkpoints, args.per_epoch // per_epoch, epochs)
            if result["name"] not in done:
                pipe.report["head"].append(result)
                pipe.save()
    pipe.report["complete"] = True
    pipe.report["wall_seconds"] = pipe.report.get("wall_seconds", 0) + time.time() - started
    pipe.save()
    print(f"wrote {pipe.path}")


if __name__ == "__main__":
    main()
