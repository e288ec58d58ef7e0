"""Low-bit bases split between processes at places that need not fall between quantisation groups:
each entry gets the code, scale and offset that one process storing the whole block would give it,
so that 1 and N processes train the same weights to float32 rounding, on either sharding route."""
import functools
import math

import torch
import torch.distributed as dist

from .storage import QUANT_GROUP, Affine, write_into


def aligned_basis(shard, capacity, block, bits, device):
    """Room for `capacity` rows of an 8 or 4-bit basis over `shard`'s entries of block = (start, stop)
    of the D-vector, its quantisation groups counted from the block's start (see GroupAligned)."""
    segments, groups, local_group = _group_layout(shard.pieces, block)
    split = _split_groups(shard.owners, block)
    mine = [(at, local_group[g]) for at, g in enumerate(split) if g in local_group]
    return GroupAligned(capacity, segments, groups, bits,
                        functools.partial(_agree, shard.group, len(split), mine), device)


def _group_layout(pieces, block):
    """Where this process's entries of the block go among the groups that hold them: the
    segments (entry position, stored column, length), the number of groups, and the stored
    index of the first and last group of each piece, by group number within the block."""
    start, stop = block
    segments, groups, local_group, last, position = [], 0, {}, -1, 0
    for lo, hi in pieces:
        lo, hi = max(lo, start), min(hi, stop)
        if lo >= hi:
            continue
        first_group, last_group = (lo - start) // QUANT_GROUP, (hi - 1 - start) // QUANT_GROUP
        index = groups - 1 if first_group == last else groups  # a group shared with the last piece
        segments.append((position, index * QUANT_GROUP + (lo - start) % QUANT_GROUP, hi - lo))
        local_group[first_group] = index
        local_group[last_group] = index + last_group - first_group
        groups, last, position = index + last_group - first_group + 1, last_group, position + hi - lo
    return segments, groups, local_group


def _split_groups(owners, block):
    """The groups of the block (numbered within it) that hold entries of several processes,
    the same list on every process."""
    start, stop = block
    inside = [(max(lo, start), rank) for lo, hi, rank in owners if lo < stop and hi > start]
    changes = [lo - start for (lo, rank), (_, before) in zip(inside[1:], inside) if rank != before]
    return sorted({at // QUANT_GROUP for at in changes if at % QUANT_GROUP})


def _agree(group, count, mine, low, high):
    """low, high (rows x this process's groups) made the range over every process of each split
    group (`mine`: (index among the `count` split groups, stored index) of this process's): one
    all-reduce of 2 x rows x count values."""
    if count:
        shared = low.new_full((2, low.shape[0], count), -math.inf)
        slots, stored = [s for s, _ in mine], [g for _, g in mine]
        shared[0][:, slots], shared[1][:, slots] = -low[:, stored], high[:, stored]
        dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=group)
        low[:, stored], high[:, stored] = -shared[0][:, slots], shared[1][:, slots]
    return low, high


class GroupAligned(Affine):
    """An 8 or 4-bit basis of a block that the processes split at places that need not fall
    between its quantisation groups (FSDP2's shards of each parameter; column shards, which start
    at the D-vector's groups, across a block of layer-wise TWA, whose groups count from its own
    start). It stores the groups that hold this process's entries, each entry at its place in its
    group as one process storing the whole block would put it, and leaves holes where a group's
    other entries live on other processes; a group split between processes takes the range of all
    its entries (`agree`, a collective, once per stored row). Every entry then gets the code, scale
    and offset one process would give it, so that the weights match one process's to float32
    rounding at any world size (groups of this process's entries alone would differ by the 8-bit
    rounding, 3e-4 of the weights).

    segments: (position among this process's entries of the block, stored column, length) for each
    run of entries; agree(low, high) returns each group's range over all processes given this
    process's (both rows x groups)."""

    def __init__(self, capacity, segments, groups, bits, agree, device="cpu"):
        super().__init__(capacity, groups * QUANT_GROUP, bits, device)
        self.segments, self.agree = segments, agree
        self.holes = _complement([(at, at + n) for _, at, n in segments], self.dim)
        # a vector at its stored columns
        self.spread = torch.zeros(self.dim, dtype=torch.float32, device=device)

    def scratch(self):
        return [self.spread]

    def _spread(self, v):
        """v (this process's entries of the block) at the stored columns, zero in the holes."""
        for position, at, n in self.segments:
            self.spread[at:at + n] = v[position:position + n]
        for start, stop in self.holes:
            self.spread[start:stop] = 0.0
        return self.spread

    def _owned(self):
        owned = torch.zeros(self.dim, dtype=torch.bool, device=self.device)
        for _, at, n in self.segments:
            owned[at:at + n] = True
        return owned

    def append(self, row):
        values, owned = self._spread(row), self._owned()
        low, high = self.agree(*_ranges(values[None], owned))
        for start, stop in self.chunks():
            groups = slice(start // QUANT_GROUP, stop // QUANT_GROUP)
            self.store(self.rows, start, stop, values[start:stop], (low[0, groups], high[0, groups]),
                       owned[start:stop])
        self.rows += 1

    def matvec(self, v, float64_sums=False):
        return super().matvec(self._spread(v), float64_sums)

    def rmatvec(self, c, out, accumulate=False, alpha=1.0):
        product = super().rmatvec(c, self.spread)
        for position, at, n in self.segments:
            write_into(out[position:position + n], product[at:at + n], accumulate, alpha)
        return out

    def gram(self, owned=None):
        return super().gram(self._owned())

    def mix_rows_(self, mix, bounds=None, owned=None):
        """Two passes over the columns: the new rows' ranges, agreed, then the new rows."""
        mix = mix.to(device=self.device, dtype=torch.float32)
        owned = self._owned()
        low = torch.empty(mix.shape[1], self.dim // QUANT_GROUP, dtype=torch.float32,
                          device=self.device)
        high = torch.empty_like(low)
        for start, stop in self.chunks():
            groups = slice(start // QUANT_GROUP, stop // QUANT_GROUP)
            low[:, groups], high[:, groups] = _ranges(mix.t() @ self.as_float32(start, stop),
                                                      owned[start:stop])
        super().mix_rows_(mix, self.agree(low, high), owned)


def _ranges(rows, owned):
    """Each group's (low, high) over the owned columns of `rows` (m x columns): m x groups each."""
    grouped, mask = rows.view(rows.shape[0], -1, QUANT_GROUP), owned.view(-1, QUANT_GROUP)
    return grouped.masked_fill(~mask, math.inf).amin(2), grouped.masked_fill(~mask, -math.inf).amax(2)


def _complement(ranges, size):
    """The parts of [0, size) outside the given increasing, disjoint ranges."""
    edges = [0] + [edge for pair in ranges for edge in pair] + [size]
    return [(a, b) for a, b in zip(edges[0::2], edges[1::2]) if a < b]
