"""Running the scripts on N processes with torch.distributed, as launched by torchrun.

One process per GPU (NCCL) or per CPU worker (Gloo); a plain `python script.py` is the N = 1 case of
the same code. Each rank trains on its share of every global batch (the loaders split it by rank),
DistributedDataParallel averages the gradients, BatchNorm statistics are those of the global batch
(SyncBatchNorm on GPUs, CrossProcessBatchNorm below on CPUs), and only rank 0 writes files and logs.
With --fsdp the model is sharded instead (FSDP2's fully_shard, shard): each process keeps its rows of
every parameter and of the optimizer state, and files hold whole tensors gathered one at a time
(full_state_dict), so that they stay interchangeable with every other route.
"""
import contextlib
import datetime
import gc
import hashlib
import inspect
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import state_dict as dcp_state
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

import runfiles
import twa
from runfiles import UsageError


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    folders: object = None  # rank 0's lock on the run's folders, held while the run lives

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def is_node_main(self):
        """The first process of its node (torchrun's LOCAL_RANK 0): the one that reads what every
        process of the node would read alike, e.g. a file's whole content to hash it."""
        return int(os.environ.get("LOCAL_RANK", "0")) == 0


def init(device, timeout=None):
    """Join the process group that torchrun describes in the environment (if any); a collective
    that waits more than `timeout` seconds for a rank (one that never came, or died) fails."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout) if timeout else None)
    return Context(dist.get_rank(), world, device)


@contextlib.contextmanager
def agreement(ctx):
    """Run checks that may fail on some ranks only (a file missing on one node, its data, its
    disk) so that all ranks stop together: an exception on any rank makes every other rank raise a
    UsageError naming it, instead of waiting in the next collective until the timeout. The block
    must hold no collective of its own."""
    try:
        yield
    except BaseException:  # also SIGINT/SIGTERM on one rank: the others need not wait it out
        _first_failed(ctx, failed=True)
        raise
    failed = _first_failed(ctx, failed=False)
    if failed is not None:
        raise UsageError(f"process {failed} of {ctx.world} stopped on bad input (its error is in "
                         "its output); every process stops with it")


def _first_failed(ctx, failed):
    """The lowest rank that failed, on every rank (None when none did)."""
    if ctx.world == 1:
        return 0 if failed else None
    vote = torch.tensor([ctx.rank if failed else ctx.world], device=ctx.device)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return None if vote.item() == ctx.world else vote.item()


def from_node_main(ctx, value):
    """The value that the first process of this node computed (is_node_main; the others pass
    None): what a node reads alike for all its processes, read once."""
    if ctx.world == 1:
        return value
    values = [None] * ctx.world
    dist.all_gather_object(values, value)
    return values[ctx.rank - int(os.environ.get("LOCAL_RANK", "0"))]


def check_same(ctx, fields):
    """Stop every rank with a UsageError naming the first of `fields` (name -> value, compared by
    repr) whose value is not the same on all ranks: ranks that disagree on flags or data would
    otherwise fail deep inside a collective, or silently train on mismatched batches."""
    if ctx.world == 1:
        return
    digests = [int.from_bytes(hashlib.sha256(repr(v).encode()).digest()[:7], "big")
               for v in fields.values()]  # 56 bits: exact in int64 on every backend
    low = torch.tensor(digests, dtype=torch.int64, device=ctx.device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    for name, a, b in zip(fields, low.tolist(), high.tolist()):
        if a != b:
            raise UsageError(f"the {ctx.world} processes disagree on {name} (process {ctx.rank} "
                             f"has {fields[name]!r}); launch every node with the same flags and data")


def lost_peer(err):
    """Whether `err` is a collective that failed because another process is gone (a connection it
    closed) or stalled past --dist-timeout, rather than a fault of this process."""
    marks = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
             "timed out", "Timeout")
    return dist.is_initialized() and (isinstance(err, dist.DistError) or
                                      any(mark in str(err) for mark in marks))


def lost_peer_message():
    """One line for the survivors of a process that stopped: which one, when there is one other."""
    rank, world = dist.get_rank(), dist.get_world_size()
    other = f"process {1 - rank}" if world == 2 else "another process"
    return (f"process {rank} of {world} lost contact with {other}, which stopped or stalled past "
            "--dist-timeout (its own output says why); the last saved state is kept")


def shutdown(ctx):
    if ctx.world > 1:
        leave(together=True)


def leave(together=False):
    """Leave the process group, if this process joined one (also on the way out after an error);
    together: after every process has come here (a normal end). FSDP's work still pending when its
    group is gone aborts the interpreter now and then: the caller drops its models, and they are
    collected here, before the group goes."""
    if dist.is_initialized():
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()


def sum_(tensor, ctx):
    """Sum a tensor over the processes, in place."""
    if ctx.world > 1:
        dist.all_reduce(tensor)
    return tensor


def common_token(ctx):
    """A random 48-bit number drawn by rank 0, the same on every rank (torch's generators untouched)."""
    token = torch.tensor([secrets.randbits(48) if ctx.is_main else 0], device=ctx.device)
    return int(sum_(token, ctx).item())


def any_(flag, ctx):
    """True on every process when it is true on any (so that all stop at the same step)."""
    if ctx.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=ctx.device)
    return bool(sum_(value, ctx).item())


def wrap(model, ctx):
    """The model for SGD's training forward passes: DistributedDataParallel when there are several
    (a sharded model is its own: FSDP reduce-scatters the gradients). Its buffers are not
    broadcast from rank 0 before every forward: BatchNorm is synchronised (synchronise_batchnorm),
    so every rank updates its statistics identically."""
    if ctx.world == 1 or is_sharded(model):
        return model
    no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                   **no_buffer_sync)


