"""Tables and figures from the reproduction's results/<name>-seed<k>.json files.

    python bench/report.py [--name reproduce] [--results results]

Prints Markdown tables. For bench/reproduce.py's runs: mean +- std over the seeds present, and
results/<name>-accuracy.png (test accuracy vs epochs spent: SGD's curve with the SWA and TWA points)
and results/<name>-coefficients.png (the learned coefficients of the first seed's runs). For
bench/head.py's runs (--name head-paper): paired differences with 95% intervals, a bootstrap over the
test images within each seed, and over the seeds both a t interval and a bootstrap over the test
images they share (one draw for all seeds); with --against NAME, two such protocols on the same
seeds and E (e.g. another SGD weight decay): each model against its namesake, and the change of its
gap to SGD(E), paired over the test images within each seed and over the seeds; with several names
(--name head-paper-4ep:1,3 head-paper:2), the seeds of one protocol pooled into one table. For
bench/tail_swa.py's runs (--name tail-swa): TWA against SWA of the same checkpoints, paired within
each seed and over the seeds, and the TWA variants that differ in one choice (checkpoint density,
TWA epochs, TWA-v) against each other. For bench/soups.py's (--name soups-diverse): each soup's held-out and
test accuracy.
"""
import argparse
import glob
import json
import os
import re
import statistics

import common
from paired import (bounds, describe, difference_of_gaps, over_seeds, paired_difference,
                    seed_mean_difference, seed_mean_gap_change)

import loop  # noqa: E402
from runfiles import unpack_bits  # noqa: E402
from plot import plot_coefficients, save_figure  # noqa: E402  (common puts the project on the path)
from matplotlib.figure import Figure

# the bootstrap column where the seeds' results name other data folders (see one_test_set)
UNPOOLED = "(other data folders)"


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
    rates = [loop.lr_at(schedule, head["lr"], epoch, epochs, epoch / epochs) for epoch in range(epochs)]
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


# ---------------------------------------------------------------------------------------------------
# bench/head.py's runs: every comparison paired over the test images
# ---------------------------------------------------------------------------------------------------

def head_models(run):
    """{label: (epochs spent, packed correct bits)} of every model a head run scored."""
    sgd = run["sgd"]["test_correct"]
    models = {}
    for head in run["head"]:
        start, spent = head["sgd_epochs"], head["sgd_epochs"] + head["twa_epochs"]
        key = f"{head['n']} ckpts"
        models[f"SGD({start})"] = (start, sgd[start - 1])
        models[f"SWA, {key} (epochs 0..{start})"] = (start, head["swa"]["correct"])
        twa = f"TWA, {key}, {head['twa_epochs']} ep"
        models[f"{twa}, before BN"] = (spent, head["before_bn"]["correct"])
        for mode, result in head["twa"].items():
            models[f"{twa}, BN {mode}"] = (spent, result["correct"])
    return models


def paired_rows(runs, bits):
    """Each model's accuracy and its paired differences with SGD(E) and SGD at the same epochs."""
    e = runs[0]["epochs"]
    per_seed = [head_models(r) for r in runs]
    rows = []
    for label in dict.fromkeys(label for models in per_seed for label in models):  # any seed's
        present = [(r, m[label][1]) for r, m in zip(runs, per_seed) if label in m]
        spent = next(m[label][0] for m in per_seed if label in m)
        at = min(spent, e)
        acc = [100 * bits(c).mean() for _, c in present]
        vs_end = [paired_difference(bits(c), bits(r["sgd"]["test_correct"][e - 1]))[0]
                  for r, c in present]
        vs_same = [paired_difference(bits(c), bits(r["sgd"]["test_correct"][at - 1]))[0]
                   for r, c in present]
        rows.append([label, spent, mean_std(acc), describe(*over_seeds(vs_same)),
                     describe(*over_seeds(vs_end))])
    return rows


def paired_comparisons(runs, comparisons, bits):
    """(seed, "a - b", (difference, low, high), (a's bits, b's bits)) for every comparison on every
    seed: the paired bootstrap interval over the test images."""
    rows = []
    for run, models in zip(runs, (head_models(r) for r in runs)):
        e = run["epochs"]
        for k, correct in enumerate(run["sgd"]["test_correct"], start=1):  # SGD at any epoch count
            models.setdefault(f"SGD({k})", (k, correct))
        for a, b in comparisons(models, e):
            pair = bits(models[a][1]), bits(models[b][1])
            rows.append((run["seed"], f"{a} - {b}", paired_difference(*pair), pair))
    return rows


