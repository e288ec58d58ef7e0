"""Building the span: Gram-Schmidt over generators streamed one at a time, so that only the basis
itself is ever held in memory.

Two generator schemes share one loop (add_generator, SpanBuilder.add) and one finish
(SpanBuilder.finish):
- anchored, over checkpoint files (from_checkpoints) and while training records weights
  (recorder.SubspaceRecorder): w_1, then w_i - w_1 for every i. Differences of nearby float32
  checkpoints are exact, so every checkpoint lies in the span to working precision; a low-precision
  basis rounds deviations from w_1 rather than whole weight vectors (bar the first row) and projects
  each generator from where the one before it lies (SpanBuilder.known_part). A checkpoint then
  misses rounded rows by the rounding of its own step (generators chained to the previous
  checkpoint, w_i - w_{i-1}, would add up the roundings of all the steps before it);
- raw, the reference's one pass (reference_from_checkpoints): the checkpoints themselves.
A Scheme says what the generators are in terms of the checkpoints and back; finish turns that into
the Block's checkpoint coordinates, mean coordinates m and to_alpha."""
import logging
import numbers
import os
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .checkpoints import (basis_device, check_readable, describe, is_int, layout,
                          trainable_parameters)
from .sharding import sharding_of
from .storage import QUANT_GROUP
from .subspace import Block, Subspace

log = logging.getLogger("twa")

# Blocks of layer-wise TWA smaller than this stay in float32 whatever the storage precision: they cost
# little, and a rounded basis of a block with fewer entries than checkpoints would never reach a
# residual below the tolerance, so it would keep adding rows past the block's own dimension.
SMALL_BLOCK = 16 * QUANT_GROUP


def parameter_blocks(params, min_size=None):
    """Consecutive groups of the trainable parameters, as (start, stop, names) entry ranges of the
    flat weight vector; each checkpoint gets one coefficient per block. min_size None: one block of
    everything (the ICLR method); S >= 0: the journal code's layer-wise grouping, where a tensor
    starts a new block once the current block holds more than S entries (so S = 0: one block per
    tensor), and the last block keeps whatever remains."""
    if min_size is None:
        return [(0, sum(p.numel() for _, p in params), [name for name, _ in params])]
    if not is_int(min_size):
        raise TypeError(f"layer_size must be None or an int, not {type(min_size).__name__}")
    if min_size < 0:
        raise ValueError(f"layer_size must be None or >= 0, not {min_size}")
    blocks, offset = [], 0
    for name, p in params:
        if not blocks or blocks[-1][1] - blocks[-1][0] > min_size:
            blocks.append([offset, offset, []])
        blocks[-1][1] += p.numel()
        blocks[-1][2].append(name)
        offset += p.numel()
    return [tuple(block) for block in blocks]


class Scheme(NamedTuple):
    """How a span's generators relate to the n checkpoints: `generators` (m x n) writes generator j
    as a combination of the checkpoints, `points` (n x m) each checkpoint as a combination of the
    generators, and `mean` (m) the point the weights start from at c = m (the stored mean) as one."""
    generators: torch.Tensor
    points: torch.Tensor
    mean: torch.Tensor


def anchored(n):
    """Generators: w_1, then w_i - w_1; the mean point is the mean of the checkpoints."""
    generators = torch.eye(n, dtype=torch.float64)
    generators[1:, 0] = -1.0
    points = torch.eye(n, dtype=torch.float64)
    points[1:, 0] = 1.0
    return Scheme(generators, points, points.mean(0))


def raw(n):
    """Generators: the checkpoints themselves (the reference's pass)."""
    eye = torch.eye(n, dtype=torch.float64)
    return Scheme(eye, eye, torch.full((n,), 1.0 / n, dtype=torch.float64))


def orthogonalise_(basis, w, shard):
    """Remove from w (in place) its components along the stored rows; classical Gram-Schmidt run
    twice, which keeps the basis orthogonal to working precision even for nearly parallel vectors
    (one pass loses orthogonality in proportion to the angle's condition number).
    Returns the coordinates removed (float64) and the norm of what is left."""
    coords = torch.zeros(basis.rows, dtype=torch.float64, device=basis.device)
    for _ in range(2 if basis.rows else 0):
        h = shard.sum_(basis.matvec(w, float64_sums=True))
        basis.rmatvec(h, out=w, accumulate=True, alpha=-1.0)
        coords += h
    return coords, shard.norm(w)


# The rule by which SpanBuilder.add leaves a generator out of a rounded basis, named in recorder
# states: one recorded under another rule resumes (its generators and coordinates mean the same),
# but keeps out what that rule left out.
DROP_RULE = "within 4x the rounding of the rows it combines"


