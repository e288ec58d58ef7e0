"""Training inside the subspace: the model's trainable parameters become views of one flat vector
that TWA.step rewrites as mean + P^T (c - m) after each optimizer step on the coordinates c."""
import inspect

import torch
from torch import nn

from .binding import Binding
from .checkpoints import fsdp_modules, trainable_parameters
from .sharding import DTensor
from .subspace import Subspace


def flatten_parameters_(params, size=None):
    """Make the parameters and their gradients views into two flat tensors (no copies per step)
    of `size` >= D entries (room for collectives over equal shards), in the parameters' logical
    order, as checkpoints are flattened. Returns the two tensors, the gradient views, and the
    channels-last parameters with their weight views: those keep their own tensors and layout (a
    view would make them contiguous, and convolutions slower), are refreshed from the flat weights
    after each write, and have their gradients copied in."""
    check_float32(params)
    first = params[0]
    dim = sum(p.numel() for p in params)
    weights = torch.zeros(size or dim, dtype=first.dtype, device=first.device)
    grads = torch.zeros(size or dim, dtype=first.dtype, device=first.device)
    grad_views, copied, offset = [], [], 0
    for p in params:
        view = weights[offset:offset + p.numel()].view_as(p)
        view.copy_(p.detach())
        grad_views.append(grads[offset:offset + p.numel()].view_as(p))
        if _channels_last(p):
            copied.append((p, view))
            p.grad = None
        else:
            p.data, p.grad = view, grad_views[-1]
        offset += p.numel()
    return weights, grads, grad_views, copied


def check_float32(params):
    """Refuse parameters that are not float32 on one device: the basis, the mean and the products
    are float32, and TWA writes the weights it computes into the parameters as they are (an FSDP2
    shard in another dtype would be cast on every write)."""
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        raise ValueError("TWA needs all trainable parameters in one dtype on one device")
    if first.dtype != torch.float32:
        raise ValueError(f"TWA needs float32 trainable parameters, not {first.dtype}: keep the "
                         "weights in float32 and compute in lower precision with torch.autocast")