def one_test_set(runs):
    """Whether the runs scored the same test images, image i being the same one in each: the
    bootstrap over images resamples image i of every seed together, so it needs one data folder."""
    return len({r["data_dir"] for r in runs if r.get("data_dir")}) <= 1


def over_seed_rows(compared, pooled=True):
    """The comparisons that more than one seed made: the mean difference with a t interval over the
    seeds, and (where `pooled`, the seeds sharing one test set) with a bootstrap over its images."""
    by_label = {}
    for _, label, difference, pair in compared:
        by_label.setdefault(label, []).append((difference[0], pair))
    return [[label, len(d), describe(*over_seeds([x for x, _ in d])),
             bounds(*seed_mean_difference([pair for _, pair in d])) if pooled else UNPOOLED]
            for label, d in by_label.items() if len(d) > 1]


def head_comparisons(models, e):
    """The gaps the claim is about, and what moves them: checkpoint density, TWA length, BN pass."""
    runs = sorted({tuple(map(int, re.match(r"TWA, (\d+) ckpts, (\d+) ep", label).groups()))
                   for label in models if label.startswith("TWA")})
    name = "TWA, {} ckpts, {} ep, {}".format
    pairs = []
    for n, k in runs:
        spent = models[name(n, k, "BN recompute")][0]
        for bn in ("BN recompute", "BN running"):
            pairs += [(name(n, k, bn), f"SGD({e})"), (name(n, k, bn), f"SGD({min(spent, e)})")]
        pairs += [(name(n, k, "BN running"), name(n, k, "BN recompute")),
                  (name(n, k, "BN recompute"), name(n, k, "before BN"))]
        pairs += [(name(n, k, "BN recompute"), name(m, k, "BN recompute")) for m, j in runs
                  if j == k and m < n]  # denser checkpoints
        pairs += [(name(n, k, "BN recompute"), name(n, j, "BN recompute")) for m, j in runs
                  if m == n and j < k]  # longer TWA
    return [(a, b) for a, b in dict.fromkeys(pairs) if a in models and b in models]


def head_report(runs, n_test, title):
    def bits(packed):
        return unpack_bits(packed, n_test)

    # every table computed before the first line is printed, so that an error prints nothing else
    rows = paired_rows(runs, bits)
    compared = paired_comparisons(runs, head_comparisons, bits)
    over = over_seed_rows(compared, one_test_set(runs))
    complete = all(r.get("complete") for r in runs)
    print(f"{title}\n\nSGD: ResNet-20, E = {runs[0]['epochs']}, wd {runs[0]['sgd_wd']}, "
          f"{runs[0]['checkpoints_per_epoch']} checkpoints per epoch; TWA {runs[0]['twa']}"
          f"{'' if complete else ' (some seeds stopped early)'}\n")
    interval = ("mean [95% t interval over seeds]" if len(runs) > 1 else
                "one seed: paired bootstrap over test images below")
    print(markdown(["model", "epochs spent", "test acc", f"- SGD same epochs ({interval})",
                    "- SGD(E)"], rows))
    if over:
        print("\nThe same comparisons over the seeds that made them: mean of the per-seed differences "
              "with 95% intervals, a t interval over the seeds and a bootstrap over the test images:\n")
        print(markdown(["comparison", "seeds", "difference (t over seeds)",
                        "(bootstrap over test images)"], over))
    print(f"\nPaired differences within each seed, 95% bootstrap interval over the {n_test} test "
          "images:\n")
    print(markdown(["seed", "comparison", "difference (points)"],
                   [[seed, label, describe(*d)] for seed, label, d, _ in compared]))


