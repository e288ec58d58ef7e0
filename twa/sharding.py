"""Sharding over processes: which entries of the D-dimensional weight vectors this process keeps,
and everything that depends on it. One class per route, both answering the same questions: where
this process's gradient entries come from, how new weights reach the model, how a checkpoint's
entries are read, what parameters are accepted and how the model's untrained entries are checked
(`Sharding` lists them); the quantisation groups of a low-bit basis are laid out by one code for both
(groups.aligned_basis).

- ColumnSharding: equal column ranges of the flat weight vector (one process, or N under
  torch.distributed with a replicated model, e.g. DDP's).
- ModelSharding: the model's own FSDP2 shards of every parameter (the route of fully_shard)."""
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _NormBase

from .checkpoints import flatten_checkpoint, holds_sharded_folder, load_state_dict, read_local_shards
from .compat import DTensor, all_gather_single, reduce_scatter_single
from .errors import CheckpointError
from .groups import aligned_basis
from .storage import QUANT_GROUP, empty_basis


class Sharding:
    """This process's entries of the D-vector: `pieces`, increasing disjoint (start, stop) ranges,
    and `owners`, (start, stop, rank) of every process's. The subclasses are the two routes."""

    def __init__(self, dim, group, world, rank, owners):
        self.dim, self.group, self.world, self.rank, self.owners = dim, group, world, rank, owners
        self.pieces = [(lo, hi) for lo, hi, owner in owners if owner == rank]

    # --- the route: bind and current differ by route; read, check_parameters and untrained_entries
    # are shared, and ModelSharding reads sharded folders its own way ------------------------------

    def bind(self, params, device):
        """The flat buffers through which TWA moves gradients out of and weights into `params`."""
        raise NotImplementedError

    def read(self, source, params, name, out=None, untrained=None):
        """This process's entries of the trainable weights of a checkpoint (file, folder or
        mapping); `untrained` (UntrainedEntries, if given) compares what it holds of the rest."""
        state = load_state_dict(source, [n for n, _ in params], name)
        if untrained is not None:
            untrained.compare(state)
        return flatten_checkpoint(state, params, name, out, self)

    def current(self, params, name, out=None):
        """This process's entries of the model's own trainable weights."""
        raise NotImplementedError

    def check_parameters(self, params):
        """Refuse parameters that are not float32 on one device: the basis, the mean and the
        products are float32, and TWA writes the weights it computes into the parameters as they
        are (a parameter in another dtype would be cast on every write)."""
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("TWA needs all trainable parameters in one dtype on one device")
        if first.dtype != torch.float32:
            raise ValueError(f"TWA needs float32 trainable parameters, not {first.dtype}: keep the "
                             "weights in float32 and compute in lower precision with torch.autocast")

    def untrained_entries(self, model, device):
        """The checker of the model's frozen parameters and buffers against the checkpoints
        (`device`: where its one collective runs)."""
        return UntrainedEntries(model, self, device)

    # --- shared --------------------------------------------------------------------------------------

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
        process would place them (groups.aligned_basis): a process's entries need not start where
        a block's groups do."""
        if self.world == 1 or bits not in (8, 4):  # (empty_basis names a wrong format)
            columns = self.local_slice(*block)
            return empty_basis(capacity, columns.stop - columns.start, bits, device)
        return aligned_basis(self, capacity, block, bits, device)

    def sum_(self, tensor):
        """Sum over the processes, in place (k-sized tensors only)."""
        if self.world > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def norm(self, part):
        """The norm of a vector from its shards (`part`: this process's)."""
        square = torch.linalg.vector_norm(part, dtype=torch.float64).square().reshape(1)
        return self.sum_(square).sqrt().item()