def shard(model, ctx, keep_gathered=False):
    """--fsdp: the model sharded over all processes with FSDP2's fully_shard, unit by unit
    (fsdp_units) and then the root; one process keeps the plain model. Weights must be loaded
    before (load_full_state_dict loads into a sharded model). keep_gathered: each unit's weights
    stay gathered from its forward to its backward (--fsdp-keep-gathered)."""
    if ctx.world == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=not keep_gathered)
    return fully_shard(model, mesh=mesh, reshard_after_forward=not keep_gathered)


def fsdp_units(module):
    """The modules that are sharded, and gathered for their forward, one at a time: the elements
    of the outermost nn.Sequential / nn.ModuleList / nn.ModuleDict containers that hold parameters
    (a residual block, a network stage, a VGG convolution or its BatchNorm); the search goes into
    any other module. Parameters outside every unit (a stem, a classifier) belong to the root's."""
    units = []
    for child in module.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            units += [m for m in child.children() if any(True for _ in m.parameters())]
        else:
            units += fsdp_units(child)
    return units


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model, ctx):
    """The model's state_dict as the files hold it: whole tensors. A sharded model's are gathered
    one parameter at a time onto rank 0's CPU (the other ranks get {}): every rank must call it."""
    if not is_sharded(model):
        return model.state_dict()
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dcp_state.get_model_state_dict(model, options=options)


def load_full_state_dict(model, state):
    """Load whole tensors (a file's state_dict) into the model, sharded or not (each rank keeps its
    rows; every rank must call it)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    options = dcp_state.StateDictOptions(full_state_dict=True)
    dcp_state.set_model_state_dict(model, state, options=options)


def optimizer_state(model, optimizer):
    """optimizer.state_dict(), whole tensors for a sharded model (on rank 0's CPU, keyed by
    parameter name; every rank must call it)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dcp_state.get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state):
    """The reverse of optimizer_state."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    options = dcp_state.StateDictOptions(full_state_dict=True)
    dcp_state.set_optimizer_state_dict(model, optimizer, state, options=options)


def save_sharded(model, path, ctx, optimizer=None):
    """--sharded-checkpoints: the model's state_dict (with the optimizer's: {"model", "optimizer"})
    saved by torch.distributed.checkpoint as the folder `path`, every process writing its own shards
    (nothing gathered), into a temp folder that rank 0 renames once all have written. Every rank
    must call it."""
    from torch.distributed import checkpoint as dcp
    if optimizer is None:
        state = dcp_state.get_model_state_dict(model)
    else:
        weights, moments = dcp_state.get_state_dict(model, optimizer)
        state = {"model": weights, "optimizer": moments}
    tmp = f"{path}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's
    barrier(ctx)
    try:
        with warnings.catch_warnings():  # one process alone is told it "assumes" a single process
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=tmp)  # returns once every process's shards are written
    except dcp.api.CheckpointException as err:  # on every process, once all have tried to write
        shutil.rmtree(tmp, ignore_errors=True)  # its truncated shards
        raise runfiles.WriteFailed(f"cannot write {path} ({_first_failure(err, ctx)}); the "
                                   "previous checkpoint, if any, is intact") from None
    if ctx.is_main:
        runfiles.replace_folder(tmp, path)
    barrier(ctx)


def _first_failure(err, ctx):
    """The first line of the first failed process's error in a CheckpointException (whose own
    text is every process's traceback), naming the process when there are several."""
    rank, (cause, _) = min(err.failures.items(), key=lambda item: item[0])
    line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return f"process {rank}: {line}" if ctx.world > 1 else line


def load_sharded_state(model, optimizer, path):
    """The reverse of save_sharded(model, path, ctx, optimizer): each process reads its shards."""
    weights, moments = dcp_state.get_state_dict(model, optimizer)  # creates the momentum to fill
    state = {"model": weights, "optimizer": moments}
    twa.checkpoints.load_sharded(state, path)
    dcp_state.set_state_dict(model, optimizer, model_state_dict=state["model"],
                             optim_state_dict=state["optimizer"])


def barrier(ctx):
    if ctx.world > 1:
        dist.barrier()


def synchronise_batchnorm(model, ctx):
    """Make BatchNorm layers use the global batch's statistics (state_dict keys are unchanged)."""
    if ctx.world == 1:
        return model
    if ctx.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, _BatchNorm) and not isinstance(child, CrossProcessBatchNorm):
            replacement = CrossProcessBatchNorm(child.num_features, child.eps, child.momentum,
                                                child.affine, child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement.to(ctx.device))
        else:
            synchronise_batchnorm(child, ctx)
    return model


class CrossProcessBatchNorm(_BatchNorm):
    """BatchNorm (any number of dims) whose training-mode statistics are those of the batch summed
    over all processes, as SyncBatchNorm computes them on GPUs (which it alone supports); gradients
    flow back through the all-reduce. Sums are taken in float64, so that variance = E[x^2] - E[x]^2
    loses nothing."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        wide = x.double()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        stats = SumOverProcesses.apply(torch.cat((wide.sum(dims), wide.square().sum(dims), count)))
        c, n = x.shape[1], stats[-1]
        mean, var = stats[:c] / n, stats[c:2 * c] / n - (stats[:c] / n).square()
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, c) + (1,) * (x.dim() - 2)
        out = (wide - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, unbiased_var):
        self.num_batches_tracked += 1
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


class SumOverProcesses(torch.autograd.Function):
    """A sum over the processes that gradients flow back through (the gradient of each process's
    input is the sum of the output's gradients)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad
