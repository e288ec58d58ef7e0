"""twa.lightning.TWA, the Lightning callback: the same weights as the library's own loop, as
Lightning's SWA callback's average, on 1 or 2 processes (DDP, FSDP2), after a resume, and one
clear error for each use it cannot serve."""
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

import lightning_worker
import twa
import twa.lightning
from conftest import ROOT

WORKER = os.path.join(ROOT, "tests", "lightning_worker.py")


def network(batch_norm=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), *([nn.BatchNorm2d(4)] if batch_norm else []), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 36, 3))


def loader():
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=generator),
                                          torch.randint(0, 3, (64,), generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=16)


class Module(pl.LightningModule):
    def __init__(self, batch_norm=True, lr=0.1):
        super().__init__()
        self.net, self.lr = network(batch_norm), lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def fit(module, callbacks, max_epochs, root, ckpt_path=None, **options):
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         default_root_dir=str(root), **options)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def plain_loop(clip=None, use_optimizer=True):
    """The head run of test_callback_matches_the_library by hand: 3 epochs of SGD recorded at the
    start and twice per epoch, then 2 epochs of TWA (lr 0.5, then 0.05), BatchNorm recomputed;
    `clip` clips the model's gradients in both phases, as Lightning's gradient_clip_val does.
    use_optimizer=False writes the TWA phase with twa.TWA and trainer.step instead."""
    model, data = network(), loader()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = twa.SubspaceRecorder(model, 7)
    recorder.add()
    for _ in range(3):
        for batch, (x, y) in enumerate(data):
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            sgd.step()
            if batch + 1 in (2, 4):
                recorder.add()
    space = recorder.subspace()
    options = {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-5}
    if use_optimizer:
        optimizer = twa.SubspaceOptimizer(model, space, torch.optim.SGD, **options)
        step, coordinates = optimizer.step, lambda: optimizer.coordinates
    else:
        trainer = twa.TWA(model, space)
        optimizer = torch.optim.SGD(trainer.parameters(), **options)
        step, coordinates = (lambda: trainer.step(optimizer)), lambda: trainer.coordinates
    for epoch in range(2):
        optimizer.param_groups[0]["lr"] = 0.5 if epoch == 0 else 0.05
        for x, y in data:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            step()
    twa.lightning.recompute_batch_norm(model, data)
    return model.state_dict(), space.checkpoint_coefficients(coordinates())


@pytest.mark.parametrize("clip", [None, 0.05])
def test_callback_matches_the_library(tmp_path, clip):
    """The callback (head: switch at epoch 3 of 6, 2 snapshots per epoch, 2 TWA epochs), the
    subspace optimizer in a plain loop and twa.TWA + trainer.step: the same weights, BatchNorm
    statistics and alphas, with and without gradient clipping (of the model's gradients)."""
    module = Module()
    callback = twa.lightning.TWA(lr=0.5, twa_epochs=2, switch_epoch=3, per_epoch=2)
    trainer = fit(module, [callback], 6, tmp_path, gradient_clip_val=clip)
    assert trainer.current_epoch == 5  # fit ended after the TWA epochs, before max_epochs
    for use_optimizer in (True, False):
        weights, alpha = plain_loop(clip, use_optimizer)
        got = module.net.state_dict()
        assert max((weights[k].double() - got[k].double()).abs().max().item() for k in got) < 1e-5
        assert torch.allclose(alpha.double(), torch.tensor(callback.result["alpha"]).double(),
                              atol=1e-5)
    unclipped, _ = plain_loop(None)
    assert clip is None or (unclipped["0.weight"] - got["0.weight"]).abs().max() > 1e-3
    report = (tmp_path / "twa.json").read_text()
    assert '"rank": 7' in report and '"alpha"' in report


def test_swa_point_is_lightnings_average(tmp_path):
    """The snapshots' mean, where TWA starts, equals Lightning's StochasticWeightAveraging over
    the same weights (the starts of epochs 1 to 3 at a constant lr)."""
    # swa_epoch_start counts from 1: it averages from the start of (0-based) epoch 1
    lightning_swa = StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=2, annealing_epochs=1)
    fit(Module(batch_norm=False), [lightning_swa], 4, tmp_path / "swa")
    averaged = torch.cat([p.detach().reshape(-1) for p in lightning_swa._average_model.parameters()])
    callback = twa.lightning.TWA(lr=0.5, twa_epochs=1, record_from=1, switch_epoch=3)
    fit(Module(batch_norm=False), [callback], 3, tmp_path / "twa")
    mean = callback.optimizer.twa.space.mean
    assert (mean - averaged).abs().max().item() < 1e-6 * averaged.abs().max().item()


