"""bench/head.py's runs as bench/report.py prints them: every model a run scored (SGD at each epoch
count, SWA, TWA before and after its BatchNorm pass) paired with the others over the test images,
within each seed and over the seeds, by the rule (bench/rule.py); and two protocols on the same
seeds, each model against its namesake (--against)."""
import re

from common import markdown, mean_std  # first: common puts the project on the path
from rule import MARGIN, RULE_COLUMNS, gap_change, minus, one_test_set, over_seed_cells, seed_cells

from packed_bits import unpack_bits


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
