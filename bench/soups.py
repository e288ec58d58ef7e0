"""Model soups against TWA on real CIFAR-10: fine-tune copies of one trained ResNet-20, then compare
the best single model, the uniform soup, the greedy soup, TWA-t and TWA-v (journal version, soup mode).

    python bench/soups.py [--seed 1] [--data-dir DIR] [--base-epochs 10] [--finetune-epochs 2]
    python bench/soups.py --diverse --base MODEL.pt --split split.json   (see --diverse)

1. Base: train_sgd.py with --val-split 10 (10% of the training images held out, recorded in split.json).
2. Fine-tunes: train_sgd.py --init <base> with the same split, one per (lr, seed) of FINETUNES.
3. train_twa.py --checkpoints <the fine-tunes' last checkpoints>: once training the coefficients on the
   training part (TWA-t), once on the held-out part (TWA-v, --val-split 10), and once more on the
   held-out part with one coefficient per model and parameter tensor (--layer-size 0). Each run also
   reports the best single model, the uniform soup and the greedy soup (ranked on the held-out part).

--diverse instead fine-tunes an existing model (--base, trained with the held-out part of --split
left out) into DIVERSE: 2 epochs at lr 0.05-0.2, with and without label smoothing; then compares
TWA-v training the coordinates against TWA-v training alpha (--train alpha), both with AdamW.

Steps whose outputs exist are skipped. Writes results/soups-seed<k>.json and prints the table.
"""
import argparse
import json
import os
import sys
import time

import common

ROOT = common.ROOT
sys.path.insert(0, ROOT)
import runfiles  # noqa: E402

VAL_SPLIT = 10
FINETUNES = [(0.01, 1), (0.02, 2), (0.02, 3), (0.05, 4), (0.05, 5), (0.1, 6)]  # (lr, seed)
DIVERSE = [(0.05, 1, 0.0), (0.1, 2, 0.0), (0.2, 3, 0.0), (0.05, 4, 0.1), (0.1, 5, 0.1), (0.2, 6, 0.1)]
TWA = ["--opt", "AdamW", "--lr", "0.01", "--wd", "0", "--schedule", "cosine", "--warmup-epochs", "0.2"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="seed of the base model")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 ImageFolder tree (default: "
                        "extracted from ../shared/data into ~/.cache/twa-data)")
    parser.add_argument("--base-epochs", type=int, default=10, help="epochs of the base model")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="epochs of each fine-tune")
    parser.add_argument("--twa-epochs", type=int, default=2, help="epochs of TWA-t and TWA-v")
    parser.add_argument("--train-subset", type=int, default=0, help="train on this many images (0: all)")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="batch size of every run")
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "runs"), help="run folders")
    parser.add_argument("--results", default=os.path.join(ROOT, "results"), help="where the JSON goes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--diverse", action="store_true", help="the DIVERSE ingredients from --base; "
                        "TWA-v on coordinates against alpha")
    parser.add_argument("--base", default=None, help="with --diverse: the model to fine-tune")
    parser.add_argument("--split", default=None, help="with --diverse: the split.json --base used")
    args = parser.parse_args()
    if args.diverse and not (args.base and args.split):
        parser.error("--diverse needs --base and --split")
    return args


def twa_runs(args, run, run_dir, ingredients, split, variants):
    """train_twa.py in soup mode over the ingredients, once per (name, flags) variant."""
    runs = {}
    for name, flags in variants:
        folder = os.path.join(run_dir, name)
        results = os.path.join(folder, "twa_results.json")
        if not os.path.exists(results):
            run("train_twa.py", ["--checkpoints", *ingredients, "--split", split, "--save-dir", folder,
                                 "--log-dir", folder, "--epochs", args.twa_epochs,
                                 "--randomseed", args.seed, *TWA, *flags, "--resume"])
        with open(results) as f:
            runs[name] = json.load(f)
    return runs


