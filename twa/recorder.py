"""Building the span while SGD trains, from weights recorded in memory instead of checkpoint files."""
import logging
import os

import torch

from .build import (DROP_RULE, add_generator, anchored, check_tolerance, parameter_blocks,
                    span_builders, warn_dropped)
from .checkpoints import basis_device, check_layout, is_int, layout, trainable_parameters
from .sharding import sharding_of
from .subspace import Subspace

log = logging.getLogger("twa")


class SubspaceRecorder:
    """Builds the subspace while SGD trains, with no checkpoint files: call add(model) at each point
    where a checkpoint would be saved, then subspace() gives what Subspace.from_checkpoints gives
    for those checkpoints: the same generators ({w_1, w_2 - w_1, ..., w_n - w_1}, streamed by the
    same loop), span, mean, alpha bookkeeping, blocks and column shards. The mean, known only at the
    end, comes from a float64 running sum. The cost over the files route: that sum (2 D-sized
    vectors), no extra pass.

    add() accepts the model given here, or one whose trainable parameters have the same shapes in
    the same order; capacity is an int >= 1 whose bases fit the device's memory."""

    def __init__(self, model, capacity, bits=32, tol=1e-5, layer_size=None, device=None, group=None):
        self.model, self.params = model, trainable_parameters(model)
        self.layout = layout(self.params)
        device = basis_device(device, self.params)
        self.shard = sharding_of(self.params, group)
        check_tolerance(tol)
        blocks = parameter_blocks(self.params, layer_size)
        check_capacity(capacity, blocks, self.shard, bits, device)
        self.capacity, self.tol, self.names, self.handed_out = capacity, tol, [], False
        self.builders = span_builders(blocks, capacity, capacity, self.shard, bits, device)
        self.total = torch.zeros(self.shard.local_size, dtype=torch.float64, device=device)
        self.anchor = torch.zeros(self.shard.local_size, dtype=torch.float32, device=device)
        self.work = torch.empty(self.shard.local_size, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add(self, model=None, name=None):
        """Stream the model's current trainable weights into the basis (the model given at
        construction when None). Raises ValueError for non-finite weights, before changing anything."""
        j = len(self.names)
        if self.handed_out:
            raise ValueError("subspace() has handed out the recorded span, which shares this "
                             "recorder's basis: record into a new SubspaceRecorder")
        if j == self.capacity:
            raise ValueError(f"the recorder is full: capacity {self.capacity}")
        params = trainable_parameters(self.model if model is None else model)
        check_layout(self.layout, params, "the recorder")
        w = self.shard.current(params, f"the weights recorded as #{j}", out=self.work)
        self.total += w
        add_generator(self.builders, j, w, self.anchor, self.shard, self.tol)
        self.names.append(name or f"recorded #{j}")

    def subspace(self):
        n = len(self.names)
        if n == 0:
            raise ValueError("no checkpoint recorded")
        self.handed_out = True  # the blocks below share the builders' bases
        warn_dropped(self.builders, lambda j: self.names[j], n)
        scheme = anchored(n)
        return Subspace([b.finish(scheme) for b in self.builders], (self.total / n).float(),
                        list(self.names), self.shard, self.layout)

    def state_dict(self):
        """Everything add() has accumulated (for a resume state; about the basis' size)."""
        return {"names": list(self.names), "layout": self.layout, "total": self.total,
                "anchor": self.anchor, "drop_rule": DROP_RULE,
                "builders": [{"coords": b.coords, "kept": list(b.kept), "dropped": list(b.dropped),
                              "largest": b.largest,
                              **b.basis.state_dict()} for b in self.builders]}

    def load_state_dict(self, state):
        """Restore a state_dict(); a state of another model, capacity or format is refused (ValueError)
        before anything is changed."""
        self.check_state(state)
        self.names = list(state["names"])
        self.total.copy_(state["total"])
        self.anchor.copy_(state["anchor"])
        for builder, saved in zip(self.builders, state["builders"]):
            builder.coords.copy_(saved["coords"])
            builder.kept, builder.dropped = list(saved["kept"]), [tuple(d) for d in saved["dropped"]]
            builder.largest = saved.get("largest", 0.0)  # states saved before it was kept: 0
            builder.basis.load_state_dict(saved)
        warn_other_rule(state, self.builders)

    def check_state(self, state):
        """Raise ValueError unless `state` is a state_dict() of a recorder like this one."""
        if not isinstance(state, dict) or not {"names", "total", "anchor", "builders"} <= set(state):
            raise ValueError("the recorded state is not a SubspaceRecorder.state_dict()")
        if "layout" in state and [(n, tuple(s)) for n, s in state["layout"]] != self.layout:
            raise ValueError("the recorded state is of a model with other trainable parameters")
        if not isinstance(state["names"], list) or not all(isinstance(n, str) for n in state["names"]):
            raise ValueError("the recorded state's names are not a list of strings")
        if len(state["names"]) > self.capacity:
            raise ValueError(f"the recorded state holds {len(state['names'])} weights, more than "
                             f"the capacity {self.capacity}")
        for key in ("total", "anchor"):
            if not torch.is_tensor(state[key]) or state[key].shape != self.total.shape:
                raise ValueError(f"the recorded state's {key} is not a tensor of shape "
                                 f"{tuple(self.total.shape)}: another model or sharding")
        if len(state["builders"]) != len(self.builders):
            raise ValueError("the recorded state has another block layout")
        for builder, saved in zip(self.builders, state["builders"]):
            if not torch.is_tensor(saved.get("coords")) or saved["coords"].shape != builder.coords.shape:
                raise ValueError("the recorded state was made with another capacity")
            builder.basis.check_state(saved)


def warn_other_rule(state, builders):
    """Say so when a state whose rounded bases left generators out under another drop rule
    resumes: those stay out, where the rule of this build might have kept them."""
    left_out = sum(len(b.dropped) for b in builders if b.basis.bits < 32)
    if left_out and state.get("drop_rule") != DROP_RULE:
        log.warning("the recorded state left %d directions out of its rounded basis under another "
                    "drop rule, which this build might have kept; they stay out: record afresh for "
                    "the whole span", left_out)


def check_capacity(capacity, blocks, shard, bits, device):
    """Refuse a capacity that is no int >= 1, or whose allocations alone exceed the memory of the
    device that holds them. Each block's bases take capacity x entries and its coordinates capacity
    x capacity float64 values, whatever is recorded later: an absurd capacity would otherwise ask
    torch for exabytes (a traceback from its allocator) or be killed by the system mid-training."""
    if not is_int(capacity):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, not {capacity}")
    basis = coords = 0
    for start, stop, _ in blocks:
        columns = shard.local_slice(start, stop)
        basis += min(capacity, stop - start) * (columns.stop - columns.start) * bits // 8
        coords += 8 * capacity * capacity
    needs = {torch.device("cpu"): coords}  # the coordinates stay on the host
    needs[device] = needs.get(device, 0) + basis
    for where, need in needs.items():
        have = _memory(where)
        if have is not None and need > have:
            raise ValueError(f"capacity {capacity} needs at least {need / 2**30:.3g} GiB on {where}, "
                             f"which has {have / 2**30:.3g} GiB")


def _memory(device):
    """The total memory of a device in bytes, None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None
