"""Paired comparisons of two models scored on the same test images, from the packed bits of which
images each got right (runfiles.pack_bits): the difference in accuracy with a 95% interval from a
paired bootstrap over the test images, and the mean over seeds with a t interval."""
import statistics

import numpy as np

import common  # noqa: F401  (puts the project on the path)
from runfiles import unpack_bits

BOOTSTRAP = 10_000
# two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def bits(packed, n):
    return unpack_bits(packed, n)


def paired_difference(a, b, seed=0):
    """(accuracy of a - accuracy of b, low, high) in points, the interval from resampling the test
    images with replacement. Only the images where the two disagree move the difference, so the
    bootstrap draws the counts of (a right, b wrong) and (a wrong, b right) from a multinomial: the
    same distribution as resampling whole index vectors, at no cost."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"models scored on {len(a)} and {len(b)} images cannot be paired")
    n = len(a)
    gains, losses = int(np.sum(a & ~b)), int(np.sum(~a & b))
    draws = np.random.default_rng(seed).multinomial(n, [gains / n, losses / n, 1 - (gains + losses) / n],
                                                    size=BOOTSTRAP)
    diffs = 100.0 * (draws[:, 0] - draws[:, 1]) / n
    low, high = np.percentile(diffs, [2.5, 97.5])
    return 100.0 * (gains - losses) / n, float(low), float(high)


def over_seeds(differences):
    """(mean, low, high) of per-seed differences with a 95% t interval (None bounds for one seed)."""
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, None, None
    half = T975[min(len(differences), len(T975) + 1) - 2] * statistics.stdev(differences) / len(
        differences) ** 0.5
    return mean, mean - half, mean + half


def describe(mean, low, high):
    if low is None:
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
