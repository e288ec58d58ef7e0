"""The paper's tail stage with the reference's structure, at CPU scale, one seed per call.

    python bench/tail_swa.py --seed 1 [--swa-lrs 0.1 0.05] [--epochs 30 --swa-start 16]
                             [--variants orth-lr2-e2 ...] [--tag NAME]

1. SGD: ResNet-20 on CIFAR-10 with 10% of the training images held out (for TWA-v), lr 0.1,
   wd 5e-4, the SWA schedule (--schedule swa: lr 0.1 for the first half of swa_start, linear decay to
   swa_lr by 90% of it, then swa_lr), 2 checkpoints per epoch.
2. SWA and TWA over the tail checkpoints (epochs swa_start..E, about 29), TWA from the LAST one as the
   reference's swa/run_twa.sh does (lr 2, wd 5e-5, step schedule), in the variants of VARIANTS: 2 and
   4 epochs, over all tail checkpoints and over the reference's one per epoch (each epoch's end),
   the reference's one-pass basis against ours at lr 2 and 0.5, PCA with 5 components,
   TWA-v (coefficients trained on the held-out part) with SGD and with AdamW on coordinates or alpha.
3. For the first swa_lr, HEAD: the same basis ablation on the checkpoints of epochs 0..swa_start-1.
4. With --low-lr-tail: the first run's last checkpoint continued at lr 0.001 for 2 epochs, 4
   checkpoints per epoch (nearly parallel, as after a step schedule's last decay): SWA, and TWA from
   the last checkpoint with each basis (LOW_LR_TAIL). There the one-pass basis is far from
   orthonormal, unlike in the SWA-schedule tails above.

The scripts run as a user runs them, in <out>/tail-swa-seed<k>/. A step whose outputs exist is skipped
and an interrupted SGD run is resumed. Every number (with which test images each model got right, for
bench/report.py's paired intervals), the commands and the revision go to
results/tail-swa-seed<k>.json, rewritten after every step. A tree with uncommitted changes is
refused unless --allow-dirty.
"""
import argparse
import json
import os
import sys

import common

ROOT = common.ROOT
sys.path.insert(0, ROOT)
import runfiles  # noqa: E402

PER_EPOCH = 2
TAIL = {"wd": 5e-5, "schedule": "step"}
# name: (train_twa flags, which swa_lrs: "all" or "first"); lr and epochs are given per variant
VARIANTS = {
    "orth-lr2-e2": (["--lr", 2, "--epochs", 2], "all"),
    "ref-lr2-e2": (["--lr", 2, "--epochs", 2, "--basis", "reference"], "all"),
    "orth-lr2-e4": (["--lr", 2, "--epochs", 4], "all"),
    # the reference's density: one checkpoint at each epoch's end (every other one of ours)
    "orth-lr2-e2-1pe": (["--lr", 2, "--epochs", 2, "--params_stride", PER_EPOCH], "all"),
    "orth-lr2-e4-1pe": (["--lr", 2, "--epochs", 4, "--params_stride", PER_EPOCH], "all"),
    "v-orth-lr2-e2": (["--lr", 2, "--epochs", 2, "--val-split", 10], "all"),
    "ref-lr0.5-e2": (["--lr", 0.5, "--epochs", 2, "--basis", "reference"], "first"),
    "orth-lr0.5-e2": (["--lr", 0.5, "--epochs", 2], "first"),
    "pca5-lr2-e2": (["--lr", 2, "--epochs", 2, "--extract", "PCA", "--n_components", 5], "first"),
    "v-adamw-coordinates": (["--opt", "AdamW", "--lr", 0.01, "--wd", 0, "--schedule", "cosine",
                             "--epochs", 2, "--val-split", 10], "first"),
    "v-adamw-alpha": (["--opt", "AdamW", "--lr", 0.01, "--wd", 0, "--schedule", "cosine",
                       "--epochs", 2, "--val-split", 10, "--coefficients", "alpha"], "first"),
}
LOW_LR_TAIL = {
    "low-lr-orth-lr2-e2": ["--lr", 2, "--epochs", 2],
    "low-lr-ref-lr2-e2": ["--lr", 2, "--epochs", 2, "--basis", "reference"],
}
HEAD = {
    "head-orth-lr2-e2": ["--lr", 2, "--epochs", 2, "--wd", 1e-5, "--train_start", -1],
    "head-ref-lr2-e2": ["--lr", 2, "--epochs", 2, "--wd", 1e-5, "--train_start", -1,
                        "--basis", "reference"],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="seed of the whole pipeline")
    parser.add_argument("--epochs", type=int, default=30, help="SGD epochs E")
    parser.add_argument("--swa-start", type=int, default=16, help="first epoch of the tail")
    parser.add_argument("--swa-lrs", type=float, nargs="+", default=[0.1, 0.05],
                        help="tail learning rates, one SGD run each (the first gets every variant)")
    common.add_experiment_args(parser)
    parser.add_argument("--low-lr-tail", action="store_true", help="also step 4")
    parser.add_argument("--skip-variants", action="store_true",
                        help="only the SGD runs and step 4 (the variants' results are read if present)")
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, *HEAD], default=[*VARIANTS, *HEAD],
                        metavar="NAME", help="the TWA variants to run, in this order (default: all of "
                        f"{', '.join([*VARIANTS, *HEAD])})")
    parser.add_argument("--tag", default="", help="suffix of the results name, for a run that must not "
                        "share a seed's file: --tag swalr0.05 writes tail-swa-seed<k>-swalr0.05.json")
    args = parser.parse_args()
    if not 0 < args.swa_start < args.epochs:
        parser.error("--swa-start must lie in (0, --epochs)")
    return args