class SpanBuilder:
    """Gram-Schmidt over the generators of one block, fed one at a time: each is orthogonalised
    against the rows so far, and its direction kept unless it is (nearly) in their span."""

    def __init__(self, capacity, generators, shard, block, bits, device, names):
        """block: the (start, stop) entries of the D-vector that it spans."""
        self.shard_slice, self.names = shard.local_slice(*block), names
        self.entries = block[1] - block[0]
        self.basis = shard.basis(min(capacity, self.entries), block, bits, device)
        self.coords = torch.zeros(generators, capacity, dtype=torch.float64)  # generator j in the rows
        self.kept, self.dropped = [], []
        self.largest = 0.0  # the largest checkpoint norm seen in this block

    def add(self, j, w, norm, shard, tol, previous=None):
        """Orthogonalise generator j (w, modified in place; norm: of the checkpoint it came from;
        previous: the generator that w is one checkpoint step from, if any) and keep its direction
        unless it is within tol times the block's largest checkpoint norm of the rows' span (a
        floor that does not vanish where one checkpoint's tensor is all zero, e.g. a bias at
        initialisation), or, for a rounded basis, within 4 times what the rows' rounding would
        leave of it were it a combination of the earlier generators (rounding_left)."""
        self.largest = max(self.largest, norm)
        known = self.known_part(w, previous)
        removed, residual = orthogonalise_(self.basis, w, shard)
        self.coords[j, :self.basis.rows] = known + removed.cpu()
        if self.basis.rows == self.entries:  # a block with fewer entries than checkpoints is full
            return
        if residual <= tol * self.largest + 4 * self.rounding_left(j, shard) or residual == 0.0:
            self.dropped.append((j, residual / max(self.largest, 1e-300)))
            return
        self._append(j, w, residual)

    def _append(self, j, w, residual):
        self.coords[j, self.basis.rows] = residual
        self.basis.append(w.div_(residual))
        self.kept.append(j)

    def known_part(self, w, previous):
        """Remove from w (in place), for a rounded basis, the rows' part of generator `previous`
        (whose coordinates are known), so that only the step between them and what the rows
        missed of `previous` is projected; returns the coordinates removed. Gram-Schmidt run twice
        against rows Q that rounding left off orthonormal leaves (QQ^T - I)^2 h of the part h it
        projects, which the new row then stores, bending the rows further the same way: anchored
        generators w_j - w_1 grow along a trajectory while their steps do not, and projected whole
        they bend the 4-bit rows of a 50-step random walk (blocks of 4,160 entries) until singular.
        Float32 rows are orthonormal to working precision: their generators are projected whole."""
        rows = self.basis.rows
        if previous is None or self.basis.bits == 32:
            return torch.zeros(rows, dtype=torch.float64)
        known = self.coords[previous, :rows].clone()
        self.basis.rmatvec(known.to(self.basis.device), out=w, accumulate=True, alpha=-1.0)
        return known

    def rounding_left(self, j, shard):
        """How far generator j would lie off the stored rows' span if it were a combination
        sum_i beta_i g_i of the kept generators (0 for a float32 basis). Kept generator i is its
        coordinates over the earlier rows plus its residual r_i times a unit row, which storing
        rounded by e_i: so g_i lies |r_i| |e_i| off the span, whatever its length, and the
        combination about sqrt(sum_i (beta_i |r_i| |e_i|)^2) off (the rows round independently),
        beta solving beta R = j's coordinates for the kept generators' coordinates R (lower
        triangular). Measured on random walks at 4, 8 and 16 bits: duplicates, means and mixtures
        of earlier checkpoints leave 0.97 to 1.02 times this, a new step at least 8.6 times it.
        (A bound in |g_j| instead, where anchored generators grow along a trajectory and their new
        parts do not, leaves most checkpoints of a long walk out at 4 bits.)"""
        rows = self.basis.rows
        if self.basis.bits == 32 or not rows:
            return 0.0
        r = self.coords[self.kept, :rows]
        beta = torch.linalg.solve_triangular(r.t(), self.coords[j, :rows, None], upper=True)[:, 0]
        errors = shard.sum_(self.basis.rounding[:rows].clone()).sqrt().cpu()
        return (beta * r.diagonal() * errors).norm().item()

    def finish(self, scheme):
        """The Block of the generators streamed so far, related to the checkpoints by `scheme`:
        the checkpoints' coordinates, the mean coordinates m = the stored mean's, and to_alpha."""
        k, m = self.basis.rows, len(scheme.generators)
        coords = self.coords[:m, :k]
        # Kept generators = R P with R lower triangular, so P = R^-1 G W (G: generators in terms of
        # the checkpoints W) and P^T x = W^T G^T R^-T x: a step x in coordinates is G^T R^-T x in alpha.
        r_inv_t = torch.linalg.solve_triangular(coords[self.kept].t(),
                                                torch.eye(k, dtype=torch.float64), upper=True)
        to_alpha = scheme.generators[self.kept].t() @ r_inv_t
        return Block(self.basis, self.shard_slice, scheme.points @ coords, scheme.mean @ coords,
                    to_alpha, self.names, self.entries)


