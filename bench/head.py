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

With --budget-matched, a second SGD run trains for --twa-end plus the longest --twa-epochs epochs on
its own step schedule (its lr steps at 50% and 75% of that budget): the baseline that "TWA saves
epochs" must beat, which simply trains less. Its per-epoch record goes to "sgd_matched".

For the paper's budget (E = 200, checkpoints 0..100 at one per epoch, 10 TWA epochs):

    python bench/head.py --seed 1 --epochs 200 --twa-end 100 --per-epoch 1 --twa-epochs 10 \
        --budget-matched --name head-e200

With --twa-during-sgd, TWA starts as soon as SGD has written the checkpoint of epoch --twa-end, in
a second process beside SGD, rather than after SGD's last epoch: on a GPU, where one small model
leaves it mostly idle, the TWA results then come in the time of SGD alone, and a run stopped by a
time limit has them from about E/2 + its TWA epochs on.

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
    parser.add_argument("--budget-matched", action="store_true",
                        help="also train SGD for --twa-end + max(--twa-epochs) epochs on its own schedule")
    parser.add_argument("--twa-during-sgd", action="store_true",
                        help="start TWA in a second process once SGD has written the checkpoint of "
                             "epoch --twa-end, instead of after SGD")
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

    def start(self, script, flags):
        return self.scripts.start(script, ["--datasets", "ImageFolder", "--data-dir", self.data_dir, "--arch",
                                   "resnet20", "--randomseed", self.args.seed, "--device",
                                   self.args.device, "--quiet", "-p", 100, "-b", self.args.batch_size,
                                   "--train-subset", self.args.train_subset, *flags])

    def run(self, script, flags):
        self.scripts.wait(self.start(script, flags))

    def sgd_folder(self):
        return os.path.join(self.run_dir, "sgd")

    def start_sgd(self):
        """The SGD run started (resumed where a state was saved), or None where it has finished."""
        folder = self.sgd_folder()
        state = os.path.join(folder, "state.pt")
        if os.path.exists(state) and runfiles.load_torch(state)["progress"]["epoch"] >= self.args.epochs:
            return None
        resume = ["--resume"] if os.path.exists(state) else []
        return self.start("train_sgd.py", ["--epochs", self.args.epochs, "--lr", 0.1, "--wd", self.args.wd,
                                           "--schedule", "step", "--save-every", self.args.per_epoch,
                                           "--save-dir", folder, *resume])

    def budget_matched(self):
        """SGD on its own schedule for the epochs TWA spends in all (SGD's and its own), recorded
        under "sgd_matched"; resumed where stopped, skipped where finished."""
        epochs = self.args.twa_end + max(self.args.twa_epochs)
        folder = os.path.join(self.run_dir, f"sgd-{epochs}")
        state = os.path.join(folder, "state.pt")
        if not (os.path.exists(state) and runfiles.load_torch(state)["progress"]["epoch"] >= epochs):
            resume = ["--resume"] if os.path.exists(state) else []
            self.run("train_sgd.py", ["--epochs", epochs, "--lr", 0.1, "--wd", self.args.wd, "--schedule",
                                      "step", "--save-dir", folder, *resume])
        self.report["sgd_matched"] = {"epochs": epochs, **common.sgd_record(folder)}
        self.save()

    def wait_for_twa_checkpoints(self, sgd):
        """Until SGD has written the last checkpoint TWA spans (checkpoints are written whole, by
        rename); an SGD run that ends before it ends the runner (Scripts.wait)."""
        last = os.path.join(self.sgd_folder(), f"{self.args.twa_end * self.args.per_epoch}.pt")
        while not os.path.exists(last):
            if sgd.poll() is not None:
                self.scripts.wait(sgd)
                if not os.path.exists(last):
                    sys.exit(f"error: train_sgd.py ended without writing {last}")
            time.sleep(2)

    def record_sgd(self):
        """SGD's per-epoch record so far: a run stopped midway keeps the epochs it finished."""
        if os.path.exists(os.path.join(self.sgd_folder(), "metrics.jsonl")):
            self.report["sgd"] = common.sgd_record(self.sgd_folder())
        self.save()

    def twa_runs(self):
        """(stride, epochs) of every TWA run: the paper's density first, the shortest TWA first, so
        that what a stopped job leaves is the core."""
        return [(self.args.per_epoch // per_epoch, epochs) for epochs in sorted(self.args.twa_epochs)
                for per_epoch in self.args.twa_per_epoch]

    def twa_folder(self, stride, epochs):
        return os.path.join(self.run_dir, f"twa-{self.args.per_epoch // stride}pe-{epochs}ep")

    def twa_done(self, stride, epochs):
        return os.path.exists(os.path.join(self.twa_folder(stride, epochs), "twa_results.json"))

    def twa(self, checkpoints, stride, epochs):
        per = self.args.per_epoch
        folder = self.twa_folder(stride, epochs)
        name = os.path.basename(folder)
        results = os.path.join(folder, "twa_results.json")
        wall = None
        if not self.twa_done(stride, epochs):
            started = time.time()
            self.run("train_twa.py", [
                "--save-dir", checkpoints, "--output-dir", folder, "--log-dir", folder,
                "--params_start", 0, "--params_end", self.args.twa_end * per + 1,
                "--params_stride", stride, "--train_start", -1, "--epochs", epochs,
                "--lr", TWA["lr"], "--wd", TWA["wd"], "--schedule", TWA["schedule"],
                "--bn", *TWA["bn"], "--resume"])  # --resume: a killed run's state continues
            wall = time.time() - started  # the whole process: start, basis, training, BN passes
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
                "rank": out["basis"]["rank"], "seconds": out["train_seconds"],
                "basis_seconds": out["basis"]["seconds"], "wall_seconds": wall}

    def save(self):
        runfiles.save_json(self.report, self.path)


def score(result):
    return {"accuracy": result["accuracy"], "loss": result["loss"], "correct": result["correct"]}


def main():
    args = parse_args()
    pipe = Pipeline(args)
    started = time.time()
    with common.Scripts(pipe.commands) as pipe.scripts:
        sgd = pipe.start_sgd()
        try:
            if sgd and args.twa_during_sgd and not all(pipe.twa_done(*run) for run in pipe.twa_runs()):
                pipe.wait_for_twa_checkpoints(sgd)
            elif sgd and not args.twa_during_sgd:
                pipe.scripts.wait(sgd)
            pipe.record_sgd()
            run_twa(pipe)
            if sgd:
                pipe.scripts.wait(sgd)
            if args.budget_matched:
                pipe.budget_matched()
        except KeyboardInterrupt:  # Ctrl-C reached SGD too (one process group): it saves and stops
            if sgd:
                sgd.wait()
            raise
        finally:  # ending early (a TWA run failed or was stopped): SGD saves its state and stops
            if sgd and sgd.poll() is None:
                pipe.scripts.stop(sgd)
                sgd.wait()
            pipe.record_sgd()
    pipe.report["complete"] = True
    pipe.report["wall_seconds"] = pipe.report.get("wall_seconds", 0) + time.time() - started
    pipe.save()
    print(f"wrote {pipe.path}")


def run_twa(pipe):
    """Every TWA run of the protocol, each result saved as it comes."""
    done = {h["name"] for h in pipe.report["head"]}
    for stride, epochs in pipe.twa_runs():
        result = pipe.twa(pipe.sgd_folder(), stride, epochs)
        if result["name"] not in done:
            pipe.report["head"].append(result)
            pipe.record_sgd()


if __name__ == "__main__":
    main()