class Pipeline(common.Experiment):
    def __init__(self, args):
        tag = f"-{args.tag}" if args.tag else ""
        super().__init__(args, f"tail-swa-seed{args.seed}{tag}", {
            "seed": args.seed, "epochs": args.epochs, "swa_start": args.swa_start,
            "checkpoints_per_epoch": PER_EPOCH, "runs": {}, "complete": False})

    def run(self, script, flags):
        common.run_script(script, ["--datasets", "ImageFolder", "--data-dir", self.data_dir, "--arch",
                                   "resnet20", "--device", self.args.device, "--quiet", "-p", 100,
                                   "--randomseed", self.args.seed, *flags], self.commands)

    def sgd(self, swa_lr):
        folder = os.path.join(self.run_dir, f"sgd-swalr{swa_lr:g}")
        if not os.path.exists(os.path.join(folder, f"{PER_EPOCH * self.args.epochs}.pt")):
            resume = ["--resume"] if os.path.exists(os.path.join(folder, "state.pt")) else []
            self.run("train_sgd.py", ["--epochs", self.args.epochs, "--lr", 0.1, "--wd", 5e-4,
                                      "--schedule", "swa", "--swa-start", self.args.swa_start,
                                      "--swa-lr", swa_lr, "--save-every", PER_EPOCH, "--val-split", 10,
                                      "--save-dir", folder, "--log-dir", folder, *resume])
        rows = [r for r in runfiles.read_jsonl(os.path.join(folder, "metrics.jsonl")) if r["stage"] == "sgd"]
        return folder, [r["test_acc"] for r in rows], rows[-1].get("test_correct")

    def low_lr_tail(self, start):
        """The run continued from `start` at lr 0.001, 4 checkpoints per epoch for 2 epochs."""
        folder = os.path.join(self.run_dir, "low-lr-tail")
        if not os.path.exists(os.path.join(folder, "8.pt")):
            resume = ["--resume"] if os.path.exists(os.path.join(folder, "state.pt")) else []
            self.run("train_sgd.py", ["--epochs", 2, "--lr", 0.001, "--wd", 5e-4, "--schedule",
                                      "constant", "--save-every", 4, "--val-split", 10, "--init", start,
                                      "--save-dir", folder, "--log-dir", folder, *resume])
        return folder

    def twa(self, checkpoints, name, first, end, flags, skip=False):
        folder = os.path.join(self.run_dir, name)
        results = os.path.join(folder, "twa_results.json")
        if skip and not os.path.exists(results):
            return None
        if not os.path.exists(results):
            self.run("train_twa.py", ["--save-dir", checkpoints, "--output-dir", folder, "--log-dir",
                                      folder, "--params_start", first, "--params_end", end, *flags,
                                      "--resume"])  # a killed run's state continues
        with open(results) as f:
            out = json.load(f)
        return {"swa_acc": out["swa"]["accuracy"], "twa_acc": out["twa"]["accuracy"],
                "swa_correct": out["swa"].get("correct"), "twa_correct": out["twa"].get("correct"),
                "held_out_acc": out["twa"].get("held_out", {}).get("accuracy"),
                "swa_held_out_acc": out["swa"].get("held_out", {}).get("accuracy"),
                "gram_eigenvalues": out["basis"]["gram_eigenvalues"],
                "orthogonality_error": out["basis"]["orthogonality_error"],
                "rank": out["basis"]["rank"], "flags": list(map(str, flags))}

    def save(self):
        runfiles.save_json(self.report, self.path)


def main():
    args = parse_args()
    pipe = Pipeline(args)
    first, end = PER_EPOCH * args.swa_start, PER_EPOCH * args.epochs + 1
    head_end = PER_EPOCH * (args.swa_start - 1) + 1  # the checkpoints of epochs 0..swa_start-1
    for number, swa_lr in enumerate(args.swa_lrs):
        checkpoints, sgd, sgd_correct = pipe.sgd(swa_lr)
        run = pipe.report["runs"].setdefault(f"swalr{swa_lr:g}", {"swa_lr": swa_lr, "sgd_test_acc": sgd,
                                                                  "tail": {}, "head": {}})
        run["sgd_correct"] = sgd_correct
        for name in args.variants:
            if name in HEAD and number == 0:
                run["head"][name] = pipe.twa(checkpoints, f"swalr{swa_lr:g}-{name}", 0, head_end,
                                             ["--schedule", "step", *HEAD[name]], skip=args.skip_variants)
            elif name in VARIANTS and (VARIANTS[name][1] == "all" or number == 0):
                variant = [*tail_flags(VARIANTS[name][0]), "--train_start", end - 1]
                run["tail"][name] = pipe.twa(checkpoints, f"swalr{swa_lr:g}-{name}", first, end,
                                             variant, skip=args.skip_variants)
            pipe.save()
        if number == 0 and args.low_lr_tail:
            low = pipe.low_lr_tail(os.path.join(checkpoints, f"{end - 1}.pt"))
            run["low_lr_tail"] = {"sgd_test_acc": [r["test_acc"] for r in runfiles.read_jsonl(
                os.path.join(low, "metrics.jsonl"))]}
            for name, flags in LOW_LR_TAIL.items():
                run["low_lr_tail"][name] = pipe.twa(low, f"swalr{swa_lr:g}-{name}", 0, 9,
                                                    [*tail_flags(flags), "--train_start", 8])
                pipe.save()
    pipe.report["complete"] = set(args.variants) == {*VARIANTS, *HEAD}  # False: a chosen subset
    pipe.save()
    print(f"wrote {pipe.path}")


def tail_flags(flags):
    """The reference's tail flags, overridden by a variant's own (argparse keeps the last value)."""
    return ["--wd", TAIL["wd"], "--schedule", TAIL["schedule"], *flags]


if __name__ == "__main__":
    main()