class OnePassBuilder(SpanBuilder):
    """The reference's pass: classical Gram-Schmidt once, float32 products, only an exactly
    dependent checkpoint left out (the reference would divide by zero)."""

    def add(self, j, w, norm, shard, tol=0.0):
        h = shard.sum_(self.basis.matvec(w))
        self.basis.rmatvec(h, out=w, accumulate=True, alpha=-1.0)
        residual = shard.norm(w)
        self.coords[j, :self.basis.rows] = h.cpu()
        if self.basis.rows == self.entries:  # fewer entries than checkpoints: the basis is full
            return
        if residual == 0.0:
            self.dropped.append((j, 0.0))
            return
        self._append(j, w, residual)


def span_builders(blocks, capacity, generators, shard, bits, device, builder=SpanBuilder):
    """One builder per block; small blocks of several stay in float32."""
    return [builder(capacity, generators, shard, (start, stop),
                    32 if len(blocks) > 1 and stop - start < SMALL_BLOCK else bits, device, names)
            for start, stop, names in blocks]


def add_generator(builders, j, w, anchor, shard, tol):
    """Stream checkpoint j (this shard of its weights w, overwritten) into every block's builder as
    the anchored scheme's generator: w itself for j = 0 (copied into `anchor`), else w - anchor,
    which from j = 2 on is generator j - 1 plus one checkpoint step."""
    norms = [shard.norm(w[b.shard_slice]) for b in builders]  # of the checkpoint, per block
    if j == 0:
        anchor.copy_(w)
    else:
        w -= anchor
    for builder, norm in zip(builders, norms):
        builder.add(j, w[builder.shard_slice], norm, shard, tol, j - 1 if j > 1 else None)


def from_checkpoints(model, checkpoints, bits=32, tol=1e-5, device=None, progress=None, group=None,
                     layer_size=None):
    """The Subspace of checkpoints (files or state_dicts of `model`), streamed one at a time in two
    passes (the mean, then the basis). layer_size: see parameter_blocks (None: one coefficient per
    checkpoint). A checkpoint that, up to `tol` times its norm, lies in the span of the earlier
    checkpoints (within a block) adds no direction there and is left out with a warning.
    progress(iterable, description) may wrap the passes (e.g. tqdm). Under torch.distributed every
    process of `group` keeps one column shard (see Sharding)."""
    check_tolerance(tol)
    params, device, sources, names, wrap, shard, mean = _first_pass(model, checkpoints, device,
                                                                    progress, group)
    n = len(sources)
    builders = span_builders(parameter_blocks(params, layer_size), n, n, shard, bits, device)
    w, anchor = torch.empty_like(mean), torch.empty_like(mean)
    for j in wrap(range(n), "orthonormal basis"):
        shard.read(sources[j], params, names[j], out=w)
        add_generator(builders, j, w, anchor, shard, tol)
    warn_dropped(builders, lambda j: names[j], n)
    scheme = anchored(n)
    return Subspace([b.finish(scheme) for b in builders], mean, names, shard, layout(params))


def check_tolerance(tol):
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a number in (0, 1), not {type(tol).__name__}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must lie in (0, 1), not {tol}: a checkpoint's residual is measured "
                         "relative to its norm")


def reference_from_checkpoints(model, checkpoints, device=None, progress=None, group=None):
    """The ICLR code's basis, kept as an ablation: ONE pass of classical Gram-Schmidt in float32
    over the raw (not centred) checkpoints. In the tail, where checkpoints are nearly parallel,
    its rows drift far from orthonormal, and the reference's weight-space update P^T P g is then
    a preconditioned projection, not the projector onto the span.

    Written as coordinates: w_j = sum_i L_ji p_i (L lower triangular, recorded during the pass)
    and the weights are mean + P^T (c - mean of L's rows). SGD on c with gradient P g and weight
    decay on c is then the reference's SGD on w with gradient P^T P g and weight decay on w, step
    for step (both stay in the row space of P; they differ only by float rounding). The rounding
    it amplifies depends on the order of float32 sums, so it differs with the number of processes
    (each sums its shard first)."""
    params, device, sources, names, wrap, shard, mean = _first_pass(model, checkpoints, device,
                                                                    progress, group)
    n = len(sources)
    builder, = span_builders(parameter_blocks(params), n, n, shard, 32, device, OnePassBuilder)
    w = torch.empty(shard.local_size, dtype=torch.float32, device=device)
    for j in wrap(range(n), "one-pass Gram-Schmidt (reference)"):
        shard.read(sources[j], params, names[j], out=w)
        builder.add(j, w, None, shard)
    for j, _ in builder.dropped:
        log.warning("%s adds no new direction; left out of the reference basis", names[j])
    return Subspace([builder.finish(raw(n))], mean, names, shard, layout(params))


