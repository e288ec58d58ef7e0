"""Tables and figures from the reproduction's results/<name>-seed<k>.json files.

    python bench/report.py [--name reproduce] [--results results]

Prints Markdown tables. For bench/reproduce.py's runs: mean +- std over the seeds present, and
results/<name>-accuracy.png (test accuracy vs epochs spent: SGD's curve with the SWA and TWA points)
and results/<name>-coefficients.png (the learned coefficients of the first seed's runs). For
bench/head.py's runs (--name head-paper): paired differences within each seed and over the seeds,
each with the interval and the verdict of the rule below; with --against NAME, two such protocols on
the same seeds and E (e.g. another SGD weight decay): each model against its namesake, and the change
of its gap to SGD(E); with several names (--name head-paper-4ep:1,3 head-paper:2), the seeds of one
protocol pooled into one table. A run made with --budget-matched (the paper's budget: --name
head-e200) also has each TWA against SGD trained for TWA's epochs on its own schedule, e.g.
TWA(100+10) against SGD(110). For bench/tail_swa.py's runs (--name
tail-swa): TWA against SWA of the same checkpoints, and the TWA variants that differ in one choice
(checkpoint density, TWA epochs, TWA-v) against each other. For bench/soups.py's (--name
soups-diverse): each soup's held-out and test accuracy.

Every file is held to its shape when read (schema.py), and every table to one protocol and one run
per seed, whatever pooled its files; either failure is one line naming the file(s).

The rule every verdict follows is bench/rule.py's (its docstring states it).
"""
import argparse
import os
import statistics

import common
from common import markdown, mean_std
from head_report import head_report, protocol_report
from results_files import table_runs
from rule import MARGIN, gap_change, minus, one_test_set, over_seed_cells, seed_cells

import schedules  # noqa: E402
from packed_bits import unpack_bits  # noqa: E402
from plot import plot_coefficients, save_figure  # noqa: E402  (common puts the project on the path)
from matplotlib.figure import Figure


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
        rows.append([f"TWA, {head['n']} ckpts, {head['twa_epochs']} ep, lr {rates_run(runs[0], head)}", spent,
                     mean_std([h["twa_acc"] for _, h in pairs]),
                     mean_std([r["sgd"]["test_acc"][at] for r, _ in pairs]),
                     mean_std([h["twa_acc"] - r["sgd"]["test_acc"][at] for r, h in pairs]),
                     mean_std([h["twa_acc"] - r["sgd"]["test_acc"][e - 1] for r, h in pairs])])
    return rows


def rates_run(run, head):
    """The learning rates a reproduce.py TWA run trained at, per epoch in order: the epoch-wise step
    schedule of 1 epoch runs at lr/10 throughout, of 2 epochs never reaches lr/100."""
    schedule, epochs = run["head_twa"]["schedule"], head["twa_epochs"]
    rates = [schedules.lr_at(schedule, head["lr"], epoch, epochs, epoch / epochs) for epoch in range(epochs)]
    return ", ".join(f"{rate:g}" for rate in dict.fromkeys(round(r, 12) for r in rates))


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


# ---------------------------------------------------------------------------------------------------
# bench/tail_swa.py's runs: TWA against SWA of the same tail checkpoints
# ---------------------------------------------------------------------------------------------------

# tail variants whose TWA models a reader compares with each other, not only with SWA: (a, b, what a
# has that b has not)
TAIL_CONTRASTS = (("orth-lr2-e2", "orth-lr2-e2-1pe", "every tail checkpoint (2 per epoch), not the "
                   "reference's 1 per epoch"),
                  ("orth-lr2-e4", "orth-lr2-e2", "4 TWA epochs, not 2"),
                  ("orth-lr2-e2", "v-orth-lr2-e2", "coefficients trained on the training images, not "
                   "the held-out ones (TWA-v)"))