def protocol_report(runs, others, n_test):
    """Two head protocols on the same seeds (--against): each model against its namesake under the
    other protocol, and whether the change moves its gap to SGD(E), paired over the test images within
    each seed and, where several seeds pair, over the seeds."""
    def bits(packed):
        return unpack_bits(packed, n_test)

    mine, theirs = runs[0], others[0]
    if len({r["epochs"] for r in runs + others}) > 1:  # a gap to SGD(E) means one E
        raise SystemExit(f"--against pairs runs of one E: {mine['name']} ran {mine['epochs']} epochs, "
                         f"{theirs['name']} {theirs['epochs']}")
    others = {r["seed"]: r for r in others}
    paired_runs = [(run, others[run["seed"]]) for run in runs if run["seed"] in others]
    if not paired_runs:
        raise SystemExit(f"{mine['name']} and {theirs['name']} share no seed")
    e, rows, by_label = mine["epochs"], [], {}
    for run, other in paired_runs:
        end, other_end = (bits(r["sgd"]["test_correct"][e - 1]) for r in (run, other))
        models, namesakes = head_models(run), head_models(other)
        pairs = {f"SGD({e})": (end, other_end)}  # the reference of every gap, so no gap of its own
        pairs.update((label, (bits(models[label][1]), bits(namesakes[label][1])))
                     for label in models if label in namesakes and label not in pairs)
        for label, (a, b) in pairs.items():
            difference = paired_difference(a, b)
            gap = None if label == f"SGD({e})" else difference_of_gaps(a, end, b, other_end)
            rows.append([run["seed"], label, f"{100 * a.mean():.2f}", f"{100 * b.mean():.2f}",
                         describe(*difference), describe(*gap) if gap else ""])
            by_label.setdefault(label, []).append(
                (difference[0], None if gap is None else gap[0], (a, end, b, other_end)))
    print(f"{mine['name']} (SGD wd {mine['sgd_wd']}) against {theirs['name']} (SGD wd "
          f"{theirs['sgd_wd']}), 95% bootstrap intervals over the {n_test} test images:\n")
    print(markdown(["seed", "model", mine["name"], theirs["name"], "difference (points)",
                    f"change of the gap to SGD({e})"], rows))
    pooled = one_test_set([r for pair in paired_runs for r in pair])
    over = [protocol_over_seeds(label, seeds, pooled) for label, seeds in by_label.items()
            if len(seeds) > 1]
    if over:
        print("\nOver the seeds both protocols ran: mean of the per-seed differences with a 95% t "
              "interval over the seeds and a bootstrap over the test images they share:\n")
        print(markdown(["model", "seeds", "difference (t over seeds)", "(bootstrap over test images)",
                        f"change of the gap to SGD({e}) (t over seeds)",
                        "(bootstrap over test images)"], over))