def diverse(args, run, sgd, run_dir, commands, started):
    ingredients = [os.path.join(sgd(f"diverse-lr{lr}-ls{smooth}-seed{seed}", args.finetune_epochs,
                                    ["--lr", lr, "--schedule", "cosine", "--randomseed", seed,
                                     "--label-smoothing", smooth, "--init", args.base, "--split-seed",
                                     json.load(open(args.split))["seed"]]),
                                f"{args.finetune_epochs}.pt") for lr, seed, smooth in DIVERSE]
    runs = twa_runs(args, run, run_dir, ingredients, args.split,
                    [("twa-v-coordinates", ["--val-split", VAL_SPLIT]),
                     ("twa-v-alpha", ["--val-split", VAL_SPLIT, "--train", "alpha"])])
    soup = runs["twa-v-coordinates"]["soup"]
    rows = {"best single": soup["best_single"], "uniform soup": soup["uniform"],
            "greedy soup": soup["greedy"], "TWA-v, coordinates": runs["twa-v-coordinates"]["twa"],
            "TWA-v, alpha": runs["twa-v-alpha"]["twa"]}
    report = {"seed": args.seed, "base": args.base, "split": args.split, "ingredients_recipe": DIVERSE,
              "twa": TWA, "finetune_epochs": args.finetune_epochs, "twa_epochs": args.twa_epochs,
              "ingredients": soup["ingredients"], "methods": rows,
              "greedy_members": soup["greedy"]["members"],
              "alpha": {name: json.load(open(os.path.join(run_dir, name, "coefficients.json")))["alpha"]
                        for name in runs},
              "commands": commands, "git": runfiles.git_revision(), "wall_seconds": time.time() - started}
    print_report(report, rows, os.path.join(args.results, f"soups-diverse-seed{args.seed}.json"))


def print_report(report, rows, path):
    runfiles.save_json(report, path)
    print("| method | held-out acc | test acc |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['held_out']['accuracy']:.2f} | {row['accuracy']:.2f} |")
    print(f"wrote {path}")


def main():
    args = parse_args()
    data_dir = common.cifar10_dir(args.data_dir)
    run_dir = os.path.join(args.out, f"soups-seed{args.seed}")
    commands = []

    def run(script, flags):
        common.run_script(script, ["--datasets", "ImageFolder", "--data-dir", data_dir, "--arch",
                                   "resnet20", "--device", args.device, "--quiet", "-p", 100, "-b",
                                   args.batch_size, "--train-subset", args.train_subset, *flags],
                          commands)

    def sgd(name, epochs, flags):
        folder = os.path.join(run_dir, name)
        if not os.path.exists(os.path.join(folder, f"{epochs}.pt")):
            resume = ["--resume"] if os.path.exists(os.path.join(folder, "state.pt")) else []
            run("train_sgd.py", ["--epochs", epochs, "--save-dir", folder, "--wd", 5e-4,
                                 "--val-split", VAL_SPLIT, *flags, *resume])
        return folder

    started = time.time()
    if args.diverse:
        return diverse(args, run, sgd, run_dir, commands, started)
    base = sgd("base", args.base_epochs, ["--lr", 0.1, "--schedule", "cosine", "--randomseed", args.seed])
    finetunes = [os.path.join(sgd(f"finetune-lr{lr}-seed{seed}", args.finetune_epochs,
                                  ["--lr", lr, "--schedule", "cosine", "--randomseed", seed,
                                   "--init", os.path.join(base, f"{args.base_epochs}.pt")]),
                              f"{args.finetune_epochs}.pt") for lr, seed in FINETUNES]
    runs = twa_runs(args, run, run_dir, finetunes, os.path.join(base, "split.json"),
                    [("twa-t", []), ("twa-v", ["--val-split", VAL_SPLIT]),
                     ("twa-v-layerwise", ["--val-split", VAL_SPLIT, "--layer-size", 0])])
    soup = runs["twa-v"]["soup"]
    rows = {"best single": soup["best_single"], "uniform soup": soup["uniform"],
            "greedy soup": soup["greedy"], "TWA-t": runs["twa-t"]["twa"], "TWA-v": runs["twa-v"]["twa"],
            "TWA-v, layer-wise": runs["twa-v-layerwise"]["twa"]}
    report = {"seed": args.seed, "val_split": VAL_SPLIT, "finetunes": FINETUNES, "twa": TWA,
              "base_epochs": args.base_epochs, "finetune_epochs": args.finetune_epochs,
              "twa_epochs": args.twa_epochs, "ingredients": soup["ingredients"], "methods": rows,
              "greedy_members": soup["greedy"]["members"],
              "alpha": {name: json.load(open(os.path.join(run_dir, name, "coefficients.json")))["alpha"]
                        for name in ("twa-t", "twa-v")},
              "base_test_acc": runfiles.read_jsonl(os.path.join(base, "metrics.jsonl"))[-1]["test_acc"],
              "commands": commands, "git": runfiles.git_revision(), "wall_seconds": time.time() - started}
    print_report(report, rows, os.path.join(args.results, f"soups-seed{args.seed}.json"))


if __name__ == "__main__":
    main()