def tail_contrasts(runs, n_test):
    """For TAIL_CONTRASTS, TWA(a) - TWA(b) and the change of their gaps to SWA, (TWA(a) - SWA(a)) -
    (TWA(b) - SWA(b)), on each seed that ran both with per-image results and over those seeds, by
    the rule."""
    summary, per_seed = [], []
    for key in sorted({key for r in runs for key in r["runs"]}):
        present = [r for r in runs if key in r["runs"]]
        for a, b, what in TAIL_CONTRASTS:
            differences, gaps = [], []
            for run in present:
                variants = [run["runs"][key]["tail"].get(name) or {} for name in (a, b)]
                packed = [v.get(k) for v in variants for k in ("twa_correct", "swa_correct")]
                if all(packed):
                    quad = [unpack_bits(x, n_test) for x in packed]
                    differences.append((run["seed"], minus(quad[0], quad[2])))
                    gaps.append((run["seed"], gap_change(*quad)))
                    per_seed.append([run["seed"], key, f"{a} - {b}", *seed_cells(differences[-1][1]),
                                     *seed_cells(gaps[-1][1])])
            if len(differences) > 1:
                shared = one_test_set([r for r in present if r["seed"] in dict(differences)])
                summary.append([key, f"{a} - {b}: {what}",
                                ", ".join(str(seed) for seed, _ in differences),
                                *over_seed_cells(differences, shared), *over_seed_cells(gaps, shared)])
    if per_seed:
        print("\nOne TWA variant against another (points; TWA(a) - TWA(b), and the change of the gap to "
              "SWA, (TWA(a) - SWA(a)) - (TWA(b) - SWA(b))), over the seeds that ran both with per-image "
              "results:\n")
        print(markdown(["run", "contrast", "seeds", "TWA(a) - TWA(b) [95% interval, seeds and images]",
                        "verdict", "(t over seeds alone)", "change of the gap to SWA", "verdict",
                        "(t over seeds alone)"], summary))
        print("\nWithin each seed (one seed each: the image term over the test images):\n")
        print(markdown(["seed", "run", "contrast", "TWA(a) - TWA(b)", "verdict",
                        "change of the gap to SWA", "verdict"], per_seed))


def tail_report(runs, n_test, title):
    """TWA - SWA for every variant, within each seed and over the seeds, by the rule; a seed whose
    run kept accuracies only gives its plain difference."""
    summary, per_seed = [], []
    for key in sorted({key for r in runs for key in r["runs"]}):  # one SGD run per swa_lr
        present = [r for r in runs if key in r["runs"]]
        names = dict.fromkeys(name for r in present for name, v in r["runs"][key]["tail"].items() if v)
        for name in names:
            scored, unscored, accuracies = [], [], []
            for run in present:
                v = run["runs"][key]["tail"].get(name)
                if not v:
                    continue
                scores = None
                if v.get("twa_correct") and v.get("swa_correct"):
                    scores = minus(unpack_bits(v["twa_correct"], n_test),
                                   unpack_bits(v["swa_correct"], n_test))
                    scored.append((run["seed"], scores))
                else:  # an earlier runner kept accuracies only
                    unscored.append((run["seed"], v["twa_acc"] - v["swa_acc"]))
                difference = seed_cells(scores)
                if scores is None:
                    difference[0] = f"{v['twa_acc'] - v['swa_acc']:+.2f} {difference[0]}"
                per_seed.append([run["seed"], key, name, f"{v['swa_acc']:.2f}", f"{v['twa_acc']:.2f}",
                                 *difference,
                                 *(f"{v[k]:.2f}" if k in v else "" for k in ("swa_held_out_acc",
                                                                           "held_out_acc"))])
                accuracies.append(v["twa_acc"])
            shared = one_test_set([r for r in present if r["seed"] in dict(scored)])
            summary.append([key, name, len(accuracies), mean_std(accuracies),
                            *over_seed_cells(scored, shared, unscored)])
    print(f"{title}\n\nTWA - SWA in points, 95% intervals and verdicts by the rule in bench/report.py "
          f"(margin {MARGIN}):\n")
    print(markdown(["run", "TWA variant", "seeds", "TWA test acc", "TWA - SWA [95% interval, seeds "
                    "and images]", "verdict", "(t over seeds alone)"], summary))
    print(f"\nWithin each seed (one seed each: the image term over the {n_test} test images):\n")
    print(markdown(["seed", "run", "TWA variant", "SWA", "TWA", "TWA - SWA", "verdict", "SWA held-out",
                    "TWA held-out"], per_seed))
    tail_contrasts(runs, n_test)


