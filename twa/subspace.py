"""The subspace's algebra: a Block per group of parameters (an orthonormal basis P of the block's
part of the checkpoints' span, with the checkpoints' coordinates), and Subspace, which writes the
weights as mean + P^T (c - m) over all the blocks. Reads no files: twa.build makes these."""
import math

import torch

from .checkpoints import check_layout, is_int
from .sharding import ColumnSharding


class Block:
    """The span of the checkpoints restricted to one block of parameters: an orthonormal basis P
    (k x this process's entries of the block, rows kept in a storage format), the coordinates of the
    checkpoints (n x k) and of the mean m (k), and to_alpha (n x k), which maps a step c - m in
    coordinates to the averaging coefficients of the checkpoints (alpha = 1/n + to_alpha (c - m)).
    What m and the checkpoints' coordinates are exactly depends on how the span was built; build.py's
    SpanBuilder.finish says. `shard_slice` is the block's slice of this process's shard of the weight
    vector; `entries` counts the block's entries over all processes."""

    def __init__(self, basis, shard_slice, checkpoint_coords, mean_coords, to_alpha, names=(),
                 entries=None):
        self.basis, self.shard_slice, self.names = basis, shard_slice, list(names)
        self.entries = basis.dim if entries is None else entries
        # on the basis' device, so that a training step never copies between host and device
        self.checkpoint_coords = checkpoint_coords.to(basis.device)
        self.mean_coords = mean_coords.to(basis.device)
        self.to_alpha = to_alpha.to(basis.device)

    @property
    def rank(self):
        return self.basis.rows


