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

The rule (fixed before the E = 200 runs; every verdict this report prints follows it):

  Interval. For a difference (e.g. TWA - SGD, TWA - SWA) over S seeds that share one test set of N
  images, with per-image correctness per seed: let d_s be seed s's paired difference in accuracy
  (points), D their mean over seeds, and e_i the per-image difference averaged over seeds.
      SE^2 = a + b,  a = var_seeds(d_s) / S,  b = var_images(e_i) / N   (sample variances, points^2)
      interval = D +- t_{0.975, df} * SE,  df = (a + b)^2 / (a^2 / (S - 1) + b^2 / (N - 1))
  df is Welch-Satterthwaite's (rounded down): the seed term is estimated from S - 1 degrees of
  freedom, the image term from N - 1, and t(S - 1) on both would widen the image term's 1.96 to
  4.3 with 3 seeds for no reason. For S = 1: the normal quantile 1.96 and the image term alone,
  marked "(one seed)". Why both terms: the seeds
  share the test set, so the spread of the seeds alone misses the test set's draw (over-seed t
  intervals came out narrower than per-image noise allows, e.g. [+0.33, +0.39] on a 10k test set),
  and the image term alone misses seed-to-seed variation; the sum counts the seed-by-image
  interaction twice, so the interval errs wide, never narrow. Where some seeds have no per-image
  results, the interval uses the seeds that have them and says which; with no per-image results at
  all, the t interval over the seeds is printed and the verdict is "not settled (no per-image
  results)". Seeds scored from other data folders share no test set: "not settled (other data
  folders)".

  Verdict, with margin M = 0.3 points: "better" when the interval's lower end > 0, "worse" when its
  upper end < 0 (with " (within +-0.3)" appended when the whole interval also lies inside
  [-0.3, +0.3]); otherwise "matches" when the whole interval lies inside [-0.3, +0.3]; otherwise
  "not settled". In a row "a - b", "better" means a better (TWA - baseline: TWA better).
"""
import argparse
import glob
import json
import math
import os
import re
import stat
import statistics

import numpy as np

import common
from paired import T975, describe, over_seeds

import loop  # noqa: E402
import schema  # noqa: E402
from runfiles import unpack_bits  # noqa: E402
from plot import plot_coefficients, save_figure  # noqa: E402  (common puts the project on the path)
from matplotlib.figure import Figure

MARGIN = 0.3  # points: the rule's margin for "matches"
NO_BITS = "not settled (no per-image results)"
UNPOOLED = "not settled (other data folders)"
MAX_BYTES = 64 << 20  # a results file is kilobytes to a megabyte; more is not one


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
# the rule (see the module's docstring)
# ---------------------------------------------------------------------------------------------------

def t975(df):
    """Student's t 97.5% quantile: the table to 10 degrees of freedom, Cornish-Fisher beyond
    (within 2e-5 there)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * df ** 4))


def rule_interval(scores):
    """(D, low, high) in points by the rule, from per-image scores (an integer per image: a - b, or a
    change of gaps), one array per seed, all on one test set."""
    if len({len(s) for s in scores}) > 1:
        raise ValueError(f"seeds scored on {' and '.join(str(len(s)) for s in scores)} images "
                         "cannot share one interval")
    points = 100.0 * np.asarray(scores, dtype=float)  # seeds x images
    seeds, images = points.shape
    if images < 2:
        raise ValueError("an interval over the test images needs at least 2 of them")
    differences = points.mean(axis=1)
    image_term = points.mean(axis=0).var(ddof=1) / images
    if seeds == 1:
        half = 1.96 * math.sqrt(image_term)
    else:
        seed_term = differences.var(ddof=1) / seeds
        half = t975(satterthwaite(seed_term, seeds - 1, image_term, images - 1)) * math.sqrt(
            seed_term + image_term)
    mean = float(differences.mean())
    return mean, mean - half, mean + half


def satterthwaite(a, df_a, b, df_b):
    """Welch-Satterthwaite's degrees of freedom of the variance estimate a + b, rounded down (never
    below the smaller of the two, where both terms are 0)."""
    if a + b == 0:
        return min(df_a, df_b)
    return max(min(df_a, df_b), math.floor((a + b) ** 2 / (a ** 2 / df_a + b ** 2 / df_b)))


