"""Paired comparisons of two models scored on the same test images, from the packed bits of which
images each got right (packed_bits.pack_bits): the difference in accuracy with a 95% interval from a
paired bootstrap over the test images, and the mean over seeds with two intervals: a t interval over
the seeds, and a bootstrap over the test images that all seeds share."""
import statistics

import numpy as np


BOOTSTRAP = 10_000
# two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def paired_difference(a, b, seed=0):
    """(accuracy of a - accuracy of b, low, high) in points, the interval from resampling the test
    images with replacement."""
    a, b = _same_images(a, b)
    gains, losses = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return _bootstrap_mean(len(a), [1, -1, 0], [gains, losses, len(a) - gains - losses], seed)


def difference_of_gaps(a, a_ref, b, b_ref, seed=0):
    """(a - a_ref) - (b - b_ref) in points with its bootstrap interval: whether a change of protocol
    moves a gap (a and a_ref scored under one protocol, b and b_ref under the other), paired over the
    same test images. Each image scores an integer in -2..2."""
    return _bootstrap_scores(_gap_change(*_same_images(a, a_ref, b, b_ref)), seed)


def seed_mean_difference(pairs, seed=0):
    """(mean over seeds of accuracy(a) - accuracy(b), low, high) in points for pairs (a, b), one per
    seed, scored on the same test images. The interval resamples those images, the same draw for
    every seed. A t interval over seeds sees only how the seeds differ on this one test set, and with
    2 or 3 seeds that agree by chance it can be far narrower than the test set's own noise; this one
    covers that noise, and the seeds' spread only as far as these seeds show it."""
    correct = _same_images(*(c for pair in pairs for c in pair))
    return _seed_mean([a.astype(int) - b for a, b in zip(correct[::2], correct[1::2])], seed)


def seed_mean_gap_change(quads, seed=0):
    """difference_of_gaps averaged over seeds, for (a, a_ref, b, b_ref), one per seed, scored on the
    same test images; the interval resamples those images, the same draw for every seed."""
    correct = _same_images(*(c for quad in quads for c in quad))
    return _seed_mean([_gap_change(*correct[i:i + 4]) for i in range(0, len(correct), 4)], seed)


def _gap_change(a, a_ref, b, b_ref):
    """Per image, (a - a_ref) - (b - b_ref): an integer in -2..2."""
    return a.astype(int) - a_ref - (b.astype(int) - b_ref)


def _seed_mean(scores, seed):
    """The mean over seeds of per-image integer scores (one array per seed) with its bootstrap
    interval: the per-image sum over seeds is itself an integer score, so one draw covers all seeds."""
    return tuple(x / len(scores) for x in _bootstrap_scores(sum(scores), seed))


def _same_images(*correct):
    correct = [np.asarray(c, dtype=bool) for c in correct]
    if len({c.shape for c in correct}) > 1:
        raise ValueError(f"models scored on {' and '.join(str(len(c)) for c in correct)} images "
                         "cannot be paired")
    return correct


def _bootstrap_scores(scores, seed):
    """100 x the mean of per-image integer scores, with its bootstrap interval."""
    values, counts = np.unique(scores, return_counts=True)
    return _bootstrap_mean(len(scores), values, counts, seed)


def _bootstrap_mean(n, values, counts, seed):
    """100 x the mean score of n images, `counts[i]` of which score `values[i]`, with a 95% interval.
    Resampling the images with replacement only changes how many of each score are drawn, so the
    bootstrap draws those counts from a multinomial: the same distribution as resampling whole index
    vectors, at no cost."""
    values = np.asarray(values)
    draws = np.random.default_rng(seed).multinomial(n, np.asarray(counts) / n, size=BOOTSTRAP)
    low, high = np.percentile(100.0 * (draws @ values) / n, [2.5, 97.5])
    return 100.0 * float(np.dot(counts, values)) / n, float(low), float(high)


def over_seeds(differences):
    """(mean, low, high) of per-seed differences with a 95% t interval (None bounds for one seed)."""
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return mean, None, None
    half = T975[min(len(differences), len(T975) + 1) - 2] * statistics.stdev(differences) / len(
        differences) ** 0.5
    return mean, mean - half, mean + half


def bounds(mean, low, high):
    """The interval alone, for a column beside another interval of the same mean."""
    return f"[{low:+.2f}, {high:+.2f}]"


def describe(mean, low, high):
    if low is None:
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"
