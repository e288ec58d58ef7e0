"""Run by tests/test_fsdp.py, alone or under torchrun: TWA on a small network, plain or wrapped
by FSDP2's fully_shard, from in-memory checkpoints ("files", or their top 3 principal directions:
"pca"), from weights recorded while SGD trains ("recorded"), or from the checkpoints' weights
recorded in the model ("walk"). Rank 0 saves the SWA and TWA weights (gathered here, for the
comparison only), the alphas, and every collective that TWA.step made, to the path given.

    python tests/fsdp_worker.py OUT {files,pca,recorded,walk} {plain,fsdp} BITS LAYER_SIZE
"""
import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import twa  # noqa: E402

STEPS, BATCH = 6, 8


NETWORK = os.environ.get("TWA_TEST_NETWORK", "cnn")


def network():
    """cnn: 1,734 weights in blocks too small to round (stored in float32 layer-wise); mlp: layers
    of 5,050 to 6,060 weights, which layer-wise 8 and 4-bit bases store rounded, and which the
    column shards of 2 processes split inside the second layer."""
    torch.manual_seed(0)
    if NETWORK == "mlp":
        return nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 100), nn.ReLU(),
                             nn.Linear(100, 60), nn.ReLU(), nn.Linear(60, 3))
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.ReLU(), nn.Linear(7, 3))


def shard(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def data():
    generator = torch.Generator().manual_seed(1)
    shape = (100,) if NETWORK == "mlp" else (3, 8, 8)
    return torch.randn(STEPS * BATCH, *shape, generator=generator), \
        torch.randint(0, 3, (STEPS * BATCH,), generator=generator)


def local_batch(x, y, step):
    """This process's share of global batch `step`: the loss is its mean, and FSDP (or one
    process) averages the gradients, so every world size sees the same global mean."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = slice(step * BATCH + rank * BATCH // world, step * BATCH + (rank + 1) * BATCH // world)
    return x[rows], y[rows]


def walk(model, n):
    """n states on a seeded random walk from the model's weights (the same on every process)."""
    generator = torch.Generator().manual_seed(2)
    state = {k: v.detach().clone() for k, v in network().state_dict().items()}
    states = []
    for _ in range(n):
        state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        states.append(state)
    return states


def record(model, n, bits, layer_size):
    """SGD on the model, its weights recorded after every step (n of them)."""
    x, y = data()
    recorder = twa.SubspaceRecorder(model, n, bits=bits, layer_size=layer_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(n):
        images, labels = local_batch(x, y, step % STEPS)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        recorder.add(model)
    return recorder.subspace()


def record_walk(model, n, bits, layer_size):
    """The walk's states loaded into the model one by one, recorded from its (local) weights: the
    same weights on every world size, unlike SGD's, whose float32 rounding depends on it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    recorder = twa.SubspaceRecorder(model, n, bits=bits, layer_size=layer_size)
    for state in walk(model, n):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        recorder.add(model)
    return recorder.subspace()


def full_weights(model):
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def count_collectives(calls):
    """Record every collective (name, size) that torch.distributed runs from here on."""
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "broadcast", "reduce_scatter", "all_gather_object"):
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            calls.append((_name, max((t.numel() for t in tensors), default=0)))
            return _original(*args, **kwargs)
        setattr(dist, name, counted)
    twa.sharding.all_gather_single = dist.all_gather_into_tensor
    twa.sharding.reduce_scatter_single = dist.reduce_scatter_tensor


def main(out, route, wrap, bits, layer_size):
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    model = network()
    if wrap == "fsdp":
        shard(model)
    layer_size = None if layer_size < 0 else layer_size
    if route in ("files", "pca"):
        space = twa.Subspace.from_checkpoints(model, walk(model, 5), bits=bits, layer_size=layer_size)
        if route == "pca":
            space.to_principal_components(3)
    elif route == "walk":
        space = record_walk(model, 5, bits, layer_size)
    else:
        space = record(model, 5, bits, layer_size)
    trainer = twa.TWA(model, space)
    swa = full_weights(model)
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.5, momentum=0.9)
    x, y = data()
    calls = []
    for step in range(STEPS):
        images, labels = local_batch(x, y, step)
        F.cross_entropy(model(images), labels).backward()
        if step == STEPS - 1 and dist.is_initialized():
            count_collectives(calls)
        trainer.step(optimizer)
    result = {"swa": swa, "twa": full_weights(model), "rank": space.rank,
              "alpha": space.checkpoint_coefficients(trainer.coordinates),
              "step_collectives": calls, "local_size": space.shard.local_size, "dim": space.shard.dim,
              "own_entries": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                 for p in model.parameters())}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(result, out)
    if dist.is_initialized():
        # FSDP's pending work freed after the group is gone aborts the interpreter now and then
        # (std::terminate at exit): free it first, then leave together
        del model, trainer, optimizer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
