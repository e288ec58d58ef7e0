"""The statistical rule of every verdict bench/report.py prints.

Fixed before the E = 200 runs.

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
import math

import numpy as np

from paired import T975, describe, over_seeds

MARGIN = 0.3  # points: the rule's margin for "matches"
NO_BITS = "not settled (no per-image results)"
UNPOOLED = "not settled (other data folders)"


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


def one_test_set(runs):
    """Whether the runs scored the same test images, image i being the same one in each: the
    rule's image term averages image i over the seeds, so it needs one data folder."""
    return len({r["data_dir"] for r in runs if r.get("data_dir")}) <= 1


RULE_COLUMNS = ["difference [95% interval, seeds and images]", "verdict", "(t over seeds alone)"]