class Subspace:
    """The weights sum_b sum_i alpha_bi w_i|b that the checkpoints w_i span, block by block, written
    as mean + P^T (c - P mean).

    The mean is kept in float32. P is block-diagonal: each block b of parameters
    (one block for the ICLR method, one per layer group for layer-wise TWA) has its own span (a Block,
    with orthonormal rows over the block's entries), and c concatenates their coordinates. Storing P
    in 16, 8 or 4 bits then perturbs only the deviation from the mean, never the mean itself.

    `names` names the checkpoints; `layout` (checkpoints.layout) the trainable parameters it was
    built for, which check_model compares a model's against (None: their total size only)."""

    @staticmethod
    def from_checkpoints(model, checkpoints, bits=32, tol=1e-5, device=None, progress=None,
                         group=None, layer_size=None):
        """The Subspace of `checkpoints` (files, folders or state_dicts of `model`), streamed one at
        a time: see twa.build.from_checkpoints, where reading them lives (this module reads no
        files)."""
        from .build import from_checkpoints  # build imports this module
        return from_checkpoints(model, checkpoints, bits, tol, device, progress, group, layer_size)

    @staticmethod
    def reference_from_checkpoints(model, checkpoints, device=None, progress=None, group=None):
        """The ICLR code's one-pass basis, kept as an ablation: see
        twa.build.reference_from_checkpoints."""
        from .build import reference_from_checkpoints
        return reference_from_checkpoints(model, checkpoints, device, progress, group)

    def __init__(self, blocks, mean, names, shard=None, layout=None):
        self.blocks, self.mean, self.names, self.layout = blocks, mean, names, layout
        self.shard = shard or ColumnSharding(mean.numel())
        self.device = mean.device
        self.revision = 0  # counts the rotations of the basis: a TWA's coordinates follow none
        self._index_blocks()

    def _index_blocks(self):
        """Where each block's coordinates sit in c, and the coordinates of the mean (kept, since
        every training step needs them)."""
        sizes = [block.rank for block in self.blocks]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.mean_coords = self._concat(block.mean_coords for block in self.blocks)

    @property
    def rank(self):
        return self.offsets[-1]

    def _concat(self, pieces):
        return torch.cat([p.reshape(-1) for p in pieces]) if self.blocks else \
            torch.zeros(0, dtype=torch.float64, device=self.device)

    def check_model(self, params):
        """Refuse (name, parameter) pairs other than those the subspace was built for."""
        dim = sum(p.numel() for _, p in params)
        if dim != self.shard.dim:
            raise ValueError(f"the model has {dim} trainable parameters, the subspace {self.shard.dim}")
        if self.layout is not None:
            check_layout(self.layout, params, "the subspace")

    def checkpoint_index(self, start):
        """`start` checked as the number of a checkpoint, in [0, n). A negative number is refused,
        not counted from the end: the scripts' --train_start -1 means the mean, start="mean" here."""
        if isinstance(start, str):
            raise ValueError(f"start must be 'mean' or a checkpoint number, not {start!r}")
        if not is_int(start):
            raise TypeError(f"start must be 'mean' or a checkpoint number, not {type(start).__name__}")
        if not 0 <= start < len(self.names):
            raise ValueError(f"start={start} is no checkpoint: they are numbered 0 to "
                             f"{len(self.names) - 1}" + (" (the mean is start='mean')" if start < 0
                                                         else ""))
        return int(start)

    def coordinates(self, c, name="c"):
        """c as float64 on the subspace's device; refused unless it holds exactly `rank` values (a
        0-d or other-length tensor would broadcast). Reads shapes only: no copy to the host."""
        if not torch.is_tensor(c):
            raise TypeError(f"{name} must be a tensor of {self.rank} coordinates, not "
                            f"{type(c).__name__}")
        if tuple(c.shape) != (self.rank,):
            raise ValueError(f"{name} must hold the subspace's {self.rank} coordinates, not a "
                             f"tensor of shape {tuple(c.shape)}")
        return c.detach().to(device=self.device, dtype=torch.float64)

    def _whole_vector(self, w, name):
        """w refused unless it is a vector of all D entries (a shorter one would broadcast)."""
        if not torch.is_tensor(w) or tuple(w.shape) != (self.shard.dim,):
            raise ValueError(f"{name} must be a vector of the model's {self.shard.dim} trainable "
                             f"weights, not {tuple(w.shape) if torch.is_tensor(w) else type(w).__name__}")
        return w

    def _pieces(self, c):
        """c split into the blocks' coordinates."""
        return [c[a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    def nbytes(self):
        return sum(block.basis.nbytes() for block in self.blocks)

    def to_principal_components(self, n_components):
        """Keep only the top principal directions of the centred checkpoints (the DLDR subspace), in
        each block: mean + their span. They lie in the span, so this is a rotation of P; nothing is
        reloaded. Returns the fraction of the checkpoints' variance that the kept directions explain."""
        largest = max(block.rank for block in self.blocks)
        if not is_int(n_components):
            raise TypeError(f"n_components must be an int, not {type(n_components).__name__}")
        if not 1 <= n_components <= largest:
            raise ValueError(f"n_components must be in [1, {largest}], not {n_components}")
        kept = total = 0.0
        for block in (block for block in self.blocks if block.rank):
            m = min(n_components, block.rank)
            centred = block.checkpoint_coords - block.mean_coords
            _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
            directions = vh[:m].t()  # k x m
            block.basis.mix_rows_(directions)
            block.checkpoint_coords = block.checkpoint_coords @ directions
            block.mean_coords = block.mean_coords @ directions
            block.to_alpha = block.to_alpha @ directions
            energy = singular.square()
            kept, total = kept + energy[:m].sum().item(), total + energy.sum().item()
        self.revision += 1
        self._index_blocks()
        return kept / max(total, 1e-300)

    def start_coordinates(self, start="mean"):
        """Coordinates of the checkpoints' mean ("mean") or of checkpoint number `start`."""
        if isinstance(start, str) and start == "mean":
            return self.mean_coords.clone()
        start = self.checkpoint_index(start)
        return self._concat(block.checkpoint_coords[start] for block in self.blocks)

    def gradient(self, g):
        """P g (float64, summed over the shards) for this shard's entries g of a D-vector."""
        g = g.to(device=self.device, dtype=torch.float32)
        products = self._concat(block.basis.matvec(g[block.shard_slice]) for block in self.blocks)
        return self.shard.sum_(products)

    def nearest_coordinates(self, w):
        """P w, the coordinates of the point of the subspace nearest to w (all D entries)."""
        part = self.shard.local_part(self._whole_vector(w, "w")).to(device=self.device,
                                                                    dtype=torch.float32)
        centred = part - self.mean
        products = self._concat(block.basis.matvec(centred[block.shard_slice], float64_sums=True)
                                for block in self.blocks)
        return self.shard.sum_(products) + self.mean_coords

    def weights(self, c, out):
        """out = mean + P^T (c - P mean): the weights at coordinates c (this shard's entries)."""
        step = self.coordinates(c) - self.mean_coords
        out.copy_(self.mean)
        for block, piece in zip(self.blocks, self._pieces(step)):
            block.basis.rmatvec(piece, out[block.shard_slice], accumulate=True)
        return out

    def project_(self, g):
        """g <- P^T P g in place: the paper's projected gradient, for optimizers kept in D-space.
        One process only: a sharded basis needs P g summed over the processes first."""
        if self.shard.world > 1:
            raise RuntimeError("project_ needs the whole basis; under torch.distributed use "
                               "gradient() (summed over the shards) and the TWA trainer")
        self._whole_vector(g, "g")
        for block in self.blocks:
            block.basis.rmatvec(block.basis.matvec(g[block.shard_slice]), out=g[block.shard_slice])
        return g

    def deviation_directions(self):
        """Per block: the checkpoints' deviations from the mean in coordinates, as unit rows D (n x k,
        a zero row for a checkpoint equal to the mean), with their norms (n) = |w_i - mean| in the
        block."""
        out = []
        for block in self.blocks:
            deviations = block.checkpoint_coords.to(self.device) - block.mean_coords.to(self.device)
            norms = torch.linalg.vector_norm(deviations, dim=1)
            out.append((deviations / norms.clamp_min(1e-300)[:, None], norms))
        return out

    def checkpoint_coefficients(self, c):
        """alpha (blocks x n) with sum_i alpha_bi w_i = the weights at coordinates c in block b."""
        step = self.coordinates(c) - self.mean_coords
        return torch.stack([1.0 / len(self.names) + block.to_alpha @ piece
                            for block, piece in zip(self.blocks, self._pieces(step))]).cpu()

    def orthogonality_error(self):
        """max |P P^T - I| over the blocks, computed in float64 (NaN if the basis holds a NaN)."""
        return self.basis_quality()["orthogonality_error"]

    def basis_quality(self):
        """How far P is from orthonormal: max |P P^T - I| and the range of P P^T's eigenvalues over
        the blocks (both 1 for an orthonormal basis), in float64."""
        errors, low, high = [0.0], [1.0], [1.0]
        for block in (block for block in self.blocks if block.rank):
            gram = self.shard.sum_(block.basis.gram())
            errors.append((gram - torch.eye(block.rank, dtype=torch.float64, device=self.device))
                          .abs().max().item())
            eigenvalues = torch.linalg.eigvalsh(gram) if gram.isfinite().all() else gram.new_full(
                (1,), math.nan)
            low.append(eigenvalues.min().item())
            high.append(eigenvalues.max().item())
        return {"orthogonality_error": _nan_or(max, errors),
                "gram_eigenvalues": [_nan_or(min, low), _nan_or(max, high)]}

    def relative_residual(self, w):
        """||w - (nearest point of the subspace)|| / ||w||: 0 for points of the subspace."""
        part = self.shard.local_part(self._whole_vector(w, "w")).to(device=self.device,
                                                                    dtype=torch.float32)
        inside = self.weights(self.nearest_coordinates(w), torch.empty_like(part))
        return self.shard.norm(part.double() - inside.double()) / max(self.shard.norm(part), 1e-300)


def _nan_or(reduce, values):
    """reduce(values), or NaN when any value is NaN (max and min would silently skip it)."""
    return math.nan if any(map(math.isnan, values)) else reduce(values)
