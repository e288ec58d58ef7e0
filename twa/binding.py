"""What TWA(model, space) bound, recorded once and checked at every step: TWA writes the weights into
the storage each parameter had then, so a parameter given new storage afterwards (model.to(...),
`.data` reassigned, a memory-format change, a cast), a parameter object replaced in its module, or
one whose requires_grad was toggled would train silently on weights that no step writes, or not be
trained at all. The check compares Python-side metadata only (addresses, dtypes, shapes, strides,
identities): never a tensor's values, so it needs no copy from an accelerator to the host."""
from .compat import DTensor


def _layout(p):
    """Where and how a parameter's entries are stored (its local shard's under FSDP2)."""
    t = p.to_local() if isinstance(p, DTensor) else p
    return t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride()


class Binding:
    """The model's parameters as TWA(model, space) left them. `trained`: the (name, parameter)
    pairs that TWA writes, recorded after they were bound to its buffers."""

    def __init__(self, model, trained):
        # every slot of every module (a tied parameter has several), frozen parameters too: one made
        # trainable afterwards would not be trained
        self.slots = [(f"{prefix}.{key}".lstrip("."), module, key, p, p.requires_grad)
                      for prefix, module in model.named_modules()
                      for key, p in module._parameters.items() if p is not None]
        self.layouts = [(name, p, _layout(p)) for name, p in trained]

    def check(self):
        """Raise RuntimeError naming the first parameter that is no longer as TWA bound it."""
        for name, module, key, p, requires_grad in self.slots:
            if module._parameters.get(key) is not p:
                _fail(name, "was replaced by another object")
            if p.requires_grad != requires_grad:
                _fail(name, f"had requires_grad={requires_grad} and now has {p.requires_grad}")
        for name, p, layout in self.layouts:
            if _layout(p) != layout:
                _fail(name, "has new storage (moved, cast, `.data` reassigned or another memory "
                      "format)")


def _fail(name, what):
    raise RuntimeError(f"the model's parameter '{name}' {what} after TWA(model, space): TWA no "
                       "longer trains the model as it is; change the model before building the "
                       "subspace and the TWA")