def protocol_over_seeds(label, seeds, pooled):
    """One row of the over-seed table: the difference and the change of the gap (none for SGD(E))."""
    differences, gaps, quads = zip(*seeds)
    row = [label, len(seeds), describe(*over_seeds(differences)),
           bounds(*seed_mean_difference([(a, b) for a, _, b, _ in quads])) if pooled else UNPOOLED]
    if gaps[0] is None:
        return row + ["", ""]
    return row + [describe(*over_seeds(gaps)),
                  bounds(*seed_mean_gap_change(quads)) if pooled else UNPOOLED]


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
    (TWA(b) - SWA(b)), on each seed that ran both with per-image results (a bootstrap over the test
    images) and over those seeds (a t interval, and a bootstrap over the images they share)."""
    summary, per_seed = [], []
    for key in sorted({key for r in runs for key in r["runs"]}):
        present = [r for r in runs if key in r["runs"]]
        for a, b, what in TAIL_CONTRASTS:
            quads, seeds = [], []
            for run in present:
                variants = [run["runs"][key]["tail"].get(name) or {} for name in (a, b)]
                bits = [v.get(k) for v in variants for k in ("twa_correct", "swa_correct")]
                if all(bits):
                    quads.append(tuple(unpack_bits(x, n_test) for x in bits))
                    seeds.append(run["seed"])
            twa_differences = [paired_difference(q[0], q[2]) for q in quads]
            gap_changes = [difference_of_gaps(*q) for q in quads]
            per_seed += [[seed, key, f"{a} - {b}", describe(*d), describe(*g)]
                         for seed, d, g in zip(seeds, twa_differences, gap_changes)]
            if len(quads) > 1:
                pooled = one_test_set([r for r in present if r["seed"] in seeds])
                summary.append([key, f"{a} - {b}: {what}", ", ".join(map(str, seeds)),
                                describe(*over_seeds([d[0] for d in twa_differences])),
                                bounds(*seed_mean_difference([(q[0], q[2]) for q in quads]))
                                if pooled else UNPOOLED,
                                describe(*over_seeds([g[0] for g in gap_changes])),
                                bounds(*seed_mean_gap_change(quads)) if pooled else UNPOOLED])
    if per_seed:
        print("\nOne TWA variant against another (points; TWA(a) - TWA(b), and the change of the gap to "
              "SWA, (TWA(a) - SWA(a)) - (TWA(b) - SWA(b))), over the seeds that ran both with per-image "
              "results:\n")
        print(markdown(["run", "contrast", "seeds", "TWA(a) - TWA(b) (t over seeds)",
                        "(bootstrap over test images)", "change of the gap to SWA (t over seeds)",
                        "(bootstrap over test images)"], summary))
        print("\nWithin each seed, 95% bootstrap interval over the test images:\n")
        print(markdown(["seed", "run", "contrast", "TWA(a) - TWA(b)", "change of the gap to SWA"],
                       per_seed))


def tail_report(runs, n_test, title):
    """TWA - SWA for every variant: paired within each seed (a bootstrap over the test images) where
    the run recorded which images each model got right, and over the seeds a t interval and a
    bootstrap over the test images they share."""
    summary, per_seed = [], []
    for key in sorted({key for r in runs for key in r["runs"]}):  # one SGD run per swa_lr
        present = [r for r in runs if key in r["runs"]]
        names = dict.fromkeys(name for r in present for name, v in r["runs"][key]["tail"].items() if v)
        for name in names:
            differences, accuracies, pairs, paired_seeds = [], [], [], []
            for run in present:
                v = run["runs"][key]["tail"].get(name)
                if not v:
                    continue
                if v.get("twa_correct") and v.get("swa_correct"):
                    pairs.append((unpack_bits(v["twa_correct"], n_test),
                                  unpack_bits(v["swa_correct"], n_test)))
                    paired_seeds.append(run["seed"])
                    difference = paired_difference(*pairs[-1])
                else:  # an earlier runner kept accuracies only
                    difference = (v["twa_acc"] - v["swa_acc"], None, None)
                per_seed.append([run["seed"], key, name, f"{v['swa_acc']:.2f}", f"{v['twa_acc']:.2f}",
                                 describe(*difference) + ("" if difference[1] is not None else
                                                          " (no per-image results)"),
                                 *(f"{v[k]:.2f}" if k in v else "" for k in ("swa_held_out_acc",
                                                                           "held_out_acc"))])
                differences.append(difference[0])
                accuracies.append(v["twa_acc"])
            pooled = ""  # over the seeds that recorded per-image results
            if len(pairs) > 1 and not one_test_set(present):
                pooled = UNPOOLED
            elif len(pairs) == len(differences) > 1:
                pooled = bounds(*seed_mean_difference(pairs))
            elif len(pairs) > 1:
                pooled = (f"{describe(*seed_mean_difference(pairs))} over seeds "
                          f"{', '.join(map(str, paired_seeds))}")
            summary.append([key, name, len(differences), mean_std(accuracies),
                            describe(*over_seeds(differences)), pooled])
    print(f"{title}\n")
    print(markdown(["run", "TWA variant", "seeds", "TWA test acc",
                    "TWA - SWA (mean [95% t interval over seeds])", "(bootstrap over test images)"],
                   summary))
    print(f"\nWithin each seed, 95% bootstrap interval over the {n_test} test images:\n")
    print(markdown(["seed", "run", "TWA variant", "SWA", "TWA", "TWA - SWA", "SWA held-out",
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


# what a bench/head.py table holds fixed across its seeds
HEAD_PROTOCOL = ("epochs", "arch", "sgd_wd", "checkpoints_per_epoch", "twa_end", "train_subset",
                 "batch_size", "twa")


def named_runs(results, spec):
    """The runs in results/NAME-seed*.json, or with NAME:K,L those of seeds K and L only."""
    name, _, seeds = spec.partition(":")
    files = sorted(glob.glob(os.path.join(results, f"{name}-seed*.json")))
    if not files:
        raise SystemExit(f"no {name}-seed*.json in {results}")
    runs = [read_results(f) for f in files]
    if not seeds:
        return runs
    try:
        wanted = {int(seed) for seed in seeds.split(",")}
    except ValueError:
        raise SystemExit(f"--name {spec}: seeds are integers, as in {name}:1,3") from None
    missing = wanted - {r["seed"] for r in runs}
    if missing:
        raise SystemExit(f"no {name}-seed{min(missing)}*.json in {results}")
    return [r for r in runs if r["seed"] in wanted]


def pooled_runs(results, specs):
    """One table's runs from one or more --name entries. Several pool bench/head.py runs of one
    protocol (say, seeds run again under another name to add a TWA length), each seed once: the same
    seed under two names is two runs (float rounding differs between revisions and thread counts),
    so NAME:SEEDS has to pick one."""
    runs = [run for spec in specs for run in named_runs(results, spec)]
    if len(specs) == 1:
        return runs
    if not all("head" in r and "sgd_wd" in r for r in runs):
        raise SystemExit("several --name entries pool bench/head.py runs only")
    seeds = [r["seed"] for r in runs]
    twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if twice:
        raise SystemExit(f"seed {twice[0]} is in more than one of {' '.join(specs)}: pick one "
                         "with NAME:SEEDS")
    for key in HEAD_PROTOCOL:  # among the runs that record it (older runs lack batch_size)
        values = {json.dumps(r[key], sort_keys=True) for r in runs if key in r}
        if len(values) > 1:
            raise SystemExit(f"{' '.join(specs)} differ in {key} ({', '.join(sorted(values))}): "
                             "a table pools one protocol")
    return sorted(runs, key=lambda r: r["seed"])


def read_results(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable results file ({err})") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", nargs="+", default=["reproduce"], metavar="NAME[:SEEDS]",
                        help="results/<name>-seed*.json; NAME:1,3 takes those seeds only; several "
                             "names pool bench/head.py runs of one protocol into one table")
    parser.add_argument("--results", default=os.path.join(common.ROOT, "results"), help="folder")
    parser.add_argument("--against", metavar="NAME",
                        help="bench/head.py runs under another protocol (results/NAME-seed*.json): "
                             "every model paired with its namesake on the same seed")
    parser.add_argument("--test-images", type=int, default=10_000,
                        help="size of the test set the runs scored (CIFAR-10's 10,000)")
    args = parser.parse_args()
    if args.against and len(args.name) > 1:
        raise SystemExit("--against pairs one --name with another")
    runs = pooled_runs(args.results, args.name)
    name = " + ".join(args.name)
    if args.against:
        others = named_runs(args.results, args.against)
        if "sgd_wd" not in runs[0] or "sgd_wd" not in others[0]:
            raise SystemExit("--against compares two sets of bench/head.py runs")
        protocol_report(runs, others, args.test_images)
        return
    if "swa_start" in runs[0]:  # bench/tail_swa.py's runs (a seed may have a file per swa_lr)
        tail_report(runs, args.test_images,
                    f"{name}: seeds {', '.join(str(s) for s in sorted({r['seed'] for r in runs}))}")
        return
    if "head" in runs[0] and "sgd_wd" in runs[0]:  # bench/head.py's runs
        head_report(runs, args.test_images, f"{name}: seeds {', '.join(str(r['seed']) for r in runs)}")
        return
    if "methods" in runs[0] and "ingredients" in runs[0]:  # bench/soups.py's runs
        soups_report(runs)
        return
    figures = os.path.join(args.results, args.name[0].partition(":")[0])
    if not {"epochs", "sgd", "head", "tail"} <= runs[0].keys():
        raise SystemExit(f"{figures}-seed*.json: not a record of bench/reproduce.py, head.py, tail_swa.py or "
                         "soups.py, which this report reads; its numbers are in the file itself")
    seeds = ", ".join(str(r["seed"]) + ("" if r.get("complete", True) else " (stopped early)")
                      for r in runs)
    print(f"{name}: seeds {seeds}; {runs[0]['epochs']} SGD epochs, test accuracy (%)\n")
    print(markdown(["method", "epochs spent", "test acc", "SGD at the same epochs",
                    "TWA - SGD (paired)", "TWA - SGD(E) (paired)"], head_rows(runs)))
    print()
    print(markdown(["tail lr", "tail epochs", "SGD tail end", "SWA", "TWA", "TWA - SWA"], tail_rows(runs)))
    accuracy_figure(runs, f"{figures}-accuracy.png")
    first = runs[0]["head"][1]
    names = [str(i) for i in range(len(first["alpha"]))]
    plot_coefficients(names, first["alpha"], f"{figures}-coefficients.png",
                      uniform=1 / len(names))


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # results that do not fit together (e.g. another --test-images)
        raise SystemExit(f"error: {err}") from None