# ---------------------------------------------------------------------------------------------------
# bench/soups.py's runs: every soup and TWA-v against the best single ingredient
# ---------------------------------------------------------------------------------------------------

def soups_report(runs):
    for run in runs:
        print(f"seed {run['seed']}, {len(run['ingredients'])} ingredients (test accuracy "
              f"{min(i['accuracy'] for i in run['ingredients']):.2f}-"
              f"{max(i['accuracy'] for i in run['ingredients']):.2f}):\n")
        print(markdown(["method", "held-out acc", "test acc"],
                       [[name, f"{m['held_out']['accuracy']:.2f}", f"{m['accuracy']:.2f}"]
                        for name, m in run["methods"].items()]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", nargs="+", default=["reproduce"], metavar="NAME[:SEEDS]",
                        help="results/<name>-seed*.json; NAME:1,3 takes those seeds only; several "
                             "names pool runs of one protocol into one table")
    parser.add_argument("--results", default=os.path.join(common.ROOT, "results"), help="folder")
    parser.add_argument("--against", metavar="NAME",
                        help="bench/head.py runs under another protocol (results/NAME-seed*.json): "
                             "every model paired with its namesake on the same seed")
    parser.add_argument("--test-images", type=int, default=10_000,
                        help="size of the test set the runs scored (CIFAR-10's 10,000)")
    args = parser.parse_args(argv)
    try:
        report(args)
    except ValueError as err:  # results that do not fit together
        raise SystemExit(f"error: {err}") from None


def report(args):
    """The tables (and figures) for the parsed command line."""
    if args.against and len(args.name) > 1:
        raise SystemExit("--against pairs one --name with another")
    if args.test_images < 2:
        raise SystemExit(f"--test-images {args.test_images}: an interval needs at least 2 images")
    runs = table_runs(args.results, args.name, args.test_images)
    name = " + ".join(args.name)
    runner = runs[0].kind.runner
    if args.against:
        others = table_runs(args.results, [args.against], args.test_images)
        if runner != "bench/head.py" or others[0].kind.runner != runner:
            raise SystemExit("--against compares two sets of bench/head.py runs")
        protocol_report(runs, others, args.test_images)
    elif runner == "bench/tail_swa.py":  # a seed may have a file per swa_lr
        tail_report(runs, args.test_images,
                    f"{name}: seeds {', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}")
    elif runner == "bench/head.py":
        head_report(runs, args.test_images, f"{name}: seeds {', '.join(str(r['seed']) for r in runs)}")
    elif runner == "bench/soups.py":
        soups_report(runs)
    else:
        reproduce_report(runs, name, os.path.join(args.results, args.name[0].partition(":")[0]))


def reproduce_report(runs, name, figures):
    seeds = ", ".join(str(r["seed"]) + ("" if r.get("complete", True) else " (stopped early)")
                      for r in runs)
    print(f"{name}: seeds {seeds}; {runs[0]['epochs']} SGD epochs, test accuracy (%)\n")
    print(markdown(["method", "epochs spent", "test acc", "SGD at the same epochs",
                    "TWA - SGD (paired)", "TWA - SGD(E) (paired)"], head_rows(runs)))
    print()
    print(markdown(["tail lr", "tail epochs", "SGD tail end", "SWA", "TWA", "TWA - SWA"], tail_rows(runs)))
    accuracy_figure(runs, f"{figures}-accuracy.png")
    heads = runs[0]["head"]
    shown = heads[min(1, len(heads) - 1)]  # the second (2 TWA epochs) where there are two
    names = [str(i) for i in range(len(shown["alpha"]))]
    plot_coefficients(names, shown["alpha"], f"{figures}-coefficients.png", uniform=1 / len(names))


if __name__ == "__main__":
    main()
