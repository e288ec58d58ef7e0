"""The torch names that differ between builds and releases, resolved once: DTensor and FSDPModule
(absent from a torch built without distributed support, which then has no FSDP2 model to follow)
and the single-tensor collectives under their current names or those of earlier releases."""
import torch.distributed as dist

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:
    class DTensor:  # noqa: D101  (isinstance is then always false)
        pass

    class FSDPModule:  # noqa: D101
        pass

all_gather_single = getattr(dist, "all_gather_single", None) or \
    getattr(dist, "all_gather_into_tensor", None)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or \
    getattr(dist, "reduce_scatter_tensor", None)
