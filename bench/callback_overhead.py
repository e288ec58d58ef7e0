"""What twa.lightning.TWA costs inside Trainer.fit, side by side in one run.

The same Trainer.fit of ResNet-20 (random 32x32 images, batch 128; timing does not depend on the
values) three epochs long, without the callback and with it (recording one snapshot per epoch in
epochs 0-1, then one epoch of TWA), in interleaved rounds. Printed, as medians over the rounds:
- recording: the second epoch's training time (its batches, the snapshot included) with the
  callback against without (target: at most 1.05x);
- TWA: the median training step of the TWA epoch against the median SGD step (target: 1.1x);
- the one-off costs: the switch (the subspace from the recorder and the optimizer swap) and the
  end (BatchNorm statistics recomputed over the training data, the report).

    python bench/callback_overhead.py [--batches 16] [--rounds 3] [--threads N]
"""
import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

import common  # first: puts the project on the path
import models
import twa.lightning


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = models.build_model("resnet20", 10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class BatchTimer(pl.Callback):
    """Each batch's wall time per epoch, from after the other callbacks' epoch start (the switch)
    to after their batch end (a snapshot, the final BatchNorm pass)."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs[-1].append(time.perf_counter() - self.started)


def timed_method(obj, name, seconds):
    """Wrap obj.name so that its wall time is added to seconds[name]."""
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    setattr(obj, name, timed)


def fit(batches, with_twa):
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(128 * batches, 3, 32, 32, generator=generator),
                                          torch.randint(0, 10, (128 * batches,), generator=generator))
    timer, seconds, callbacks = BatchTimer(), {}, []
    if with_twa:
        callback = twa.lightning.TWA(lr=0.5, twa_epochs=1, switch_epoch=2)
        timed_method(callback, "enter_twa", seconds)
        timed_method(callback, "finish", seconds)
        callbacks.append(callback)
    with tempfile.TemporaryDirectory() as folder:  # where the callback writes twa.json
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", callbacks=[*callbacks, timer],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=folder)
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=128))
    return timer.epochs, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=16, help="batches per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recording, stepping, switch, end = [], [], [], []
    for _ in range(args.rounds):
        plain, _ = fit(args.batches, False)
        with_twa, seconds = fit(args.batches, True)
        recording.append(sum(with_twa[1]) / sum(plain[1]))
        # the TWA epoch's last batch holds the BatchNorm pass: left out of its step times
        stepping.append(statistics.median(with_twa[2][:-1]) / statistics.median(plain[1]))
        switch.append(seconds["enter_twa"] / statistics.median(plain[1]))
        end.append(seconds["finish"] / statistics.median(plain[1]))
    print(f"ResNet-20, {args.batches} batches of 128 per epoch, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds (median)")
    print(f"recording epoch / plain epoch       {statistics.median(recording):.3f}x")
    print(f"TWA step / SGD step                 {statistics.median(stepping):.3f}x")
    print(f"switch (subspace, optimizer swap)   {statistics.median(switch):.2f} SGD steps")
    print(f"end (BatchNorm pass, report)        {statistics.median(end):.2f} SGD steps")


if __name__ == "__main__":
    main()
