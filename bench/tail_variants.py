"""Tail-stage variants on real CIFAR-10: where TWA starts and its learning rate, against SWA of the
same tail checkpoints.

    python bench/tail_variants.py --init results/runs/soups-seed1/base/10.pt [--tail-epochs 5]

Branches a trained ResNet-20 into constant-lr SGD (--tail-lr, one checkpoint per epoch), then runs
train_twa.py over the tail checkpoints for each variant in VARIANTS (2 epochs each). Steps whose
outputs exist are skipped. Writes results/tail-variants-seed<k>.json.
"""
import argparse
import json
import os
import sys

import common

ROOT = common.ROOT
sys.path.insert(0, ROOT)
import runfiles  # noqa: E402

# (name, train_start: "last" tail checkpoint or "mean", lr): bench/reproduce.py uses ("last", 2.0)
VARIANTS = [("last-lr2", "last", 2.0), ("mean-lr2", "mean", 2.0), ("mean-lr0.5", "mean", 0.5)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="the trained model the tail starts from")
    parser.add_argument("--seed", type=int, default=1, help="seed of the tail and of TWA")
    parser.add_argument("--tail-lr", type=float, default=0.1, help="constant lr of the tail")
    parser.add_argument("--tail-epochs", type=int, default=5, help="epochs (= checkpoints) of the tail")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 ImageFolder tree (default: "
                        "extracted from ../shared/data into ~/.cache/twa-data)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "runs"), help="run folders")
    parser.add_argument("--results", default=os.path.join(ROOT, "results"), help="where the JSON goes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args()


def main():
    args = parse_args()
    data_dir = common.cifar10_dir(args.data_dir)
    run_dir = os.path.join(args.out, f"tail-variants-seed{args.seed}")
    tail = os.path.join(run_dir, "tail")
    commands = []

    def run(script, flags):
        common.run_script(script, ["--datasets", "ImageFolder", "--data-dir", data_dir, "--arch",
                                   "resnet20", "--device", args.device, "--quiet", "-p", 100,
                                   "--randomseed", args.seed, *flags], commands)

    e = args.tail_epochs
    if not os.path.exists(os.path.join(tail, f"{e}.pt")):
        resume = ["--resume"] if os.path.exists(os.path.join(tail, "state.pt")) else []
        run("train_sgd.py", ["--epochs", e, "--lr", args.tail_lr, "--wd", 5e-4, "--schedule",
                             "constant", "--init", args.init, "--save-dir", tail, *resume])
    rows = []
    for name, start, lr in VARIANTS:
        folder = os.path.join(run_dir, name)
        results = os.path.join(folder, "twa_results.json")
        if not os.path.exists(results):
            run("train_twa.py", ["--save-dir", tail, "--output-dir", folder, "--log-dir", folder,
                                 "--params_start", 1, "--params_end", e + 1,
                                 "--train_start", e if start == "last" else -1, "--epochs", 2,
                                 "--lr", lr, "--wd", 5e-5, "--schedule", "step", "--resume"])
        out = json.load(open(results))
        rows.append({"name": name, "start": start, "lr": lr, "swa_acc": out["swa"]["accuracy"],
                     "twa_acc": out["twa"]["accuracy"]})
    sgd = [r["test_acc"] for r in runfiles.read_jsonl(os.path.join(tail, "metrics.jsonl"))]
    report = {"seed": args.seed, "init": args.init, "tail_lr": args.tail_lr, "tail_epochs": e,
              "tail_sgd_test_acc": sgd, "variants": rows, "commands": commands,
              "git": runfiles.git_revision()}
    path = os.path.join(args.results, f"tail-variants-seed{args.seed}.json")
    runfiles.save_json(report, path)
    print(f"SGD tail end {sgd[-1]:.2f}, SWA {rows[0]['swa_acc']:.2f}")
    for row in rows:
        print(f"TWA from {row['start']}, lr {row['lr']}: {row['twa_acc']:.2f} "
              f"(TWA - SWA {row['twa_acc'] - row['swa_acc']:+.2f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