class ColumnSharding(Sharding):
    """One column range of the D-dimensional weight vectors per process (its one piece).

    With N processes (torch.distributed initialised) the basis is split by columns: each rank
    stores about D/N entries of every row, and the full k x D basis never exists anywhere. Every
    product with the basis is then a sum of per-shard products, so the basis' own products move
    only k-sized sums between processes; a training step adds one D-sized reduce-scatter of the
    gradient and one D-sized all-gather of the new weights, about the traffic of DDP's one
    all-reduce. Columns rather than rows: rows would need the whole D-sized gradient and weights
    to meet every rank's rows, and rank deficiency would leave shards uneven. Shards hold whole
    quantisation groups (QUANT_GROUP entries) of the D-vector."""

    def __init__(self, dim, group=None):
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(group) if distributed else 1
        self.per_rank = math.ceil(dim / world / QUANT_GROUP) * QUANT_GROUP
        owners = [(min(r * self.per_rank, dim), min((r + 1) * self.per_rank, dim), r)
                  for r in range(world) if r * self.per_rank < dim]
        super().__init__(dim, group, world, dist.get_rank(group) if distributed else 0, owners)
        if not self.pieces:  # a process past the last column keeps an empty range at the end
            self.pieces = [(dim, dim)]

    def bind(self, params, device):
        self.check_parameters(params)
        return ColumnBuffers(params, self, device)

    def current(self, params, name, out=None):
        return flatten_checkpoint(dict(params), params, name, out, self)


class ModelSharding(Sharding):
    """The columns of the basis follow the model's own shards (FSDP2: each parameter a DTensor
    split along its first dimension): this process keeps the entries of its local shard of every
    parameter, in parameter order, so that gradients and weights move between the model and the
    basis with no collective at all, and the basis' products sum k-sized pieces over the mesh."""

    def __init__(self, params):
        mesh = params[0].device_mesh
        if mesh.ndim != 1 or any(not row_sharded(p) for p in params):
            raise ValueError("TWA follows FSDP2's sharding of each parameter along its first "
                             "dimension (fully_shard on a 1-D mesh); this model is sharded otherwise")
        world, rank = mesh.size(), mesh.get_local_rank()
        owners, offset = [], 0  # (start, stop, rank) of every process's shard of every parameter
        for p in params:
            row = p.numel() // max(p.shape[0], 1)
            for owner in range(world):
                lo, hi = (first_row(p.shape[0], world, r) * row for r in (owner, owner + 1))
                if owner == rank and hi - lo != p.to_local().numel():
                    raise ValueError(f"a local shard of {p.to_local().numel()} entries where "
                                     f"FSDP2's split along the first dimension gives {hi - lo}")
                if lo < hi:
                    owners.append((offset + lo, offset + hi, owner))
            offset += p.numel()
        super().__init__(offset, mesh.get_group(), world, rank, owners)

    def bind(self, params, device):
        self.check_parameters(params)
        return ModelBuffers(params, device)

    def read(self, source, params, name, out=None, untrained=None):
        """A sharded checkpoint folder is read as the model is sharded: each process reads only its
        rows of each file; any other checkpoint whole."""
        if isinstance(source, Mapping) or not holds_sharded_folder(source):
            return super().read(source, params, name, out, untrained)
        return read_local_shards(source, params, name, out, self, untrained)

    def current(self, params, name, out=None):
        local = torch.cat([p.detach().to_local().reshape(-1).float() for _, p in params])
        if not bool(torch.isfinite(local).all()):
            raise CheckpointError(f"{name} hold NaN or Inf values")
        return local if out is None else out.copy_(local)


def sharding_of(params, group=None):
    """How a basis for these (name, parameter) pairs is split over the processes: along the model's
    own shards for an FSDP2 model (DTensor parameters), else by columns over `group`."""
    tensors = [p for _, p in params]
    if any(isinstance(p, DTensor) for p in tensors):
        if group is not None:
            raise ValueError("an FSDP2 model's basis follows its own device mesh: give no group")
        return ModelSharding(tensors)
    return ColumnSharding(sum(p.numel() for p in tensors), group)


def row_sharded(p):
    """Whether a DTensor is split along its first dimension over a 1-D mesh (FSDP2's sharding)."""
    return len(p.placements) == 1 and getattr(p.placements[0], "dim", None) == 0


def first_row(rows, world, rank):
    """The first row of `rank`'s shard under torch.chunk's split (FSDP2's)."""
    per = math.ceil(rows / world)
    return min(rank * per, rows)


