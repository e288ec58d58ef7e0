"""Sharding over processes: which columns of the D-dimensional weight vectors this process keeps, and
the collectives over them."""
import math

import torch
import torch.distributed as dist

from .storage import QUANT_GROUP

# the current names of the single-tensor collectives, and those of torch releases before them
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or \
    getattr(dist, "reduce_scatter_tensor", None)


class Sharding:
    """The columns [lo, hi) of the D-dimensional weight vectors that this process keeps.

    With N processes (torch.distributed initialised) the basis is split by columns: each rank
    stores about D/N entries of every row, and the full k x D basis never exists anywhere. Every
    product with the basis is then a sum of per-shard products, so the basis' own products move
    only k-sized sums between processes; a training step (TWA.step) adds one D-sized
    reduce-scatter of the gradient and one D-sized all-gather of the new weights, about the traffic
    of DDP's one all-reduce. Columns rather than rows: rows would need the whole D-sized gradient
    and weights to meet every rank's rows, and rank deficiency would leave shards uneven. Shards
    hold whole quantisation groups (QUANT_GROUP entries), so that a low-bit basis splits cleanly."""

    def __init__(self, dim, group=None):
        distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.per_rank = math.ceil(dim / self.world / QUANT_GROUP) * QUANT_GROUP
        self.lo = min(self.rank * self.per_rank, dim)
        self.hi = min(self.lo + self.per_rank, dim)
        self.dim = dim

    @property
    def local_size(self):
        """Entries this process keeps (hi - lo)."""
        return self.hi - self.lo

    def local_slice(self, start, stop):
        """Entries [start, stop) of the D-vector, as a slice of this process's shard (maybe empty)."""
        lo, hi = min(max(start, self.lo), self.hi), max(min(stop, self.hi), self.lo)
        return slice(lo - self.lo, max(lo, hi) - self.lo)

    def sum_(self, tensor):
        """Sum over the processes, in place (k-sized tensors only)."""
        if self.world > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def norm(self, part):
        """The norm of a vector from its shards (`part`: this process's)."""
        square = torch.linalg.vector_norm(part, dtype=torch.float64).square().reshape(1)
        return self.sum_(square).sqrt().item()

    def gather_(self, full, part):
        """full[:D] = the concatenated shards; `full` holds world x per_rank entries, `part`
        (this process's) per_rank (its tail past hi - lo is ignored)."""
        _all_gather(full, part, group=self.group)

    def scatter_sum_(self, part, full):
        """part = this process's shard of `full` summed over the processes (the reverse of gather_:
        `full` holds world x per_rank entries, `part` per_rank)."""
        _reduce_scatter(part, full, group=self.group)
        return part