class Validated(Module):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_swa_point_is_validated_before_twa(tmp_path):
    """Tail (switch at max_epochs): the report's "swa" metrics are the validation loss at the
    snapshots' mean with BatchNorm statistics recomputed there, as computed by hand; the report
    reaches the Trainer's logger."""
    callback = twa.lightning.TWA(lr=0.5, twa_epochs=1, record_from=1)
    module = Validated()
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback], accelerator="cpu",
                         logger=CSVLogger(tmp_path, name="log", version=0),
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, loader(), loader())
    assert trainer.current_epoch == 4  # the tail: the Trainer's 3 epochs, then 1 of TWA
    logged = (tmp_path / "log" / "version_0" / "metrics.csv").read_text()
    assert "twa/rank" in logged and "twa/orthogonality_error" in logged
    model, offset = network(), 0
    mean = callback.optimizer.twa.space.mean
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(mean[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
    twa.lightning.recompute_batch_norm(model, loader())
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y).item() for x, y in loader()]
    assert abs(callback.result["swa"]["val_loss"] - sum(losses) / len(losses)) < 1e-5


def test_resume_mid_recording_and_mid_twa_is_exact(tmp_path):
    """Trainer.fit(ckpt_path=...) from a checkpoint taken while recording (epoch 1) and during
    TWA (epochs 3 and 4) ends on the uninterrupted run's weights, bit for bit."""
    def run(root, ckpt_path=None):
        module = Module()
        callback = twa.lightning.TWA(lr=0.5, twa_epochs=3, switch_epoch=3, per_epoch=2)
        saving = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        fit(module, [callback, saving], 6, root, ckpt_path)
        return module.net.state_dict(), callback.result["alpha"]

    weights, alpha = run(tmp_path / "whole")
    other = twa.lightning.TWA(lr=0.5, twa_epochs=3, switch_epoch=3, per_epoch=1)
    with pytest.raises(ValueError, match="per_epoch=2, this callback 1"):
        fit(Module(), [other], 6, tmp_path / "other", tmp_path / "whole" / "epoch=1.ckpt")
    for epoch in (1, 3, 4):
        resumed, resumed_alpha = run(tmp_path / f"from{epoch}", tmp_path / "whole" / f"epoch={epoch}.ckpt")
        assert all(torch.equal(weights[k], resumed[k]) for k in weights), epoch
        assert resumed_alpha == alpha


def test_twa_over_lightning_checkpoints(tmp_path):
    """checkpoints=[.ckpt files]: the subspace is theirs (the model starts at their mean) and
    TWA trains from epoch 0 for twa_epochs."""
    saving = ModelCheckpoint(dirpath=tmp_path / "sgd", every_n_epochs=1, save_top_k=-1,
                             filename="{epoch}")
    fit(Module(batch_norm=False), [saving], 3, tmp_path / "sgd")
    files = [str(tmp_path / "sgd" / f"epoch={e}.ckpt") for e in range(3)]
    states = [torch.load(f, weights_only=True)["state_dict"] for f in files]
    mean = torch.cat([sum(s[k] for s in states).reshape(-1) / 3 for k in states[0]])
    callback = twa.lightning.TWA(lr=0.5, twa_epochs=2, checkpoints=files)
    trainer = fit(Module(batch_norm=False), [callback], 10, tmp_path / "twa")
    assert trainer.current_epoch == 2
    assert (callback.optimizer.twa.space.mean - mean).abs().max().item() < 1e-6
    assert callback.result["names"] == files and callback.result["rank"] == 3


class Manual(Module):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize("module,options,fit_options,message", [
    (Module, {"switch_epoch": 7}, {}, "past the Trainer's max_epochs 6"),
    (Module, {"switch_epoch": 2, "record_from": 2}, {}, "at least 2"),
    (Module, {"record_from": 8}, {}, "record_from 8 is past the switch to TWA at epoch 6"),
    (Module, {"checkpoints": ["missing.ckpt", "other.ckpt"]}, {}, "checkpoint not found: missing.ckpt"),
    (Manual, {}, {}, "manual optimization"),
    (Module, {"per_epoch": 5}, {}, "per_epoch=5 snapshots need as many batches"),
    (Module, {}, {"max_epochs": -1}, "max_epochs"),
    (Module, {}, {"max_steps": 10}, "max_steps"),
    (Module, {}, {"precision": "bf16-true"}, "float32 trainable parameters"),
])
def test_bad_use_is_one_error_before_training(tmp_path, module, options, fit_options, message):
    callback = twa.lightning.TWA(lr=0.5, twa_epochs=1, **options)
    with pytest.raises(ValueError, match=message):
        fit(module(), [callback], fit_options.pop("max_epochs", 6), tmp_path, **fit_options)


