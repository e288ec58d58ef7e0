"""Tables and figures from the reproduction's results/<name>-seed<k>.json files.

    python bench/report.py [--name reproduce] [--results results]

Prints a Markdown table (mean +- std over the seeds present) and writes results/<name>-accuracy.png
(test accuracy vs epochs spent: SGD's curve with the SWA and TWA points) and
results/<name>-coefficients.png (the learned coefficients of the first seed's runs).
"""
import argparse
import glob
import json
import os
import statistics

import common

from plot import plot_coefficients, save_figure  # noqa: E402  (common puts the project on the path)
from matplotlib.figure import Figure


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def matching(runs, stage, name):
    """The entries called `name` in each run's `stage` list (a stopped run may lack later ones)."""
    return [(r, h) for r in runs for h in r[stage] if h["name"] == name]


def head_rows(runs):
    e = runs[0]["epochs"]
    sgd = [r["sgd"]["test_acc"] for r in runs]
    rows = [["SGD", e // 2, mean_std([s[e // 2 - 1] for s in sgd]), "", "", ""],
            ["SGD", e, mean_std([s[e - 1] for s in sgd]), "", "", ""]]
    seen = set()
    for head in runs[0]["head"]:
        pairs = matching(runs, "head", head["name"])
        start = head.get("sgd_epochs", e // 2)
        spent = start + head["twa_epochs"]
        at = min(spent, e) - 1
        if head["checkpoints"] not in seen:  # SWA depends on the checkpoints only
            seen.add(head["checkpoints"])
            rows.append([f"SWA, {head['n']} ckpts ({head['checkpoints']})", start,
                         mean_std([h["swa_acc"] for _, h in pairs]), "", "", ""])
        rows.append([f"TWA, {head['n']} ckpts, {head['twa_epochs']} ep, lr {head['lr']}", spent,
                     mean_std([h["twa_acc"] for _, h in pairs]),
                     mean_std([r["sgd"]["test_acc"][at] for r, _ in pairs]),
                     mean_std([h["twa_acc"] - r["sgd"]["test_acc"][at] for r, h in pairs]),
                     mean_std([h["twa_acc"] - r["sgd"]["test_acc"][e - 1] for r, h in pairs])])
    return rows


def tail_rows(runs):
    rows = []
    for tail in runs[0]["tail"]:
        pairs = matching(runs, "tail", tail["name"])
        rows.append([tail["tail_lr"], tail["tail_epochs"],
                     mean_std([t["sgd"]["test_acc"][-1] for _, t in pairs]),
                     mean_std([t["swa_acc"] for _, t in pairs]),
                     mean_std([t["twa_acc"] for _, t in pairs]),
                     mean_std([t["twa_acc"] - t["swa_acc"] for _, t in pairs])])
    return rows


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_figure(runs, path):
    e = runs[0]["epochs"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    curves = [r["sgd"]["test_acc"] for r in runs]
    mean = [statistics.mean(c[i] for c in curves) for i in range(e)]
    ax.plot(range(1, e + 1), mean, color="C0", marker=".", label="SGD")
    for i, head in enumerate(runs[0]["head"]):
        pairs = matching(runs, "head", head["name"])
        start = head.get("sgd_epochs", e // 2)
        ax.scatter([start + head["twa_epochs"]], [statistics.mean(h["twa_acc"] for _, h in pairs)],
                   marker="*", s=120, color=f"C{1 + i}", zorder=3,
                   label=f"TWA {head['n']} ckpts of epochs 0..{start}, {head['twa_epochs']} ep")
        ax.scatter([start], [statistics.mean(h["swa_acc"] for _, h in pairs)], marker="x",
                   color=f"C{1 + i}", zorder=3)
    ax.set_xlabel("epochs spent")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"CIFAR-10 {runs[0]['arch']}, {len(runs)} seed(s); x: SWA of the same checkpoints")
    ax.set_ylim(max(0, min(mean[e // 2 - 1:]) - 10), max(mean) + 2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="reproduce", help="results/<name>-seed*.json")
    parser.add_argument("--results", default=os.path.join(common.ROOT, "results"), help="folder")
    args = parser.parse_args()
    files = sorted(glob.glob(os.path.join(args.results, f"{args.name}-seed*.json")))
    if not files:
        raise SystemExit(f"no {args.name}-seed*.json in {args.results}")
    runs = [json.load(open(f)) for f in files]
    seeds = ", ".join(str(r["seed"]) + ("" if r.get("complete", True) else " (stopped early)")
                      for r in runs)
    print(f"{args.name}: seeds {seeds}; {runs[0]['epochs']} SGD epochs, test accuracy (%)\n")
    print(markdown(["method", "epochs spent", "test acc", "SGD at the same epochs",
                    "TWA - SGD (paired)", "TWA - SGD(E) (paired)"], head_rows(runs)))
    print()
    print(markdown(["tail lr", "tail epochs", "SGD tail end", "SWA", "TWA", "TWA - SWA"], tail_rows(runs)))
    accuracy_figure(runs, os.path.join(args.results, f"{args.name}-accuracy.png"))
    first = runs[0]["head"][1]
    names = [str(i) for i in range(len(first["alpha"]))]
    plot_coefficients(names, first["alpha"], os.path.join(args.results, f"{args.name}-coefficients.png"),
                      uniform=1 / len(names))


if __name__ == "__main__":
    main()
