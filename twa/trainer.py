"""Training inside the subspace: the model's trainable parameters become views of one flat vector
that TWA.step rewrites as mean + P^T (c - m) after each optimizer step on the coordinates c."""
import inspect

import torch
from torch import nn

from .binding import Binding
from .checkpoints import fsdp_modules, trainable_parameters
from .subspace import Subspace


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
        size = space.rank if train == "coordinates" else len(space.names) * len(space.blocks)
        if space.rank == 0 or (self.directions and not any(n.any() for _, n in self.directions)):
            raise ValueError("nothing to train: the subspace has rank 0" if space.rank == 0 else
                             "nothing to train: with train='alpha' every checkpoint equals the mean")
        self.trained = nn.Parameter(torch.zeros(size, dtype=torch.float64, device=space.device))
        start = self._start_value(start)  # checked before the model is touched
        self.fsdp_modules = fsdp_modules(model)  # found once: write_weights runs every step
        # the route's flat buffers: gradients are read and weights written through them
        self.buffers = shard.bind(self.params, space.device)
        self.binding, self.revision = Binding(model, named), space.revision
        self.checked_optimizer = None  # the last optimizer found to hold the trained tensor
        self._jump(start)

    def parameters(self):
        return [self.trained]

    def tensors(self):
        """Every tensor a step reads or writes besides the model's own, e.g. for CUDA graph capture,
        which needs them at fixed addresses (torch._dynamo.mark_static_address)."""
        found = [*self.buffers.tensors, self.trained, self.space.mean, self.space.mean_coords]
        found += [t for block in self.space.blocks
                  for t in [*block.basis.tensors().values(), *block.basis.scratch()]]
        found += [t for pair in self.directions or () for t in pair]
        return [t for t in found if t is not None]

    @property
    def coordinates(self):
        """The coordinates c of the current weights (the trained tensor itself unless train="alpha")."""
        if self.directions is None:
            return self.trained
        beta = self.trained.detach().view(len(self.space.blocks), -1)
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
        self.buffers.collect_gradients(self.params)
        g = self.buffers.gradient()  # this process's entries, averaged over the processes
        grad = self.space.gradient(g).to(self.trained.device)
        if self.directions is not None:  # chain rule through c = P mean + D^T beta
            grad = torch.cat([unit @ piece for (unit, _), piece in
                              zip(self.directions, self.space._pieces(grad))])
        self.trained.grad = grad
        self.buffers.zero_gradient()

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
        beta = torch.zeros_like(self.trained).view(len(self.space.blocks), -1)
        if not (isinstance(start, str) and start == "mean"):  # beta: zero at the mean; checkpoint
            j = self.space.checkpoint_index(start)  # j is |w_j - mean| along its own direction
            beta[:, j] = torch.stack([norms[j] for _, norms in self.directions])
        return beta.view(-1)

    @torch.no_grad()
    def write_weights(self):
        self.space.weights(self.coordinates, out=self.buffers.weights)
        self.buffers.publish(self.fsdp_modules)
