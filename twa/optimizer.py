"""TWA as a torch optimizer of the model: what any training loop or trainer that takes an optimizer
(Lightning's configure_optimizers, Hugging Face's Trainer(optimizers=...), Accelerate, a plain loop)
can run, with any torch LR scheduler on it."""
import math
import numbers

import torch
from torch import nn
from torch.optim import Optimizer

from .trainer import TWA


def check_finite_options(options):
    """Refuse a NaN or infinite number among an optimizer's options (lr, momentum, weight_decay...)."""
    for name, value in options.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and \
                not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, not {value}")


class SubspaceOptimizer(Optimizer):
    """Trains `model` inside `space`: each step() reads the gradients the backward pass left in
    the model's parameters, steps `optimizer_class(**options)` on the coordinates c with
    dL/dc = P g, and writes the weights mean + P^T (c - m). It is twa.TWA(model, space, start,
    train) and its step, in the shape of an optimizer:

        opt = twa.SubspaceOptimizer(model, space, torch.optim.SGD, lr=2, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 10)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    param_groups, state and defaults are the inner optimizer's (`inner`, which holds the trained
    tensor, c or beta), so an LR scheduler sets the lr that the step uses. step(closure) evaluates
    the closure at the weights of the inner optimizer's coordinates every time the inner optimizer
    calls it, so LBFGS, which needs one, works too. state_dict() is the inner optimizer's with the
    trained tensor under "twa": loaded into a SubspaceOptimizer of the same model and subspace it
    resumes exactly. The parameters' gradients are the model's own; a gradient scaler or clipping
    must act on the model's parameters, not on param_groups (which hold c, whose gradient exists
    only inside step)."""

    def __init__(self, model, space, optimizer_class, *, start="mean", train="coordinates",
                 **options):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError("optimizer_class must be a torch.optim.Optimizer class (e.g. "
                            f"torch.optim.SGD), not {optimizer_class!r}")
        # wrong options refused on a stand-in for the trained tensor, before TWA moves the model;
        # torch's optimizers take a NaN rate (NaN < 0 is false), which would make every weight NaN
        check_finite_options(options)
        optimizer_class([nn.Parameter(torch.zeros(1, dtype=torch.float64))], **options)
        self.twa = TWA(model, space, start, train)
        self.inner = optimizer_class(self.twa.parameters(), **options)
        # the step hooks and profiling that Optimizer sets up for an unpickled optimizer; the
        # groups, state and defaults it would hold are the inner optimizer's (properties below)
        Optimizer.__setstate__(self, {})

    def __getstate__(self):
        raise TypeError("a SubspaceOptimizer is bound to its model's parameters and cannot be "
                        "copied or pickled: save its state_dict() instead")

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self):
        return self.inner.defaults

    @property
    def coordinates(self):
        """The coordinates c of the model's weights (see TWA.coordinates)."""
        return self.twa.coordinates

    def add_param_group(self, param_group):
        raise ValueError("a SubspaceOptimizer trains the subspace's coordinates as one group: the "
                         "model's parameters cannot be added to it, nor other tensors")

    def step(self, closure=None):
        """One step of the inner optimizer on the coordinates, then the weights from them. Returns
        the closure's loss (None without a closure)."""
        if closure is None:
            self.twa.step(self.inner)
            return None
        self.twa.check_model()
        loss = self.inner.step(self._evaluate_at_coordinates(closure))
        self.twa.write_weights()
        return loss

    def _evaluate_at_coordinates(self, closure):
        """`closure` as the inner optimizer calls it: at the weights of its current coordinates,
        with the gradient projected into the trained tensor's. The first call finds the weights
        written already; an optimizer that calls it again (LBFGS) has moved the coordinates
        since."""
        calls = 0

        def evaluate():
            nonlocal calls
            if calls:
                self.twa.write_weights()
            calls += 1
            with torch.enable_grad():
                loss = closure()
            self.twa.project_gradient()
            return loss
        return evaluate

    def zero_grad(self, set_to_none=True):
        """Zero (or drop) the model's gradients, as a torch optimizer does for its parameters, and
        the trained tensor's."""
        self.inner.zero_grad(set_to_none)
        for p in self.twa.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        return {**self.inner.state_dict(),
                "twa": {"train": self.twa.train, "trained": self.twa.trained.detach().clone()}}

    def load_state_dict(self, state_dict):
        """Resume from state_dict(): the inner optimizer's state and groups, and the trained tensor,
        whose weights are written into the model. Checked before anything changes."""
        saved = state_dict.get("twa") if isinstance(state_dict, dict) else None
        if not isinstance(saved, dict) or set(saved) != {"train", "trained"}:
            raise ValueError("not a SubspaceOptimizer state_dict: it holds no 'twa' entry with the "
                             "trained tensor")
        if saved["train"] != self.twa.train:
            raise ValueError(f"the state_dict trained {saved['train']!r}, this optimizer trains "
                             f"{self.twa.train!r}")
        value = self.twa._start_value(saved["trained"])
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "twa"})
        self.twa._jump(value)