def test_an_early_stop_before_twa_finished_is_said(tmp_path):
    class Stop(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    with pytest.warns(UserWarning, match="before TWA finished"):
        fit(Module(), [twa.lightning.TWA(lr=0.5, twa_epochs=2), Stop()], 4, tmp_path)


def test_unsupported_strategies_and_arguments_are_refused():
    callback = twa.lightning.TWA(lr=0.5, twa_epochs=1)
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself is not installed
    with pytest.raises(ValueError, match="not DeepSpeedStrategy"):
        callback.setup(SimpleNamespace(strategy=deepspeed), Module(), "fit")
    with pytest.raises(ValueError, match="twa_epochs"):
        twa.lightning.TWA(lr=0.5, twa_epochs=0)
    with pytest.raises(ValueError, match="at least two checkpoints"):
        twa.lightning.TWA(lr=0.5, twa_epochs=1, checkpoints=["a.pt"])
    with pytest.raises(ValueError, match="switch_epoch"):
        twa.lightning.TWA(lr=0.5, twa_epochs=1, record_from=3, switch_epoch=2)
    with pytest.raises(ValueError, match="schedule"):
        twa.lightning.TWA(lr=0.5, twa_epochs=1, schedule="exponential")
    with pytest.raises(ValueError, match="learning rate"):
        twa.lightning.TWA(lr=-1, twa_epochs=1)
    with pytest.raises(ValueError, match="lr must be a finite number, not nan"):
        twa.lightning.TWA(lr=float("nan"), twa_epochs=1)


def launch(out, route, resume=None, checkpoints=()):
    prefix = [sys.executable] if route == "single" else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*prefix, WORKER, str(out), route, *([str(resume)] if resume else [])],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "TWA_TEST_CHECKPOINTS": ",".join(map(str, checkpoints))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.pt"
    return {**launch(out, "single"), "folder": out.parent / "one.pt.checkpoints"}


@pytest.mark.slow
@pytest.mark.parametrize("route", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume_exactly(tmp_path, route, one_process):
    """Under DDPStrategy and ModelParallelStrategy (fully_shard) on 2 processes: the weights of one
    process to 1e-5 and its alphas to 1e-4 of their scale; under FSDP2 a TWA step's only
    collective is the k-sized all-reduce (no weight gather), a resume from a checkpoint taken
    during TWA (a torch.distributed.checkpoint folder), whose callback state holds every process's
    part of the recorded span, ends on the same weights, bit for bit, and TWA over those folders
    is TWA over one process's .ckpt files."""
    one = one_process
    many = launch(tmp_path / "many.pt", route)
    assert many["epochs"] == one["epochs"] == 4 and many["rank"] == one["rank"]
    for name, w in one["weights"].items():
        assert (w - many["weights"][name]).abs().max() < 1e-5, name
    scale = max(abs(a) for a in one["alpha"][0])
    assert max(abs(a - b) for a, b in zip(one["alpha"][0], many["alpha"][0])) < 1e-4 * scale
    if route == "fsdp":
        assert set(many["step_collectives"]) == {("all_reduce", one["rank"])}
        # (DDP's checkpoints are the single process's kind, whose resume test_resume_... covers)
        resumed = launch(tmp_path / "resumed.pt", route,
                         tmp_path / "many.pt.checkpoints" / "epoch=2.ckpt")
        assert all(torch.equal(w, resumed["weights"][k]) for k, w in many["weights"].items())
        # TWA over Lightning's sharded checkpoints (folders holding the model under "state_dict."
        # beside the optimizer), each process reading its rows, against the same over one
        # process's .ckpt files of the same run
        folders = [tmp_path / "many.pt.checkpoints" / f"epoch={e}.ckpt" for e in (0, 1)]
        sharded = launch(tmp_path / "files-many.pt", route, checkpoints=folders)
        module = lightning_worker.Module()
        files = [str(one["folder"] / f"epoch={e}.ckpt") for e in (0, 1)]
        pl.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=str(tmp_path / "files-one"),
                   callbacks=[twa.lightning.TWA(lr=0.5, twa_epochs=2, checkpoints=files)]
                   ).fit(module, lightning_worker.loader(1))
        for name, w in module.net.named_parameters():
            assert (w.detach() - sharded["weights"][name]).abs().max() < 1e-5, name


def test_a_sharded_training_checkpoint_reads_as_its_model_state(tmp_path):
    """A torch.distributed.checkpoint folder of {"state_dict": model, "optimizer_0": ...} (what
    Lightning's ModelParallelStrategy writes) reads as the model's state_dict alone."""
    from torch.distributed import checkpoint as dcp
    model = network()
    dcp.save({"state_dict": model.state_dict(), "optimizer_0": {"state": {"0": torch.ones(3)}}},
             checkpoint_id=str(tmp_path / "epoch=0.ckpt"), no_dist=True)
    state = twa.checkpoints.load_state_dict(str(tmp_path / "epoch=0.ckpt"))
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # a model's own names may start with "model." (a submodule so called): read as they are
    wrapped = nn.Sequential()
    wrapped.model = model
    dcp.save(wrapped.state_dict(), checkpoint_id=str(tmp_path / "plain"), no_dist=True)
    assert set(twa.checkpoints.load_state_dict(str(tmp_path / "plain"))) == set(wrapped.state_dict())
