"""Building the span while SGD trains, from weights recorded in memory instead of checkpoint files."""
import torch

from .build import (add_generator, anchored, check_tolerance, parameter_blocks, span_builders,
                    warn_dropped)
from .checkpoints import current_weights, trainable_parameters
from .sharding import sharding_of
from .subspace import Subspace


class SubspaceRecorder:
    """Builds the subspace while SGD trains, with no checkpoint files: call add(model) at each point
    where a checkpoint would be saved, then subspace() gives what Subspace.from_checkpoints gives
    for those checkpoints: the same generators ({w_1, w_2 - w_1, ..., w_n - w_1}, streamed by the
    same loop), span, mean, alpha bookkeeping, blocks and column shards. The mean, known only at the
    end, comes from a float64 running sum. The cost over the files route: that sum (2 D-sized
    vectors), no extra pass."""

    def __init__(self, model, capacity, bits=32, tol=1e-5, layer_size=None, device=None, group=None):
        self.model, self.params = model, trainable_parameters(model)
        device = torch.device(device) if device is not None else self.params[0][1].device
        self.shard = sharding_of(self.params, group)
        check_tolerance(tol)
        self.capacity, self.tol, self.names, self.handed_out = capacity, tol, [], False
        self.builders = span_builders(parameter_blocks(self.params, layer_size), capacity, capacity,
                                      self.shard, bits, device)
        self.total = torch.zeros(self.shard.local_size, dtype=torch.float64, device=device)
        self.anchor = torch.zeros(self.shard.local_size, device=device)
        self.work = torch.empty(self.shard.local_size, device=device)

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
        w = current_weights(params, f"the weights recorded as #{j}", out=self.work, shard=self.shard)
        self.total += w
        add_generator(self.builders, j, w, self.anchor, self.shard, self.tol)
        self.names.append(name or f"recorded #{j}")

    def subspace(self):
        n = len(self.names)
        if n == 0:
            raise ValueError("no checkpoint recorded")
        self.handed_out = True  # the spans below share the builders' bases
        warn_dropped(self.builders, lambda j: self.names[j], n)
        scheme = anchored(n)
        return Subspace([b.finish(scheme) for b in self.builders], (self.total / n).float(),
                        list(self.names), self.shard)

    def state_dict(self):
        """Everything add() has accumulated (for a resume state; about the basis' size)."""
        return {"names": list(self.names), "total": self.total, "anchor": self.anchor,
                "builders": [{"coords": b.coords, "kept": list(b.kept), "dropped": list(b.dropped),
                              "largest": b.largest,
                              **b.basis.state_dict()} for b in self.builders]}

    def load_state_dict(self, state):
        if len(state["builders"]) != len(self.builders):
            raise ValueError("the recorded state has another block layout")
        self.names = list(state["names"])
        self.total.copy_(state["total"])
        self.anchor.copy_(state["anchor"])
        for builder, saved in zip(self.builders, state["builders"]):
            builder.coords.copy_(saved["coords"])
            builder.kept, builder.dropped = list(saved["kept"]), [tuple(d) for d in saved["dropped"]]
            builder.largest = saved.get("largest", 0.0)  # states saved before it was kept: 0
            builder.basis.load_state_dict(saved)