@torch.no_grad()
def combination_residual(space, model, checkpoints, alpha):
    """How far sum_i alpha_bi w_i (alpha: blocks x n, from checkpoint_coefficients) misses the
    model's trainable weights w: {"miss": |sum - w|, "move": |w - mean|, "relative": miss / move}.
    About float32 rounding for a 32-bit basis; for a rounded one about its precision, since w lies
    in mean + the stored rows' span, which only approximates the checkpoints'. Streams the
    checkpoints once more (every process its shard)."""
    params, shard = trainable_parameters(model), space.shard
    space.check_model(params)
    checkpoints, alpha = list(checkpoints), torch.as_tensor(alpha)
    if tuple(alpha.shape) != (len(space.blocks), len(checkpoints)):
        raise ValueError(f"alpha must be {len(space.blocks)} x {len(checkpoints)} (blocks x "
                         f"checkpoints), not {tuple(alpha.shape)}")
    w = shard.current(params, "the model's weights").to(space.device)
    total = torch.zeros(shard.local_size, dtype=torch.float64, device=space.device)
    buffer = torch.empty(shard.local_size, dtype=torch.float32, device=space.device)
    for i, source in enumerate(checkpoints):
        x = shard.read(source, params, describe(source, i), out=buffer)
        for block, a in zip(space.blocks, alpha):
            total[block.shard_slice].add_(x[block.shard_slice], alpha=float(a[i]))
    miss = shard.norm(total - w.double())
    move = shard.norm(w.double() - space.mean.double())
    return {"miss": miss, "move": move, "relative": miss / move if move > 0 else None}


def warn_dropped(builders, describe_generator, n):
    """describe_generator(j): what generator j is, for the log; n: generators per block."""
    if len(builders) == 1:
        bits = builders[0].basis.bits
        rounded = f", or within the rounding of a {bits}-bit basis" if bits < 32 else ""
        for j, relative in builders[0].dropped:
            log.warning("%s adds no new direction (relative residual %.1e%s); left out of the basis",
                        describe_generator(j), relative, rounded)
        return
    hit = [b for b in builders if b.dropped]
    if hit:
        log.warning("%d of %d block directions add nothing new and are left out of the basis (the "
                    "first: %s in the block of %s)", sum(len(b.dropped) for b in hit),
                    len(builders) * n, describe_generator(hit[0].dropped[0][0]), hit[0].names[0])


def _first_pass(model, checkpoints, device, progress, group):
    """What every construction from checkpoints starts from: the trainable parameters, the device,
    the checkpoints (each checked readable before any long work) with their names, the progress
    wrapper, this process's column shard and its part of the checkpoints' mean (the first pass)."""
    params = trainable_parameters(model)
    device = basis_device(device, params)
    if isinstance(checkpoints, (str, bytes, os.PathLike, Mapping)):  # list() would split it up
        raise ValueError(f"checkpoints must be a list of files or state_dicts, not one "
                         f"{type(checkpoints).__name__}: pass [it]")
    sources = list(checkpoints)
    if not sources:
        raise ValueError("no checkpoints given")
    for source in sources:
        if not isinstance(source, Mapping):
            check_readable(source)  # fail before any long work, naming the file
    names = [describe(s, i) for i, s in enumerate(sources)]
    wrap = progress or (lambda items, desc: items)
    shard = sharding_of(params, group)
    mean = _mean_of(sources, params, device, wrap, shard, shard.untrained_entries(model, device))
    return params, device, sources, names, wrap, shard, mean


def _mean_of(sources, params, device, wrap, shard, untrained):
    """This shard of the checkpoints' mean, accumulated in float64 on `device`; each checkpoint's
    untrained entries compared with the model's on the way (UntrainedEntries)."""
    total = torch.zeros(shard.local_size, dtype=torch.float64, device=device)
    w = torch.empty(shard.local_size, dtype=torch.float32, device=device)
    for i, source in enumerate(wrap(sources, "mean of the checkpoints")):
        total += shard.read(source, params, describe(source, i), out=w, untrained=untrained)
    untrained.check()
    return total.div_(len(sources)).float()
