"""Sharding over processes: which columns of the D-dimensional weight vectors this process keeps, and
the collectives over them."""
import functools
import math

import torch
import torch.distributed as dist

from .storage import QUANT_GROUP, Affine, Basis, write_into

try:  # a torch built without distributed support has no DTensor, and no FSDP model to follow
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:
    class DTensor:  # noqa: D101  (isinstance is then always false)
        pass

    class FSDPModule:  # noqa: D101
        pass

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
    hold whole quantisation groups (QUANT_GROUP entries) of the D-vector; a block of layer-wise
    TWA, which starts anywhere, gets its groups placed as one process would (see basis)."""

    follows_model = False  # see ModelSharding

    def __init__(self, dim, group=None):
        distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.per_rank = math.ceil(dim / self.world / QUANT_GROUP) * QUANT_GROUP
        self.lo = min(self.rank * self.per_rank, dim)
        self.hi = min(self.lo + self.per_rank, dim)
        self.dim = dim
        # (start, stop, rank) of every process's columns, and this process's
        self.owners = [(min(r * self.per_rank, dim), min((r + 1) * self.per_rank, dim), r)
                       for r in range(self.world) if r * self.per_rank < dim]
        self.pieces = [(self.lo, self.hi)]

    @property
    def local_size(self):
        """Entries this process keeps."""
        return sum(stop - start for start, stop in self.pieces)

    def local_slice(self, start, stop):
        """Entries [start, stop) of the D-vector, as a slice of this process's shard (maybe empty):
        the pieces are in increasing order, so the entries of a range are consecutive here too."""
        first = sum(min(max(start, lo), hi) - lo for lo, hi in self.pieces)
        last = sum(min(max(stop, lo), hi) - lo for lo, hi in self.pieces)
        return slice(first, max(first, last))

    def overlaps(self, offset, numel):
        """Where entries [offset, offset + numel) of the D-vector (one tensor's) lie in this shard:
        (first, stop) within the tensor and the position in the shard, for each piece it meets."""
        position = 0
        for lo, hi in self.pieces:
            first, stop = max(lo, offset), min(hi, offset + numel)
            if first < stop:
                yield first - offset, stop - offset, position + first - lo
            position += hi - lo

    def local_part(self, full):
        """This shard's entries of a whole D-vector."""
        return torch.cat([full[lo:hi] for lo, hi in self.pieces])

    def basis(self, capacity, block, bits, device):
        """Room for `capacity` rows over this process's entries of block = (start, stop) of the
        D-vector. At 8 and 4 bits on several processes, quantisation groups are placed as one
        process would place them (see GroupAligned): shards start where the D-vector's groups do,
        but a block of layer-wise TWA starts anywhere, and its groups count from its start."""
        if self.world == 1 or bits not in (8, 4):  # (Basis names a wrong format)
            columns = self.local_slice(*block)
            return Basis(capacity, columns.stop - columns.start, bits, device)
        segments, groups, local_group = self._group_layout(block)
        split = self._split_groups(block)
        mine = [(at, local_group[g]) for at, g in enumerate(split) if g in local_group]
        return GroupAligned(capacity, segments, groups, bits,
                            functools.partial(self._agree, len(split), mine), device)

    def _group_layout(self, block):
        """Where this process's entries of the block go among the groups that hold them: the
        segments (entry position, stored column, length), the number of groups, and the stored
        index of the first and last group of each piece, by group number within the block."""
        start, stop = block
        segments, groups, local_group, last, position = [], 0, {}, -1, 0
        for lo, hi in self.pieces:
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

    def _split_groups(self, block):
        """The groups of the block (numbered within it) that hold entries of several processes,
        the same list on every process."""
        start, stop = block
        inside = [(max(lo, start), rank) for lo, hi, rank in self.owners if lo < stop and hi > start]
        changes = [lo - start for (lo, rank), (_, before) in zip(inside[1:], inside) if rank != before]
        return sorted({at // QUANT_GROUP for at in changes if at % QUANT_GROUP})

    def _agree(self, count, mine, low, high):
        """low, high (rows x this process's groups) made the range over every process of each split
        group (`mine`: (index among the `count` split groups, stored index) of this process's): one
        all-reduce of 2 x rows x count values."""
        if count:
            shared = low.new_full((2, low.shape[0], count), -math.inf)
            slots, stored = [s for s, _ in mine], [g for _, g in mine]
            shared[0][:, slots], shared[1][:, slots] = -low[:, stored], high[:, stored]
            dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=self.group)
            low[:, stored], high[:, stored] = -shared[0][:, slots], shared[1][:, slots]
        return low, high


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


class ModelSharding(Sharding):
    """The columns of the basis follow the model's own shards (FSDP2: each parameter a DTensor
    split along its first dimension): this process keeps the entries of its local shard of every
    parameter, in parameter order, so that gradients and weights move between the model and the
    basis with no collective at all, and the basis' products sum k-sized pieces over the mesh."""
    follows_model = True

    def __init__(self, params):
        local = [p.to_local() for p in params]
        mesh = params[0].device_mesh
        if mesh.ndim != 1 or any(not _row_sharded(p) for p in params):
            raise ValueError("TWA follows FSDP2's sharding of each parameter along its first "
                             "dimension (fully_shard on a 1-D mesh); this model is sharded otherwise")
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        self.dim = sum(p.numel() for p in params)
        self.owners, offset = [], 0  # (start, stop, rank) of every process's shard of every parameter
        for p, part in zip(params, local):
            row = p.numel() // max(p.shape[0], 1)
            for rank in range(self.world):
                lo, hi = (_first_row(p.shape[0], self.world, r) * row for r in (rank, rank + 1))
                if rank == self.rank and hi - lo != part.numel():
                    raise ValueError(f"a local shard of {part.numel()} entries where FSDP2's split "
                                     f"along the first dimension gives {hi - lo}")
                if lo < hi:
                    self.owners.append((offset + lo, offset + hi, rank))
            offset += p.numel()
        self.pieces = [(lo, hi) for lo, hi, rank in self.owners if rank == self.rank]

    def gather_(self, full, part):
        raise RuntimeError("a basis that follows the model's shards never gathers weights")

    scatter_sum_ = gather_


def sharding_of(params, group=None):
    """How a basis for these (name, parameter) pairs is split over the processes: along the model's
    own shards for an FSDP2 model (DTensor parameters), else by columns over `group`."""
    tensors = [p for _, p in params]
    if any(isinstance(p, DTensor) for p in tensors):
        if group is not None:
            raise ValueError("an FSDP2 model's basis follows its own device mesh: give no group")
        return ModelSharding(tensors)
    return Sharding(sum(p.numel() for p in tensors), group)


def _row_sharded(p):
    return len(p.placements) == 1 and getattr(p.placements[0], "dim", None) == 0


def _first_row(rows, world, rank):
    """The first row of `rank`'s shard under torch.chunk's split (FSDP2's)."""
    per = math.ceil(rows / world)
    return min(rank * per, rows)


class GroupAligned(Affine):
    """An 8 or 4-bit basis of a block that the processes split at places that need not fall
    between its quantisation groups (FSDP2's shards of each parameter; column shards, which start
    at the D-vector's groups, across a block of layer-wise TWA, whose groups count from its own
    start). It stores the groups that hold this process's entries, each entry at its place in its
    group as one process storing the whole block would put it, and leaves holes where a group's
    other entries live on other processes; a group split between processes
    takes the range of all its entries (`agree`, a collective, once per stored row). Every entry then
    gets the code, scale and offset one process would give it, so that the weights match one
    process's to float32 rounding at any world size (the groups of this process's entries alone
    differed by the 8-bit rounding, 3e-4 of the weights).

    segments: (position among this process's entries of the block, stored column, length) for each
    run of entries; agree(low, high) returns each group's range over all processes given this
    process's (both rows x groups)."""

    def __init__(self, capacity, segments, groups, bits, agree, device="cpu"):
        super().__init__(capacity, groups * QUANT_GROUP, bits, device)
        self.segments, self.agree = segments, agree
        self.holes = _complement([(at, at + n) for _, at, n in segments], self.dim)
        self.spread = torch.zeros(self.dim, device=device)  # a vector at its stored columns

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
        low = torch.empty(mix.shape[1], self.dim // QUANT_GROUP, device=self.device)
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
