"""Run by tests/test_lightning.py, alone or under torchrun: Trainer.fit of a small network with
twa.lightning.TWA (head: 2 epochs of SGD recorded twice per epoch, then 2 of TWA), on one process
or under DDPStrategy or ModelParallelStrategy (FSDP2, fully_shard per layer), a checkpoint per
epoch. Rank 0 saves the final weights (gathered here, for the comparison only), the alphas and
every collective that a TWA optimizer step made outside the forward and backward pass. The
validation (of the SWA point too) leaves FSDP2's root gathered before a TWA step.

    python tests/lightning_worker.py OUT {single,ddp,fsdp} [CHECKPOINT_TO_RESUME]

With TWA_TEST_CHECKPOINTS=A,B,... in the environment: TWA over those checkpoints from epoch 0.
"""
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import twa  # noqa: E402
import twa.lightning  # noqa: E402

BATCH = 16


def network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.ReLU(), nn.Linear(7, 3))


class Module(pl.LightningModule):
    def __init__(self, shard=False):
        super().__init__()
        self.net, self.shard = network(), shard

    def configure_model(self):
        if self.shard:
            from torch.distributed.fsdp import fully_shard
            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # an evaluation's forward, without backward
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(world):
    """64 images; each process takes every world-th of a global batch of 16 (a DistributedSampler
    without shuffling), so the processes' mean gradient is one process's."""
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=generator),
                                          torch.randint(0, 3, (64,), generator=generator))
    sampler = torch.utils.data.DistributedSampler(data, world, int(os.environ.get("RANK", 0)),
                                                  shuffle=False)
    return torch.utils.data.DataLoader(data, batch_size=BATCH // world, sampler=sampler)


def count_step_collectives(calls):
    """Record every collective (name, largest tensor size) made inside SubspaceOptimizer.step but
    outside its closure (the forward and backward pass, where FSDP gathers the weights)."""
    active = [False]
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "broadcast", "reduce_scatter", "all_gather_object"):
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            if active[0]:
                sizes = [a.numel() for a in args if torch.is_tensor(a)]
                calls.append((_name, max(sizes, default=0)))
            return _original(*args, **kwargs)
        setattr(dist, name, counted)
    twa.sharding.all_gather_single = dist.all_gather_into_tensor
    twa.sharding.reduce_scatter_single = dist.reduce_scatter_tensor
    step = twa.SubspaceOptimizer.step

    def traced_step(self, closure=None):
        def untraced():
            active[0] = False
            try:
                return closure()
            finally:
                active[0] = True
        active[0] = True
        try:
            return step(self, untraced if closure else None)
        finally:
            active[0] = False
    twa.SubspaceOptimizer.step = traced_step


def main(out, route, resume=None):
    world = int(os.environ.get("WORLD_SIZE", 1))
    strategy = {"single": "auto", "ddp": DDPStrategy(process_group_backend="gloo"),
                "fsdp": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)}[route]
    calls = []
    count_step_collectives(calls)
    module = Module(shard=route == "fsdp")
    files = os.environ.get("TWA_TEST_CHECKPOINTS")  # TWA over these instead, from epoch 0
    callback = twa.lightning.TWA(lr=0.5, twa_epochs=2, checkpoints=files.split(",")) if files else \
        twa.lightning.TWA(lr=0.5, twa_epochs=2, switch_epoch=2, per_epoch=2)
    saving = ModelCheckpoint(dirpath=f"{out}.checkpoints", every_n_epochs=1, save_top_k=-1,
                             filename="{epoch}")
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", devices=world, strategy=strategy,
                         callbacks=[callback, saving], use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=f"{out}.root")
    trainer.fit(module, loader(world), loader(world), ckpt_path=resume)
    weights = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for name, p in module.net.named_parameters()}
    if trainer.is_global_zero:
        torch.save({"weights": weights, "alpha": callback.result["alpha"],
                    "rank": callback.result["rank"], "step_collectives": calls,
                    "epochs": trainer.current_epoch}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
    if torch.distributed.is_initialized():
        # torch.distributed.checkpoint.load (a resume under ModelParallelStrategy) leaves a thread
        # that aborts the interpreter's exit now and then under gloo ("terminate called without an
        # active exception", with torch alone too): the processes leave together, without waiting
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
