"""ResNet-20 on CIFAR-10 in a LightningModule, TWA's head in one Trainer.fit: SGD for --switch
epochs while twa.lightning.TWA records 2 snapshots per epoch, then --twa-epochs epochs that train
the averaging coefficients. Prints the validation accuracy at the snapshots' mean (SWA) and after
TWA. --strategy fsdp shards the model with FSDP2 (ModelParallelStrategy), ddp replicates it; run
either under torchrun, e.g. on 2 CPU processes:

    python examples/lightning_resnet20.py [--data ~/.cache/twa-data/cifar10] [--subset 5000]
    torchrun --nproc_per_node 2 examples/lightning_resnet20.py --strategy fsdp --subset 5000
"""
import argparse
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # models/
import models  # noqa: E402
import twa.lightning  # noqa: E402

NORMALIZE = T.Normalize((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))


class ResNet20(pl.LightningModule):
    def __init__(self, shard=False):
        super().__init__()
        self.net, self.shard = models.build_model("resnet20", 10), shard

    def configure_model(self):
        if self.shard:  # FSDP2: each residual block's parameters split between the processes
            from torch.distributed.fsdp import fully_shard
            for block in self.net.blocks:
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean() * 100, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def loaders(root, subset, batch_size):
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                         NORMALIZE])
    train = torchvision.datasets.ImageFolder(os.path.join(root, "train"), augment)
    test = torchvision.datasets.ImageFolder(os.path.join(root, "test"),
                                            T.Compose([T.ToTensor(), NORMALIZE]))
    if subset:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        train = torch.utils.data.Subset(train, pick[:subset].tolist())
        test = torch.utils.data.Subset(test, range(0, len(test), max(1, len(test) * 5 // subset)))
    return (torch.utils.data.DataLoader(train, batch_size, shuffle=True, num_workers=2),
            torch.utils.data.DataLoader(test, 500, num_workers=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.expanduser("~/.cache/twa-data/cifar10"),
                        help="CIFAR-10 as an ImageFolder tree (train/, test/)")
    parser.add_argument("--subset", type=int, default=0, help="training images (0: all 50,000)")
    parser.add_argument("--switch", type=int, default=30, help="SGD epochs before TWA")
    parser.add_argument("--twa-epochs", type=int, default=10, help="TWA epochs")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate of the coefficients")
    parser.add_argument("--strategy", choices=["auto", "ddp", "fsdp"], default="auto")
    parser.add_argument("--out", default="lightning_twa", help="checkpoints and twa.json")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    strategy = {"auto": "auto", "ddp": DDPStrategy(),
                "fsdp": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)}
    pl.seed_everything(0)
    callback = twa.lightning.TWA(lr=args.lr, twa_epochs=args.twa_epochs, switch_epoch=args.switch,
                                 per_epoch=2)
    trainer = pl.Trainer(max_epochs=args.switch + args.twa_epochs, callbacks=[callback],
                         strategy=strategy[args.strategy], devices=world, accelerator="auto",
                         default_root_dir=args.out, logger=False, enable_progress_bar=False)
    trainer.fit(ResNet20(shard=args.strategy == "fsdp"), *loaders(args.data, args.subset, 128))
    if trainer.is_global_zero:
        print(f"SWA point {callback.result['swa']['val_acc']:.2f}%, "
              f"TWA {trainer.callback_metrics['val_acc'].item():.2f}% "
              f"({callback.result['rank']} directions; report in {args.out})")


if __name__ == "__main__":
    main()