def verdict(low, high):
    """The rule's word for an interval of a difference a - b."""
    within = -MARGIN <= low and high <= MARGIN
    if low > 0 or high < 0:
        return ("better" if low > 0 else "worse") + (f" (within +-{MARGIN})" if within else "")
    return "matches" if within else "not settled"


def minus(a, b):
    """Per image, a - b: -1, 0 or 1."""
    return a.astype(int) - b


def gap_change(a, a_ref, b, b_ref):
    """Per image, (a - a_ref) - (b - b_ref): an integer in -2..2."""
    return minus(a, a_ref) - minus(b, b_ref)


def seed_cells(scores):
    """[difference [interval], verdict] of one seed's per-image scores (None: no per-image results)."""
    if scores is None:
        return ["(no per-image results)", NO_BITS]
    mean, low, high = rule_interval([scores])
    return [describe(mean, low, high), verdict(low, high)]


def over_seed_cells(scored, shared=True, unscored=()):
    """[difference [interval], verdict, t over seeds] over the seeds: `scored` the (seed, per-image
    scores) of seeds with per-image results, `unscored` the (seed, difference) of those without;
    `shared` whether the scored seeds read one test set (one data folder)."""
    differences = [100.0 * float(np.mean(s)) for _, s in scored] + [d for _, d in unscored]
    t = describe(*over_seeds(differences))
    if not scored:
        return ["", NO_BITS, t]
    if not shared:
        return ["", UNPOOLED, t]
    mean, low, high = rule_interval([s for _, s in scored])
    seeds = ", ".join(str(seed) for seed, _ in scored)
    if len(scored) == 1:
        note = f" (one seed{': seed ' + seeds if unscored else ''})"
    else:
        note = f" over seeds {seeds}" if unscored else ""
    return [describe(mean, low, high) + note, verdict(low, high), t]


RULE_COLUMNS = ["difference [95% interval, seeds and images]", "verdict", "(t over seeds alone)"]


def one_test_set(runs):
    """Whether the runs scored the same test images, image i being the same one in each: the
    rule's image term averages image i over the seeds, so it needs one data folder."""
    return len({r["data_dir"] for r in runs if r.get("data_dir")}) <= 1


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
    if "sgd_matched" in run:  # SGD trained for TWA's budget on its own schedule (--budget-matched)
        matched = run["sgd_matched"]
        models[matched_label(matched["epochs"])] = (matched["epochs"], matched["test_correct"][-1])
    return models


def matched_label(epochs):
    return f"SGD({epochs}), own schedule"


def paired_rows(runs, bits):
    """Each model's accuracy and its differences with SGD at the same epochs and with SGD(E), over
    the seeds that scored it, by the rule."""
    e, shared = runs[0]["epochs"], one_test_set(runs)
    per_seed = [head_models(r) for r in runs]
    rows = []
    for label in dict.fromkeys(label for models in per_seed for label in models):  # any seed's
        present = [(r, bits(m[label][1])) for r, m in zip(runs, per_seed) if label in m]
        spent = next(m[label][0] for m in per_seed if label in m)
        same = [(r["seed"], minus(c, bits(r["sgd"]["test_correct"][min(spent, e) - 1])))
                for r, c in present]
        end = [(r["seed"], minus(c, bits(r["sgd"]["test_correct"][e - 1]))) for r, c in present]
        rows.append([label, spent, mean_std([100 * c.mean() for _, c in present]),
                     *over_seed_cells(same, shared)[:2], *over_seed_cells(end, shared)[:2]])
    return rows


def paired_comparisons(runs, comparisons, bits):
    """(seed, "a - b", per-image scores a - b) for every comparison on every seed."""
    rows = []
    for run, models in zip(runs, (head_models(r) for r in runs)):
        e = run["epochs"]
        for k, correct in enumerate(run["sgd"]["test_correct"], start=1):  # SGD at any epoch count
            models.setdefault(f"SGD({k})", (k, correct))
        for a, b in comparisons(models, e):
            rows.append((run["seed"], f"{a} - {b}", minus(bits(models[a][1]), bits(models[b][1]))))
    return rows