class UntrainedEntries:
    """The model's frozen parameters and buffers, the statistics of normalisation layers excepted
    (update_bn recomputes those), and which of them some checkpoint holds as the model does. TWA
    writes only the trainable parameters and leaves the rest as the model holds it, so a model built
    afresh would keep, say, a random frozen backbone without a word: check() refuses an entry that
    no checkpoint holds as the model does. An FSDP2-sharded entry is compared on this process's rows,
    and check() agrees over the processes, so that all of them raise or none."""

    def __init__(self, model, shard, device):
        statistics = {f"{prefix}.{key}".lstrip(".")  # under every name a shared module has
                      for prefix, module in model.named_modules(remove_duplicate=False)
                      if isinstance(module, _NormBase) for key, _ in module.named_buffers(recurse=False)}
        self.shard, self.device, self.kinds, self.entries = shard, device, {}, {}
        for key, own in model.state_dict(keep_vars=True).items():
            if not own.requires_grad and key not in statistics:  # (trained ones under any alias too)
                self.entries[key] = own.detach()  # not copied: a frozen backbone may be large
                self.kinds[key] = "frozen parameter" if isinstance(own, torch.nn.Parameter) else "buffer"
        self.compared, self.matched = set(), set()

    def compare(self, state):
        for key, own in self.entries.items():
            if key in self.matched or key not in state:  # (a file's tensor is read on lookup)
                continue
            saved = state[key]
            if not torch.is_tensor(saved) or saved.shape != own.shape:
                continue
            own, saved = _local_rows(own, saved)
            if own is None:
                continue
            self.compared.add(key)
            if torch.equal(own, saved.to(own.device, own.dtype)):
                self.matched.add(key)

    def check(self):
        differing = [key for key in self.entries if key in self.compared and key not in self.matched]
        if self.shard.world > 1 and self.entries:  # each process compared its own rows
            votes = torch.tensor([float(key in differing) for key in self.entries],
                                 device=self.device)
            differing = [key for key, vote in zip(self.entries, self.shard.sum_(votes).tolist())
                         if vote > 0]
        if differing:
            key = differing[0]
            raise ValueError(f"the model's {self.kinds[key]} '{key}' differs from every "
                             "checkpoint's: TWA trains only the trainable parameters and leaves "
                             "the rest as the model holds them; load a checkpoint into the model "
                             "first")


def _local_rows(own, saved):
    """The model's entry and a checkpoint's as far as this process holds them: an FSDP2 DTensor's
    local rows (None if it is sharded otherwise), whole tensors else."""
    if not isinstance(own, DTensor):
        if not isinstance(saved, DTensor):
            return own, saved
        whole = all(placement.is_replicate() for placement in saved.placements)
        return (own, saved.to_local()) if whole else (None, None)
    if not row_sharded(own):
        return None, None
    local = own.to_local()
    if isinstance(saved, DTensor):
        return local, saved.to_local()
    first = first_row(own.shape[0], own.device_mesh.size(), own.device_mesh.get_local_rank())
    return local, saved[first:first + local.shape[0]]


# ---------------------------------------------------------------------------------------------------
# Moving gradients and weights between the model and the basis
# ---------------------------------------------------------------------------------------------------

class ParameterBuffers:
    """Flat float32 buffers of this process's weight and gradient entries. `weights` is where a step
    computes the new weights of this process's entries; gradient() returns this process's entries
    of the gradient, averaged over the processes; publish() makes the model's parameters hold the
    weights. Both have exactly local_size entries. Subclasses set `flat_grads`, `tensors` (every buffer, for CUDA graph capture), `views` (each parameter's
    gradient view) and `own_layout` (parameters whose gradients keep their own tensor)."""

    def gradient(self):
        raise NotImplementedError

    def publish(self, fsdp_units):
        """fsdp_units: the model's FSDP2 units, which a route writing into their shards releases
        first (see checkpoints.reshard)."""
        raise NotImplementedError

    def zero_gradient(self):
        self.flat_grads.zero_()

    def collect_gradients(self, params):
        """Bring the gradients the backward pass left into the flat gradient buffer. They normally
        accumulate in place into its views; a loop that set them to None (zero_grad(set_to_none=
        True)), a wrapper with its own buckets or a channels-last parameter (whose gradient keeps
        its layout) gets them copied in."""
        for p, view in zip(params, self.views):
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if grad is None:
                view.zero_()
            elif grad.data_ptr() != view.data_ptr():
                view.copy_(grad.reshape(view.shape))
            p.grad = None if p in self.own_layout else view


