"""TWA in PyTorch Lightning: a Callback that records the span of the weights while the user's
LightningModule trains, then trains the averaging coefficients in place of its optimizer.

    trainer = L.Trainer(max_epochs=100, callbacks=[twa.lightning.TWA(lr=0.5, twa_epochs=10,
                                                                     switch_epoch=30)])
    trainer.fit(module)   # SGD for 30 epochs, recording; then 10 epochs of TWA; fit ends at 40

Importable only where lightning is installed (`import twa` needs torch alone)."""
import json
import math
import os
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy,
                                         SingleDeviceStrategy)

from . import batchnorm as batch_norm
from .build import from_checkpoints
from .checkpoints import check_readable, is_int
from .optimizer import SubspaceOptimizer, check_finite_options
from .recorder import SubspaceRecorder

SCHEDULES = {  # the coefficients' lr factor at TWA epoch e of n: a pure function, nothing to resume
    "step": lambda e, n: 1.0 if e < n / 2 else 0.1 if e < 3 * n / 4 else 0.01,  # the reference's
    "constant": lambda e, n: 1.0,
    "cosine": lambda e, n: 0.5 * (1 + math.cos(math.pi * e / n)),
}


def first_element(batch):
    """The model's input in a batch such as (images, labels)."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class TWA(pl.Callback):
    """Trainable Weight Averaging inside Trainer.fit.

    Recording: a snapshot of the trainable weights at the start of epoch `record_from`, then
    `per_epoch` evenly spaced ones in every epoch up to `switch_epoch`, streamed into a
    twa.SubspaceRecorder (no files; about (snapshots x weights) floats of memory, split between
    the processes). With `checkpoints` (files or state_dicts: Lightning .ckpt, torch.save, HF
    safetensors) nothing is recorded and the subspace is theirs.

    At `switch_epoch` (default: the Trainer's max_epochs, i.e. after the user's training, as in the
    paper's tail; default 0 with `checkpoints`) the model jumps to the snapshots' mean (the SWA
    point), validated there once when the fit validates (BatchNorm statistics recomputed: the
    report's "swa" metrics), and the optimizer becomes twa.SubspaceOptimizer(model, space, SGD, lr, momentum,
    weight_decay) for `twa_epochs` epochs, its lr times SCHEDULES[schedule](epoch, twa_epochs). Fit
    then ends: at switch_epoch + twa_epochs, which the paper's head (switch_epoch below max_epochs)
    reaches before max_epochs. The user's LR schedulers keep stepping the user's optimizer, which
    is idle. Before the last TWA epoch's validation, BatchNorm statistics are recomputed over the
    training data (the model's forward on bn_input(batch)), averaged over the processes. The
    averaging coefficients and the basis' quality are logged and written as twa.json beside the
    checkpoints (the ModelCheckpoint's folder, else the Trainer's root dir).

    Strategies: one device, DDPStrategy (the basis split by columns), ModelParallelStrategy with
    fully_shard (FSDP2: each process keeps its shards' basis entries, and a TWA step's one
    collective is a k-sized all-reduce). A Lightning checkpoint taken while recording or during TWA
    resumes exactly with Trainer.fit(ckpt_path=...): the callback's state holds the recorded span
    (every process's part) and the coefficients' optimizer. Gradient clipping during TWA acts on the
    model's gradients before their projection. Refused at setup with one error: another strategy,
    manual optimization (Lightning allows several optimizers only there), a gradient scaler (16-mixed), a switch past
    max_epochs, fewer than two snapshots."""

    def __init__(self, lr, twa_epochs, *, switch_epoch=None, record_from=0, per_epoch=1,
                 checkpoints=None, momentum=0.9, weight_decay=1e-5, schedule="step", bits=32,
                 layer_size=None, bn_input=first_element, report="twa.json"):
        for name, value, low in (("twa_epochs", twa_epochs, 1), ("record_from", record_from, 0),
                                 ("per_epoch", per_epoch, 1)):
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, not {value!r}")
        if switch_epoch is not None and (not is_int(switch_epoch) or switch_epoch < record_from):
            raise ValueError(f"switch_epoch must be an int >= record_from ({record_from}), not "
                             f"{switch_epoch!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, not {schedule!r}")
        if checkpoints is not None and len(checkpoints) < 2:
            raise ValueError(f"TWA needs at least two checkpoints, not {len(checkpoints)}")
        check_finite_options({"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        torch.optim.SGD([torch.zeros(1)], lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.options = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self.twa_epochs, self.record_from, self.per_epoch = twa_epochs, record_from, per_epoch
        self.switch_epoch, self.checkpoints, self.schedule = switch_epoch, checkpoints, schedule
        self.bits, self.layer_size, self.bn_input, self.report = bits, layer_size, bn_input, report
        self.recorder = self.optimizer = self.user_optimizer = self.saved = self.swa_metrics = None
        self.result = None  # the report, once TWA is done

    # --- setup: every check before any training -------------------------------------------------

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        served = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
        if not isinstance(trainer.strategy, served) or isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ValueError(f"twa.lightning.TWA supports one device, DDPStrategy and "
                             f"ModelParallelStrategy (FSDP2), not {type(trainer.strategy).__name__}")
        if not pl_module.automatic_optimization:
            raise ValueError("twa.lightning.TWA replaces the optimizer that automatic optimization "
                             "steps: manual optimization is not supported")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError("a gradient scaler (precision '16-mixed') scales the optimizer's "
                             "parameters, which during TWA are the coefficients, not the model's: "
                             "use 'bf16-mixed' or 32-bit precision")
        last = trainer.max_epochs
        if last is None or last < 0:
            raise ValueError("twa.lightning.TWA needs the Trainer's max_epochs")
        if trainer.max_steps != -1:
            raise ValueError("twa.lightning.TWA ends fit itself, after its epochs: max_steps would "
                             "stop it before, or in the middle of, TWA; set max_epochs only")
        switch = self.switch_epoch if self.switch_epoch is not None else \
            0 if self.checkpoints is not None else last
        if switch > last:
            raise ValueError(f"switch_epoch {switch} is past the Trainer's max_epochs {last}")
        if self.checkpoints is None and self.record_from > switch:
            raise ValueError(f"record_from {self.record_from} is past the switch to TWA at epoch "
                             f"{switch}: nothing would be recorded")
        if self.checkpoints is None and self.snapshots(switch) < 2:
            raise ValueError(f"recording from epoch {self.record_from} to the switch at epoch "
                             f"{switch} takes {self.snapshots(switch)} snapshot: TWA needs at least 2")
        for source in self.checkpoints or ():  # a missing or cut file: one error before training
            if not isinstance(source, Mapping):
                check_readable(source)
        self.switch = switch
        trainer.fit_loop.max_epochs = switch + self.twa_epochs
        # a second fit with this callback starts afresh (a resumed one loads its state after this)
        self.recorder = self.optimizer = self.user_optimizer = self.saved = self.swa_metrics = None
        self.result = None

    def snapshots(self, switch):
        return (switch - self.record_from) * self.per_epoch + 1

    def on_train_start(self, trainer, pl_module):
        # checked here, where the strategy has converted the module (precision='bf16-true' would
        # otherwise fail only at the switch, after the whole SGD phase)
        dtypes = {p.dtype for p in pl_module.parameters() if p.requires_grad}
        if dtypes != {torch.float32}:
            raise ValueError(f"TWA needs float32 trainable parameters, not {sorted(map(str, dtypes))}: "
                             "keep the weights in float32 (precision '32-true' or 'bf16-mixed')")
        if self.checkpoints is None and self.recorder is None:
            if math.isinf(trainer.num_training_batches):
                raise ValueError("twa.lightning.TWA needs a training loader with a length")
            if trainer.num_training_batches < self.per_epoch:
                raise ValueError(f"per_epoch={self.per_epoch} snapshots need as many batches per "
                                 f"epoch, not {trainer.num_training_batches}")
            batches = trainer.num_training_batches  # the batch counts after which to record
            self.snapshot_batches = {round((i + 1) * batches / self.per_epoch)
                                     for i in range(self.per_epoch)}
            self.recorder = SubspaceRecorder(pl_module, self.snapshots(self.switch), bits=self.bits,
                                             layer_size=self.layer_size)
            recorded = self.saved and _this_process(self.saved["recorder"])
            if recorded:
                self.recorder.load_state_dict(recorded)

    # --- recording ------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if epoch == self.record_from and self.recorder is not None and not self.recorder.names:
            self.recorder.add(name=f"epoch {epoch} start")
        if epoch >= self.switch:
            if self.optimizer is None:
                self.enter_twa(trainer, pl_module)
            factor = SCHEDULES[self.schedule](epoch - self.switch, self.twa_epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = self.options["lr"] * factor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        epoch, done = trainer.current_epoch, batch_idx + 1
        if self.optimizer is None and self.recorder is not None and epoch >= self.record_from:
            if done in self.snapshot_batches:
                self.recorder.add(name=f"epoch {epoch} batch {done}")
        elif self.optimizer is not None and epoch == self.switch + self.twa_epochs - 1 and \
                done == trainer.num_training_batches:
            self.finish(trainer, pl_module)

    # --- TWA --------------------------------------------------------------------------------------

    def enter_twa(self, trainer, pl_module):
        """The subspace, the model at the snapshots' mean, and the coefficients' optimizer in place
        of the user's (whose state the checkpoints keep: see _save_user_optimizer)."""
        if self.checkpoints is not None:
            space = from_checkpoints(pl_module, self.checkpoints, bits=self.bits,
                                     layer_size=self.layer_size)
        else:
            space = self.recorder.subspace()
        self.optimizer = SubspaceOptimizer(pl_module, space, torch.optim.SGD, **self.options)
        if self.saved is not None and self.saved["optimizer"] is not None:
            self.optimizer.load_state_dict(self.saved["optimizer"])
            self.swa_metrics = self.saved["swa"]
        else:
            self.swa_metrics = self.validate_swa(trainer, pl_module)
        self.user_optimizer = trainer.optimizers[0]
        trainer.optimizers = [self.optimizer]
        _save_user_optimizer(trainer.strategy, self.optimizer, self.user_optimizer)

    def validate_swa(self, trainer, pl_module):
        """The validation metrics at the snapshots' mean (the SWA point), with BatchNorm statistics
        recomputed there: the fit loop's own validation, run once before the first TWA step (which
        BatchNorm statistics do not affect: training normalises by each batch's own)."""
        if not trainer.enable_validation:
            return None
        recompute_batch_norm(pl_module, trainer.train_dataloader, self.bn_input)
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        return {name: float(value) for name, value in trainer.callback_metrics.items()}

    def on_train_end(self, trainer, pl_module):
        if self.result is None:
            rank_zero_warn(f"fit ended at epoch {trainer.current_epoch} before TWA finished (epochs "
                           f"{self.switch} to {self.switch + self.twa_epochs - 1}): the model holds "
                           "no TWA weights (an early stop?); resume from a checkpoint to finish")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        """Lightning clips the optimizer's parameters, here the coefficients, whose gradient exists
        only once the model's is projected: clip the model's instead, as the SGD phase did."""
        value = trainer.gradient_clip_val
        if self.optimizer is None or not value:
            return
        params = self.optimizer.twa.params
        if trainer.gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, value)
        else:
            torch.nn.utils.clip_grad_norm_(params, value)

    def finish(self, trainer, pl_module):
        """BatchNorm statistics of the final weights, then the report: logged and written."""
        recompute_batch_norm(pl_module, trainer.train_dataloader, self.bn_input)
        space = self.optimizer.twa.space
        alpha = space.checkpoint_coefficients(self.optimizer.coordinates)
        self.result = {"names": space.names, "rank": space.rank, "alpha": alpha.tolist(),
                       "swa": self.swa_metrics,
                       **space.basis_quality(), "epochs": self.twa_epochs, **self.options,
                       "schedule": self.schedule, "switch_epoch": self.switch}
        if trainer.logger is not None:
            trainer.logger.log_metrics({"twa/rank": space.rank, "twa/alpha_sum": alpha.sum(1).mean()
                                        .item(), "twa/orthogonality_error":
                                        self.result["orthogonality_error"]}, step=trainer.global_step)
        if trainer.is_global_zero:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
            _write_json(os.path.join(folder, self.report), self.result)

    # --- resume -----------------------------------------------------------------------------------

    def state_dict(self):
        recorder = self.recorder.state_dict() if self.recorder is not None else None
        return {"recorder": _every_process(recorder),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "swa": self.swa_metrics, "plan": self.plan()}

    def plan(self):
        """What a resumed fit must share with the checkpoint's: where the snapshots are, and what."""
        return {"switch_epoch": self.switch, "record_from": self.record_from,
                "per_epoch": self.per_epoch, "bits": self.bits, "layer_size": self.layer_size,
                "checkpoints": None if self.checkpoints is None else [str(c) for c in self.checkpoints]}

    def load_state_dict(self, state_dict):
        saved = state_dict.get("plan", {})
        for key, value in self.plan().items():
            if saved.get(key) != value:
                raise ValueError(f"the checkpoint's TWA has {key}={saved.get(key)!r}, this callback "
                                 f"{value!r}: resume with the callback's settings of that run")
        self.saved = state_dict  # applied where the model's recorder and optimizer are built


def _save_user_optimizer(strategy, optimizer, user_optimizer):
    """Checkpoints taken during TWA keep the user's optimizer's state in the optimizer slot (the
    coefficients' optimizer is in the callback's state): a strategy may read that slot through the
    model's parameters (ModelParallelStrategy does, with torch.distributed.checkpoint), which the
    coefficients are not, and a resumed fit loads it into the user's optimizer before the callback
    builds TWA again."""
    save = strategy.optimizer_state

    def optimizer_state(opt):
        return save(user_optimizer if opt is optimizer else opt)
    strategy.optimizer_state = optimizer_state


def _every_process(state):
    """A recorder state per process (each holds its columns of the basis), in rank order, for the
    checkpoint that one process writes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    gathered = [None] * dist.get_world_size()
    on_host = None if state is None else _to_host(state)
    dist.all_gather_object(gathered, on_host)
    return gathered


def _this_process(states):
    """This process's recorder state of _every_process's list."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(states) != world:
        raise ValueError(f"the checkpoint was recorded by {len(states)} processes, this run has "
                         f"{world}: resume with as many")
    return states[dist.get_rank() if world > 1 else 0]


def _to_host(state):
    if torch.is_tensor(state):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_host(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_host(v) for v in state]
    return state


def recompute_batch_norm(module, loader, model_input=first_element):
    """BatchNorm statistics of the module's weights over one pass of `loader` (see
    twa.batchnorm), its forward run on model_input(batch) moved to the module's device."""
    device = next(module.parameters()).device
    batch_norm.recompute_batch_norm(module, loader, lambda batch: module(model_input(batch).to(device)))


def _write_json(path, value):
    """Written whole or not at all: a temporary file beside it (the umask's permissions), renamed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(temp, path)