def over_seed_rows(compared, shared=True):
    """The comparisons that more than one seed made, over those seeds by the rule."""
    by_label = {}
    for seed, label, scores in compared:
        by_label.setdefault(label, []).append((seed, scores))
    return [[label, len(scored), *over_seed_cells(scored, shared)]
            for label, scored in by_label.items() if len(scored) > 1]


def head_comparisons(models, e):
    """The gaps the claim is about, and what moves them: checkpoint density, TWA length, BN pass."""
    runs = sorted({tuple(map(int, re.match(r"TWA, (\d+) ckpts, (\d+) ep", label).groups()))
                   for label in models if label.startswith("TWA")})
    name = "TWA, {} ckpts, {} ep, {}".format
    pairs = []
    for n, k in runs:
        spent = models[name(n, k, "BN recompute")][0]
        for bn in ("BN recompute", "BN running"):
            pairs += [(name(n, k, bn), f"SGD({e})"), (name(n, k, bn), f"SGD({min(spent, e)})"),
                      (name(n, k, bn), matched_label(spent))]
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
    print(f"Differences in points, 95% intervals and verdicts by the rule in bench/report.py (margin "
          f"{MARGIN}):\n")
    print(markdown(["model", "epochs spent", "test acc", "- SGD same epochs", "verdict", "- SGD(E)",
                    "verdict"], rows))
    if over:
        print("\nThe same comparisons over the seeds that made them:\n")
        print(markdown(["comparison", "seeds", *RULE_COLUMNS], over))
    print(f"\nWithin each seed (one seed each: the image term over the {n_test} test images):\n")
    print(markdown(["seed", "comparison", "difference (points)", "verdict"],
                   [[seed, label, *seed_cells(scores)] for seed, label, scores in compared]))


def protocol_report(runs, others, n_test):
    """Two head protocols on the same seeds (--against): each model against its namesake under the
    other protocol, and whether the change moves its gap to SGD(E), within each seed and, where
    several seeds pair, over the seeds, by the rule."""
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
            gap = None if label == f"SGD({e})" else gap_change(a, end, b, other_end)
            rows.append([run["seed"], label, f"{100 * a.mean():.2f}", f"{100 * b.mean():.2f}",
                         *seed_cells(minus(a, b)), *(seed_cells(gap) if gap is not None else ["", ""])])
            by_label.setdefault(label, []).append((run["seed"], minus(a, b), gap))
    print(f"{mine['name']} (SGD wd {mine['sgd_wd']}) against {theirs['name']} (SGD wd "
          f"{theirs['sgd_wd']}), in points with 95% intervals and verdicts by the rule in "
          f"bench/report.py (one seed each: the image term over the {n_test} test images):\n")
    print(markdown(["seed", "model", mine["name"], theirs["name"], "difference", "verdict",
                    f"change of the gap to SGD({e})", "verdict"], rows))
    shared = one_test_set([r for pair in paired_runs for r in pair])
    over = [protocol_over_seeds(label, seeds, shared) for label, seeds in by_label.items()
            if len(seeds) > 1]
    if over:
        print("\nOver the seeds both protocols ran:\n")
        print(markdown(["model", "seeds", *RULE_COLUMNS, f"change of the gap to SGD({e})", "verdict",
                        "(t over seeds alone)"], over))


def protocol_over_seeds(label, seeds, shared):
    """One row of the over-seed table: the difference and the change of the gap (none for SGD(E))."""
    row = [label, len(seeds), *over_seed_cells([(seed, d) for seed, d, _ in seeds], shared)]
    if seeds[0][2] is None:
        return row + ["", "", ""]
    return row + over_seed_cells([(seed, g) for seed, _, g in seeds], shared)


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


# ---------------------------------------------------------------------------------------------------
# reading: each file held to its shape, each table to one kind, one protocol and one run per seed
# ---------------------------------------------------------------------------------------------------

class Kind:
    """A kind of results file: the runner that writes it, how to tell it, its shape (schema.py), and
    the settings every run of one table shares."""

    def __init__(self, runner, keys, shape, protocol):
        self.runner, self.keys, self.shape, self.protocol = runner, keys, shape, protocol