class ColumnBuffers(ParameterBuffers):
    """The column route: the parameters and their gradients become views of two flat tensors (no
    copies per step) of world x per_rank entries, in the parameters' logical order, as checkpoints
    are flattened. Each step reduce-scatters this process's columns of the gradient and all-gathers
    the new weights from every process's columns. Channels-last parameters keep their own tensors
    and layout (a view would make them contiguous, and convolutions slower): they are refreshed
    from the flat weights after each write, and have their gradients copied in."""

    def __init__(self, params, shard, device):
        self.shard = shard
        first = params[0]
        size = shard.per_rank * shard.world
        self.flat_weights = torch.zeros(size, dtype=first.dtype, device=first.device)
        self.flat_grads = torch.zeros_like(self.flat_weights)
        self.views, self.copied, offset = [], [], 0
        for p in params:
            view = self.flat_weights[offset:offset + p.numel()].view_as(p)
            view.copy_(p.detach())
            self.views.append(self.flat_grads[offset:offset + p.numel()].view_as(p))
            if _channels_last(p):
                self.copied.append((p, view))
                p.grad = None
            else:
                p.data, p.grad = view, self.views[-1]
            offset += p.numel()
        self.own_layout = {p for p, _ in self.copied}
        self.tensors = [self.flat_weights, self.flat_grads]
        if shard.world == 1:
            self.weights, self.local_grads = self.flat_weights[:shard.dim], self.flat_grads[:shard.dim]
            return
        # this process's columns, padded to per_rank (collectives move equal shards): computed in
        # `padded_weights`, then gathered into flat_weights; reduce-scattered into `padded_grads`
        self.padded_weights, self.padded_grads = torch.zeros(2, shard.per_rank, dtype=first.dtype,
                                                             device=device)
        self.tensors += [self.padded_weights, self.padded_grads]
        self.weights = self.padded_weights[:shard.local_size]
        self.local_grads = self.padded_grads[:shard.local_size]

    def gradient(self):
        shard = self.shard
        if shard.world > 1:
            reduce_scatter_single(self.padded_grads, self.flat_grads, group=shard.group)
            self.padded_grads.div_(shard.world)
        return self.local_grads

    def publish(self, fsdp_units):
        if self.shard.world > 1:  # every process's columns, into the parameters' views
            all_gather_single(self.flat_weights, self.padded_weights, group=self.shard.group)
        for p, view in self.copied:
            p.data.copy_(view)


class ModelBuffers(ParameterBuffers):
    """The FSDP2 route: flat buffers of this process's local shard of every parameter, in order;
    FSDP2's own reduce-scatter has already averaged the gradient shards, and new weights are copied
    into the local shards, which FSDP2 gathers in the next forward."""

    def __init__(self, params, device):
        local = [p.detach().to_local() for p in params]
        self.weights = torch.cat([t.reshape(-1).float() for t in local]).to(device)
        self.flat_grads = torch.zeros_like(self.weights)
        self.params, self.views, self.weight_views, offset = params, [], [], 0
        for t in local:
            self.weight_views.append(self.weights[offset:offset + t.numel()].view_as(t))
            self.views.append(self.flat_grads[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        self.own_layout = set(params)
        self.tensors = [self.weights, self.flat_grads]

    def gradient(self):
        return self.flat_grads

    def publish(self, fsdp_units):
        for unit in fsdp_units:  # the next forward then gathers the shards written here
            unit.reshard()
        for p, view in zip(self.params, self.weight_views):
            p.detach().to_local().copy_(view)


def _channels_last(p):
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