def _local_buffers(params, device):
    """Under FSDP2: flat float32 buffers of this process's entries (its local shard of every
    parameter, in order) for the weights and the gradients, and their views per parameter."""
    check_float32(params)
    local = [p.detach().to_local() for p in params]
    weights = torch.cat([t.reshape(-1).float() for t in local]).to(device)
    grads = torch.zeros_like(weights)
    weight_views, grad_views, offset = [], [], 0
    for t in local:
        weight_views.append(weights[offset:offset + t.numel()].view_as(t))
        grad_views.append(grads[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return weights, grads, grad_views, weight_views


def _channels_last(p):
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)


class TWA:
    """Trains `model`'s trainable parameters as w = mean + P^T (c - P mean) through the k
    coordinates c.

    Give `parameters()` to any torch optimizer; after each backward pass call `step(optimizer)`.
    With P orthonormal, SGD on c (momentum, weight decay) is exactly the paper's projected SGD on w.
    Under torch.distributed (a sharded subspace) the model needs no DistributedDataParallel: each
    step reduce-scatters the gradients (every process gets its shard, averaged over the processes),
    sums the k-sized shard products P g, and all-gathers the new weights from the shards, which is
    about the traffic of DDP's one all-reduce. (Under DDP it stays right: the averaged gradients
    are the same on every process, and so is their average.)

    train="alpha" trains the averaging coefficients instead, as the journal code does: per block,
    w = mean + sum_i beta_i (w_i - mean) / |w_i - mean|, so c = P mean + D^T beta with D the unit
    deviations in coordinates, and dL/dbeta = D P g. An adaptive optimizer (AdamW) then scales each
    checkpoint's own coefficient, which does not depend on the order of the checkpoints, while on c it
    scales the axes of whichever orthonormal basis Gram-Schmidt happened to produce. Plain SGD on the
    two differs by the preconditioner D^T D, by the centre of weight decay (c = 0, the origin, against
    beta = 0, the mean), and by reach: beta moves only along the deviations, so it cannot scale the
    mean itself, which c can.

    The model must keep the parameters it had here (step checks each one's storage, identity and
    requires_grad). `start`: "mean", a checkpoint number in [0, n) (negative numbers are refused,
    not counted from the end), or a tensor of the trained size. step() needs an optimizer that holds
    parameters() and whose step() takes no closure (LBFGS is refused). A step after no backward
    pass steps with a zero gradient, as after zero_grad(set_to_none=False); a non-finite gradient
    reaches c as it would reach any torch optimizer's parameters (refusing it would cost a copy to
    the host every step). TWA owns the trainable weights: a load_state_dict into the model is
    overwritten by the next step; move to other weights with move_to."""

    def __init__(self, model, space, start="mean", train="coordinates"):
        if train not in ("coordinates", "alpha"):
            raise ValueError(f"train must be 'coordinates' or 'alpha', not {train!r}")
        if not isinstance(space, Subspace):
            raise TypeError(f"space must be a twa.Subspace, not {type(space).__name__}")
        self.space, self.train, shard = space, train, space.shard
        named = trainable_parameters(model)
        space.check_model(named)
        self.params = [p for _, p in named]
        self.directions = space.deviation_directions() if train == "alpha" else None
        size = space.rank if train == "coordinates" else len(space.names) * len(space.spans)
        if space.rank == 0 or (self.directions and not any(n.any() for _, n in self.directions)):
            raise ValueError("nothing to train: the subspace has rank 0" if space.rank == 0 else
                             "nothing to train: with train='alpha' every checkpoint equals the mean")
        self.trained = nn.Parameter(torch.zeros(size, dtype=torch.float64, device=space.device))
        start = self._start_value(start)  # checked before the model is touched
        self.fsdp_modules = fsdp_modules(model)  # found once: write_weights runs every step
        if shard.follows_model:  # FSDP2: the local shards stay the model's, copied in and out
            self.flat_weights, self.flat_grads, self.views, self.local_weights = _local_buffers(
                self.params, space.device)
            self.copied, self.own_layout = [], set(self.params)
            self.shard_weights, self.shard_grads = self.flat_weights, None
        else:
            self.flat_weights, self.flat_grads, self.views, self.copied = flatten_parameters_(
                self.params, shard.per_rank * shard.world)
            self.own_layout = {p for p, _ in self.copied}
            # the shard's weights are computed here, then gathered into flat_weights; its gradient
            # is reduce-scattered here from flat_grads
            self.shard_weights, self.shard_grads = (self.flat_weights[:shard.dim], None) \
                if shard.world == 1 else \
                torch.zeros(2, shard.per_rank, dtype=self.flat_weights.dtype, device=space.device)
        self.binding, self.revision = Binding(model, named), space.revision
        self.checked_optimizer = None  # the last optimizer found to hold the trained tensor
        self._jump(start)

    def parameters(self):
        return [self.trained]

    def tensors(self):
        """Every tensor a step reads or writes besides the model's own, e.g. for CUDA graph capture,
        which needs them at fixed addresses (torch._dynamo.mark_static_address)."""
        found = [self.flat_weights, self.flat_grads, self.shard_weights, self.shard_grads,
                 self.trained, self.space.mean, self.space.mean_coords]
        found += [t for span in self.space.spans
                  for t in [*span.basis.tensors().values(), *span.basis.scratch()]]
        found += [t for pair in self.directions or () for t in pair]
        return [t for t in found if t is not None]

    @property
    def coordinates(self):
        """The coordinates c of the current weights (the trained tensor itself unless train="alpha")."""
        if self.directions is None:
            return self.trained
        beta = self.trained.detach().view(len(self.space.spans), -1)
        return self.space.mean_coords.to(beta.device) + torch.cat(
            [unit.t() @ b for (unit, _), b in zip(self.directions, beta)])

    @torch.no_grad()
    def step(self, optimizer):
        """dL/dc = P g; one optimizer step on c (or beta); then the weights become mean + P^T (c - P mean)."""
        if not torch.compiler.is_compiling():  # traced once, a check of Python state is no guard
            self.check(optimizer)
        self.project_gradient()
        optimizer.step()
        self.write_weights()

    @torch.no_grad()
    def project_gradient(self):
        """trained.grad = dL/dc = P g (or dL/dbeta) from the gradients g that the backward pass
        left in the model, which are then zeroed."""
        self._collect_gradients()
        shard = self.space.shard
        if shard.world == 1 or shard.follows_model:  # FSDP2 has reduce-scattered and averaged
            g = self.flat_grads
        else:  # this process's shard of the gradient averaged over the processes
            g = shard.scatter_sum_(self.shard_grads, self.flat_grads).div_(shard.world)
        grad = self.space.gradient(g[:shard.local_size]).to(self.trained.device)
        if self.directions is not None:  # chain rule through c = P mean + D^T beta
            grad = torch.cat([unit @ piece for (unit, _), piece in
                              zip(self.directions, self.space._pieces(grad))])
        self.trained.grad = grad
        self.flat_grads.zero_()

    def check(self, optimizer):
        """Raise before a step that would not train the model: see check_model, or an optimizer
        that cannot step the coordinates. Reads Python-side metadata only: no copy to the host."""
        self.check_model()
        self.check_optimizer(optimizer)

    def check_model(self):
        """Raise if the model's parameters changed since TWA(model, space) (see Binding) or the
        subspace rotated under the coordinates."""
        for unit in self.fsdp_modules:  # an evaluation's forward left the root's weights gathered
            unit.reshard()              # (see checkpoints.reshard): its shards are the parameters
        self.binding.check()
        if self.space.revision != self.revision:
            raise RuntimeError("the subspace was rotated (to_principal_components) after TWA(model, "
                               "space): the coordinates no longer mean the same weights; build the "
                               "TWA after changing the subspace")

    def check_optimizer(self, optimizer):
        """Refuse an optimizer that would not move the trained tensor: one that does not hold it
        (nothing would move, and no error), or one whose step needs a closure (step calls
        optimizer.step() with none). Remembered once found good: a step checks it in O(1)."""
        if optimizer is not None and optimizer is self.checked_optimizer:
            return
        groups = getattr(optimizer, "param_groups", None)
        if groups is None or not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"optimizer must be a torch optimizer, not {type(optimizer).__name__}")
        if not any(p is self.trained for group in groups for p in group["params"]):
            raise ValueError("the optimizer does not hold the TWA coordinates: build it on "
                             "trainer.parameters(), not on the model's parameters")
        closure = inspect.signature(optimizer.step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise ValueError(f"{type(optimizer).__name__}.step needs a closure, which TWA.step "
                             "does not give: use an optimizer whose step takes none (SGD, AdamW...)")
        self.checked_optimizer = optimizer

    def move_to(self, start):
        """Jump to the checkpoints' mean ("mean"), checkpoint number `start` (in [0, n)), or a given
        value of the trained tensor (coordinates, or beta with train="alpha"). A wrong start raises
        before anything changes."""
        self._jump(self._start_value(start))

    @torch.no_grad()
    def _jump(self, value):
        self.trained.copy_(value)
        self.write_weights()

    def _start_value(self, start):
        """The trained tensor's value at `start`, checked (see move_to)."""
        if torch.is_tensor(start):
            if tuple(start.shape) != tuple(self.trained.shape) or not start.is_floating_point():
                raise ValueError(f"start must be a floating-point tensor of shape "
                                 f"{tuple(self.trained.shape)}, not a {start.dtype} tensor of shape "
                                 f"{tuple(start.shape)}")
            if not bool(torch.isfinite(start).all()):
                raise ValueError("start holds NaN or Inf values")
            return start.detach().to(self.trained)
        if self.directions is None:
            return self.space.start_coordinates(start)
        beta = torch.zeros_like(self.trained).view(len(self.space.spans), -1)
        if not (isinstance(start, str) and start == "mean"):  # beta: zero at the mean; checkpoint
            j = self.space.checkpoint_index(start)  # j is |w_j - mean| along its own direction
            beta[:, j] = torch.stack([norms[j] for _, norms in self.directions])
        return beta.view(-1)

    @torch.no_grad()
    def write_weights(self):
        shard = self.space.shard
        self.space.weights(self.coordinates, out=self.shard_weights[:shard.local_size])
        if shard.follows_model:  # into the local shards, which FSDP gathers in the next forward
            for unit in self.fsdp_modules:  # see checkpoints.reshard
                unit.reshard()
            for p, view in zip(self.params, self.local_weights):
                p.detach().to_local().copy_(view)
        elif shard.world > 1:
            shard.gather_(self.flat_weights, self.shard_weights)
        for p, view in self.copied:
            p.data.copy_(view)

    def _collect_gradients(self):
        # Gradients normally accumulate in place into the flat views; a loop that set them to None
        # (zero_grad(set_to_none=True)), a wrapper with its own buckets or a channels-last parameter
        # (whose gradient keeps its layout) gets them copied in.
        for p, view in zip(self.params, self.views):
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if grad is None:
                view.zero_()
            elif grad.data_ptr() != view.data_ptr():
                view.copy_(grad.reshape(view.shape))
            p.grad = None if p in self.own_layout else view