KINDS = (  # the first whose keys a file has
    Kind("bench/tail_swa.py", ("swa_start",), schema.TAIL, ("epochs", "checkpoints_per_epoch", "swa_start")),
    Kind("bench/head.py", ("head", "sgd_wd"), schema.HEAD,
         ("epochs", "arch", "sgd_wd", "checkpoints_per_epoch", "twa_end", "train_subset", "batch_size",
          "twa")),
    Kind("bench/soups.py", ("methods", "ingredients"), schema.SOUPS, ()),
    Kind("bench/reproduce.py", ("epochs", "sgd", "head", "tail"), schema.REPRODUCE,
         ("epochs", "arch", "checkpoints_per_epoch", "quick", "precision", "head_twa", "tail_twa")),
)


class Run(dict):
    """One results file's record, with its path and kind."""

    def __init__(self, data, path, kind):
        super().__init__(data)
        self.path, self.kind = path, kind


def read_results(path, n_test):
    """The record in `path`, held to its kind's shape with per-image results of n_test images; any
    failure is one line naming the file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SystemExit(f"{path}: not a regular file")
        if os.path.getsize(path) > MAX_BYTES:
            raise SystemExit(f"{path}: {os.path.getsize(path)} bytes, too large for a results file")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        raise SystemExit(f"{path}: not a readable results file ({err})") from None
    kind = next((k for k in KINDS if isinstance(data, dict) and all(key in data for key in k.keys)),
                None)
    if kind is None:
        raise SystemExit(f"{path}: not a record of {', '.join(k.runner for k in KINDS)}, which this "
                         "report reads")
    try:
        schema.validate(data, kind.shape, path)
    except schema.ShapeError as err:
        raise SystemExit(str(err)) from None
    check_bits(data, n_test, path)
    return Run(data, path, kind)


BITS_KEYS = ("correct", "test_correct", "twa_correct", "swa_correct")  # schema.bits in the shapes


def check_bits(value, n_test, path, field=""):
    """Refuse packed per-image results anywhere in a record that do not hold n_test flags."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        where = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else key
        if isinstance(item, str) and (key in BITS_KEYS or field.endswith("test_correct")):
            try:
                unpack_bits(item, n_test)
            except ValueError as err:
                raise SystemExit(f"{path}: {where}: {err}") from None
        else:
            check_bits(item, n_test, path, where)


def check_table(runs):
    """Refuse one table of runs of several kinds or protocols, or the same seed twice (in one swa_lr
    run of a tail table), naming the files."""
    first = runs[0]
    for run in runs[1:]:
        if run.kind is not first.kind:
            raise SystemExit(f"{first.path} is a record of {first.kind.runner} and {run.path} of "
                             f"{run.kind.runner}: a table reads one kind")
    for key in first.kind.protocol:  # among the runs that record it (older runs lack batch_size)
        values = {}
        for run in runs:
            if key in run:
                values.setdefault(json.dumps(run[key], sort_keys=True), run.path)
        if len(values) > 1:
            raise SystemExit(f"{' and '.join(values.values())} differ in {key} "
                             f"({', '.join(values)}): a table holds one protocol")
    seen = {}
    for run in runs:
        for table in run["runs"] if "swa_start" in run else [""]:
            other = seen.setdefault((table, run["seed"]), run)
            if other is not run:
                raise SystemExit(f"seed {run['seed']}{' (' + table + ')' if table else ''} is in more "
                                 f"than one of {other.path}, {run.path}: a table counts each seed once; "
                                 "pick one with NAME:SEEDS")


def named_runs(results, spec, n_test):
    """The runs in results/NAME-seed*.json, or with NAME:K,L those of seeds K and L only."""
    name, _, seeds = spec.partition(":")
    files = sorted(glob.glob(os.path.join(glob.escape(results), f"{name}-seed*.json")))
    if not files:
        raise SystemExit(f"no {name}-seed*.json in {results}")
    runs = [read_results(f, n_test) for f in files]
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


def table_runs(results, specs, n_test):
    """One table's runs from one or more --name entries (say, seeds run again under another name to
    add a TWA length), checked as one table whatever pooled them: the same seed under two names is
    two runs (float rounding differs between revisions and thread counts), so NAME:SEEDS picks one."""
    runs = [run for spec in specs for run in named_runs(results, spec, n_test)]
    check_table(runs)
    return sorted(runs, key=lambda r: r["seed"])


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
