"""Reproduce the paper's two claims on real CIFAR-10 at CPU scale, one seed per call.

    python bench/reproduce.py --seed 1 [--epochs 30] [--data-dir DIR] [--quick]

1. SGD: ResNet-20, lr 0.1, momentum 0.9, wd 5e-4, batch 128, E epochs, step schedule (/10 at 50% and
   75%), 4 checkpoints per epoch (every 4th is the usual one-per-epoch checkpoint).
2. Head stage: TWA over the checkpoints of epochs 0..E/2, all of them for 1, 2 and 3 TWA epochs, and
   one per epoch for 2 TWA epochs; each run also evaluates SWA over the same checkpoints. With
   --head-ends, also 2 TWA epochs over all checkpoints of epochs 0..k for each k given.
3. Tail stage: the run branched at epoch E/2 into constant-lr SGD (0.05 and 0.10) for E/4 epochs, one
   checkpoint per epoch; SWA and TWA over those tail checkpoints.

The scripts run as a user runs them, in <out>/seed<k>/. A step whose outputs exist is skipped, and an
interrupted SGD run is resumed, so a killed job continues where it stopped. Every number, the
commands and the git revision go to results/reproduce[-quick]-seed<k>.json, rewritten after every step
("complete" turns true at the end).
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

CHECKPOINTS_PER_EPOCH = 4
TAIL_LRS = (0.05, 0.10)
HEAD_TWA = {"lr": 2.0, "wd": 1e-5, "schedule": "step"}
TAIL_TWA = {"lr": 2.0, "wd": 5e-5, "schedule": "step", "epochs": 2}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="seed of the whole pipeline")
    parser.add_argument("--epochs", type=int, default=None, help="SGD epochs E (default 30; quick 8)")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="training images (default: all; quick 10000)")
    parser.add_argument("--quick", action="store_true",
                        help="a 10k-image training subset and E = 8: minutes, for a first look")
    parser.add_argument("--arch", default="resnet20", help="model")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="batch size of every run")
    common.add_experiment_args(parser)
    parser.add_argument("--head-ends", type=int, nargs="*", default=[], metavar="EPOCH",
                        help="also TWA (2 epochs) over the checkpoints of epochs 0..EPOCH, for each")
    parser.add_argument("--bits-check", "--pbits-check", dest="bits_check", action="store_true",
                        help="also run the 2-epoch dense head TWA with 8- and 4-bit bases")
    args = parser.parse_args()
    args.epochs = args.epochs or (8 if args.quick else 30)
    args.train_subset = args.train_subset if args.train_subset is not None else (
        10000 if args.quick else 0)
    if args.epochs < 4 or args.epochs % 2:
        parser.error("--epochs must be even and at least 4")
    if any(not 0 < end <= args.epochs for end in args.head_ends):
        parser.error(f"--head-ends must lie in 1..{args.epochs}")
    args.name = "reproduce-quick" if args.quick else "reproduce"
    return args


class Pipeline(common.Experiment):
    def __init__(self, args):
        super().__init__(args, f"{args.name}-seed{args.seed}")
        self.commands = []
        self.git = common.clean_revision(args.allow_dirty)  # of the code that runs

    def common_flags(self):
        flags = ["--datasets", "ImageFolder", "--data-dir", self.data_dir, "--arch", self.args.arch,
                 "--randomseed", str(self.args.seed), "--device", self.args.device, "--quiet",
                 "-p", "100", "-b", str(self.args.batch_size)]
        return flags + ["--train-subset", str(self.args.train_subset)]

    def run(self, script, flags):
        common.run_script(script, flags, self.commands)

    def sgd(self, name, epochs, extra):
        """A train_sgd.py run in <run_dir>/<name>, resumed if it was interrupted."""
        folder = os.path.join(self.run_dir, name)
        state = os.path.join(folder, "state.pt")
        if os.path.exists(state) and runfiles.load_torch(state)["progress"]["epoch"] >= epochs:
            return folder
        resume = ["--resume"] if os.path.exists(state) else []
        if not resume and os.path.exists(os.path.join(folder, "0.pt")):
            os.remove(os.path.join(folder, "0.pt"))  # killed before its first state: start again
        self.run("train_sgd.py", self.common_flags() + ["--epochs", epochs, "--save-dir", folder,
                                                         *extra, *resume])
        return folder

    def twa(self, name, checkpoints, start, end, stride, epochs, hyper, train_start=-1, bits=32):
        """A train_twa.py run in <run_dir>/<name>; returns its results and coefficients."""
        folder = os.path.join(self.run_dir, name)
        results = os.path.join(folder, "twa_results.json")
        if not os.path.exists(results):
            self.run("train_twa.py", self.common_flags() + [
                "--save-dir", checkpoints, "--output-dir", folder, "--log-dir", folder,
                "--params_start", start, "--params_end", end, "--params_stride", stride,
                "--train_start", train_start, "--epochs", epochs, "--lr", hyper["lr"],
                "--wd", hyper["wd"], "--schedule", hyper["schedule"], "--bits", bits,
                "--resume"])  # a killed run's state continues
        out = json.load(open(results))
        alpha = json.load(open(os.path.join(folder, "coefficients.json")))
        curve = [r["test_acc"] for r in runfiles.read_jsonl(os.path.join(folder, "metrics.jsonl"))
                 if r.get("stage") == "twa"]
        return {"name": name, "checkpoints": f"{start}..{end - 1} step {stride}", "bits": bits,
                "n": len(alpha["alpha"]), "twa_epochs": epochs, "lr": hyper["lr"], "wd": hyper["wd"],
                "swa_acc": out["swa"]["accuracy"], "twa_acc": out["twa"]["accuracy"],
                "swa_loss": out["swa"]["loss"], "twa_loss": out["twa"]["loss"],
                "twa_curve_before_bn": curve, "alpha": alpha["alpha"],
                "rank": out["basis"]["rank"], "orthogonality_error": out["basis"]["orthogonality_error"],
                "seconds": out["train_seconds"]}


def main():
    args = parse_args()
    pipe = Pipeline(args)
    e, per = args.epochs, CHECKPOINTS_PER_EPOCH
    half = e // 2 * per  # checkpoint index at epoch E/2
    started = time.time()
    path = os.path.join(args.results, f"{args.name}-seed{args.seed}.json")
    report = {"name": args.name, "seed": args.seed, "epochs": e, "arch": args.arch,
              "checkpoints_per_epoch": per, "quick": args.quick, "head_twa": HEAD_TWA,
              "tail_twa": TAIL_TWA, "git": pipe.git, "data_dir": pipe.data_dir,
              "device": f"{args.device} (torch {torch.__version__}"
                        f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''})",
              "head": [], "precision": [], "tail": [], "complete": False}
    if os.path.exists(path):  # a resumed pipeline keeps the commands of the steps it skips
        pipe.commands = json.load(open(path)).get("commands", [])

    def save():  # after every step, so a job stopped half-way still leaves what it measured
        report.update(commands=pipe.commands, wall_seconds=time.time() - started)
        runfiles.save_json(report, path)

    sgd = pipe.sgd("sgd", e, ["--lr", 0.1, "--wd", 5e-4, "--schedule", "step", "--save-every", per])
    report["sgd"] = common.sgd_record(sgd)
    save()
    for twa_epochs in (1, 2, 3):
        report["head"].append({"sgd_epochs": e // 2, **pipe.twa(
            f"head-dense-{twa_epochs}", sgd, 0, half + 1, 1, twa_epochs, HEAD_TWA)})
        save()
    report["head"].append({"sgd_epochs": e // 2, **pipe.twa(
        "head-epochs-2", sgd, 0, half + 1, per, 2, HEAD_TWA)})
    save()
    for lr in TAIL_LRS:
        branch = pipe.sgd(f"tail-lr{lr}", e // 4, ["--lr", lr, "--wd", 5e-4, "--schedule", "constant",
                                                   "--init", os.path.join(sgd, f"{half}.pt")])
        result = pipe.twa(f"tail-lr{lr}-twa", branch, 1, e // 4 + 1, 1, TAIL_TWA["epochs"], TAIL_TWA,
                          train_start=e // 4)
        report["tail"].append({"tail_lr": lr, "tail_epochs": e // 4, "sgd": common.sgd_record(branch), **result})
        save()
    for end in args.head_ends:  # later heads: how many epochs TWA must see to match SGD(E)
        report["head"].append({"sgd_epochs": end, **pipe.twa(
            f"head-dense-to{end}-2", sgd, 0, end * per + 1, 1, 2, HEAD_TWA)})
        save()
    for bits in (8, 4) if args.bits_check else ():
        report["precision"].append(pipe.twa(f"head-dense-2-bits{bits}", sgd, 0, half + 1, 1, 2,
                                            HEAD_TWA, bits=bits))
        save()
    report["complete"] = True
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
