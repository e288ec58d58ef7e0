"""TWA with Hugging Face's Trainer: a callback that records the span of the weights while
Trainer.train() runs (SpanRecorder), and one call that then trains the averaging coefficients with
the same Trainer (train_twa), over the recorded span or over the checkpoint folders it saved.

    recorder = twa.hf.SpanRecorder(every_steps=50, start_step=500)
    trainer = Trainer(model, args, train_dataset=train, callbacks=[recorder])
    trainer.train()                                             # SGD (or AdamW), recording
    result = twa.hf.train_twa(trainer, recorder, epochs=2, lr=0.5)
    # or: twa.hf.train_twa(trainer, sorted(glob("out/checkpoint-*"), key=...), epochs=2, lr=0.5)
    print(result.alpha)                                         # sum_i alpha_i w_i = the weights

Importable only where transformers is installed (`import twa` needs torch alone)."""
import copy
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, SchedulerType

from . import batchnorm as batch_norm
from .build import from_checkpoints
from .checkpoints import check_readable, is_int, trainable_parameters
from .optimizer import SubspaceOptimizer
from .recorder import SubspaceRecorder
from .safetensors_files import is_safetensors, open_checkpoint
from .subspace import Subspace

log = logging.getLogger("twa")
STATE_FILE = "twa_span{}.pt"  # in each checkpoint folder the Trainer saves while recording


class SpanRecorder(TrainerCallback):
    """Records the span of the weights during Trainer.train() into a twa.SubspaceRecorder, in
    memory (no files): a snapshot at each optimizer step g >= start_step that is a multiple of
    every_steps (g = 0, the weights training starts from, counts as one), and at each epoch's end
    with at_epoch_end; a step that is both is recorded once. capacity (None: as many snapshots as
    that plan holds, counted when training begins) sets the recorder's memory: capacity x the
    number of trainable weights, in `bits` (see SubspaceRecorder for bits, tol, layer_size, device).

    Each checkpoint the Trainer saves while recording gets the recorder's state, twa_span.pt (about
    capacity + 3 times the size of the weights in float32; one file per process, twa_span-rank<r>.pt,
    where the basis is split between processes), and Trainer.train(resume_from_checkpoint=...)
    restores it from <output_dir>/checkpoint-<step>: resumed, the span is the uninterrupted run's.
    A resume from a checkpoint without that file (or from a folder outside output_dir) records
    afresh from there, with a warning. Each train() that starts at step 0 starts a new recording;
    train_twa does not record."""

    def __init__(self, every_steps=None, at_epoch_end=True, start_step=0, capacity=None, *,
                 bits=32, tol=1e-5, layer_size=None, device=None):
        if every_steps is not None and (not is_int(every_steps) or every_steps < 1):
            raise ValueError(f"every_steps must be None or an int >= 1, not {every_steps!r}")
        if not isinstance(at_epoch_end, bool):
            raise TypeError(f"at_epoch_end must be a bool, not {type(at_epoch_end).__name__}")
        if every_steps is None and not at_epoch_end:
            raise ValueError("nothing would be recorded: give every_steps, or at_epoch_end=True")
        if not is_int(start_step) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, not {start_step!r}")
        if capacity is not None and (not is_int(capacity) or capacity < 1):
            raise ValueError(f"capacity must be None or an int >= 1, not {capacity!r}")
        self.every_steps, self.at_epoch_end, self.start_step = every_steps, at_epoch_end, start_step
        self.capacity = capacity
        self.options = {"bits": bits, "tol": tol, "layer_size": layer_size, "device": device}
        self.recorder, self.steps = None, []  # the steps recorded, in order

    def planned_steps(self, max_steps, epochs, steps_per_epoch):
        """The optimizer steps at which a run of max_steps steps records a snapshot."""
        planned = set()
        if self.every_steps:
            first = math.ceil(self.start_step / self.every_steps) * self.every_steps
            planned.update(range(first, max_steps + 1, self.every_steps))
        if self.at_epoch_end:
            ends = (min(e * steps_per_epoch, max_steps) for e in range(1, epochs + 1))
            planned.update(g for g in ends if g >= self.start_step)
        return sorted(planned)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        try:
            per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
            epochs = math.ceil(state.num_train_epochs)  # (as Trainer counts them)
        except TypeError:  # an iterable dataset: epochs of unknown length, within max_steps
            per_epoch, epochs = state.max_steps, 1
        planned = self.planned_steps(state.max_steps, epochs, per_epoch)
        if not planned:
            raise ValueError(f"SpanRecorder: start_step {self.start_step} lies past the run's "
                             f"{state.max_steps} steps: nothing would be recorded")
        if self.capacity is not None and self.capacity < len(planned):
            raise ValueError(f"SpanRecorder: capacity {self.capacity} is less than the "
                             f"{len(planned)} snapshots this run records")
        self.recorder = SubspaceRecorder(model, self.capacity or len(planned), **self.options)
        self.steps = []
        if state.global_step > 0:
            self._resume(args, state)
        elif planned[0] == 0:
            self._record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        g = state.global_step
        if self.every_steps and g >= self.start_step and g % self.every_steps == 0:
            self._record(model, g)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.at_epoch_end and state.global_step >= self.start_step:
            self._record(model, state.global_step)

    def _record(self, model, step):
        if self.steps[-1:] != [step]:
            self.recorder.add(model, name=f"step {step}")
            self.steps.append(step)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.recorder is None or not os.path.isdir(folder):  # a process that saved nothing
            return
        path = os.path.join(folder, self._file_name())
        temp = f"{path}.tmp"
        torch.save({"recorder": self.recorder.state_dict(), "steps": list(self.steps)}, temp)
        os.replace(temp, path)

    def _file_name(self):
        shard = self.recorder.shard
        return STATE_FILE.format(f"-rank{shard.rank}" if shard.world > 1 else "")

    def _resume(self, args, state):
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                            self._file_name())
        if not os.path.isfile(path):
            log.warning("SpanRecorder: resuming at step %d without %s: the span is recorded afresh "
                        "from here", state.global_step, path)
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.recorder.load_state_dict(saved["recorder"])  # refuses another model or capacity
        self.steps = list(saved["steps"])

    def subspace(self):
        """The twa.Subspace of the snapshots recorded (as Subspace.from_checkpoints of the same
        weights saved as files). The recorder hands its basis out: record anew to record more."""
        if self.recorder is None:
            raise ValueError("SpanRecorder: nothing recorded: Trainer.train() has not run with it")
        return self.recorder.subspace()


def checkpoints(model, sources):
    """`sources` for Subspace.from_checkpoints(model, ...) (or combination_residual), each
    safetensors file or folder (a Trainer's checkpoint-*/, save_pretrained's folder, sharded or
    not) checked readable and read under the model's own names: transformers may save a weight
    under the name it had in an older layout of the model (a ViT's
    vit.layers.0.attention.q_proj.weight as vit.encoder.layer.0.attention.attention.query.weight).
    Read a tensor at a time, as from the file. Other sources are returned as they are."""
    names, found = None, []
    for source in sources:
        if not isinstance(source, Mapping) and is_safetensors(source):
            check_readable(source)
            names = saved_names(model) if names is None else names
            source = _under_model_names(open_checkpoint(source), names)
        found.append(source)
    return found


def _under_model_names(state, names):
    """The tensors of `state` under the model's names: each name's first saved name that the file
    holds, else the name itself where the file holds it (a name the file lacks stays missing)."""
    renamed = {}
    for name, saved in names.items():
        held = next((s for s in [*saved, name] if s in state), None)
        if held is not None:
            renamed[name] = held
    return state.renamed(renamed)


def saved_names(model):
    """{name in model.state_dict(): the names that save_pretrained writes its tensor under} (more
    than one for a tensor that saving renames under several; none for one that it converts, e.g.
    fuses with others, which TWA cannot read back tensor by tensor)."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers that saves every tensor under the model's own name
        return {name: [name] for name in state}
    saved = {}
    for name, tensor in revert_weight_conversion(model, dict(state)).items():
        saved.setdefault(id(tensor), []).append(name)  # renamed tensors are passed through as they are
    return {name: saved.get(id(tensor), []) for name, tensor in state.items()}


class TWAResult(NamedTuple):
    """What train_twa returns: alpha (blocks x checkpoints) with sum_i alpha_bi w_i = the trained
    weights in block b, the subspace, the SubspaceOptimizer (its coordinates) and Trainer.train()'s
    TrainOutput."""
    alpha: torch.Tensor
    space: Subspace
    optimizer: SubspaceOptimizer
    output: Any


def train_twa(trainer, source, *, epochs, lr, momentum=0.9, weight_decay=1e-5,
              lr_scheduler_type="linear", bits=32, tol=1e-5, layer_size=None):
    """Train the averaging coefficients of `source` with `trainer` (the Trainer that trained the
    model, or one built like it): source is a SpanRecorder that recorded a run, a twa.Subspace,
    or a list of checkpoints (the Trainer's checkpoint-* folders, .safetensors files, torch.save
    files or state_dicts, built into a Subspace with bits, tol and layer_size).

    The model jumps to the snapshots' mean (the SWA point) and trains for `epochs` epochs through
    Trainer.train() with twa.SubspaceOptimizer(model, space, torch.optim.SGD, lr, momentum,
    weight_decay) as its optimizer and Hugging Face's lr_scheduler_type schedule over those steps
    (no warmup). The Trainer's other arguments hold (batch size, gradient accumulation, clipping
    with max_grad_norm, which acts on the model's gradients before their projection, evaluation,
    logging), but it saves no checkpoint and loads no best model meanwhile; its args and callbacks
    are restored afterwards and its optimizer is unset. BatchNorm statistics are then recomputed
    over one pass of the training data (a model without BatchNorm is left as trained). Returns a
    TWAResult; alpha is logged too.

    Refused with one error before anything changes: model_init, DeepSpeed, FSDP, fp16 (whose gradient
    scaler would unscale the coordinates, not the model's gradients; bf16 works), trainable
    parameters that are not float32, fewer than two snapshots."""
    _check_trainer(trainer)
    phase = _phase_args(trainer.args, epochs, lr, lr_scheduler_type)
    model = trainer.model
    space = _subspace(model, source, bits, tol, layer_size)
    optimizer = SubspaceOptimizer(model, space, torch.optim.SGD, lr=lr, momentum=momentum,
                                  weight_decay=weight_decay)
    output = _train_with(trainer, optimizer, phase)
    if batch_norm.batch_norm_layers(model):
        recompute_batch_norm(model, trainer.get_train_dataloader())
    alpha = space.checkpoint_coefficients(optimizer.coordinates)
    log.info("TWA: alpha %s", [[round(a, 4) for a in row] for row in alpha.tolist()])
    return TWAResult(alpha, space, optimizer, output)


def _check_trainer(trainer):
    """Refuse a Trainer that TWA cannot train through (see train_twa)."""
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a transformers.Trainer, not {type(trainer).__name__}")
    if trainer.model_init is not None:
        raise ValueError("train_twa needs a Trainer without model_init, which would build a new "
                         "model when the TWA phase starts")
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError("train_twa needs the model's own parameters: DeepSpeed and FSDP are not "
                         "supported")
    if trainer.args.fp16:
        raise ValueError("train_twa cannot run with fp16: its gradient scaler unscales the "
                         "optimizer's parameters (the coordinates), not the model's gradients; use "
                         "bf16 or float32")
    params = trainable_parameters(trainer.model)
    odd = next(((name, p.dtype) for name, p in params if p.dtype != torch.float32), None)
    if odd:
        raise ValueError(f"TWA needs float32 trainable parameters: '{odd[0]}' is {odd[1]} (load the "
                         "model in float32; bf16 autocast computes in lower precision)")


def _subspace(model, source, bits, tol, layer_size):
    """The Subspace of a SpanRecorder, a Subspace or a list of checkpoints, with at least two
    snapshots."""
    if isinstance(source, SpanRecorder):
        source = source.subspace()
    if not isinstance(source, Subspace):
        if isinstance(source, (str, bytes, os.PathLike, Mapping)) or not hasattr(source, "__len__"):
            raise TypeError("source must be a SpanRecorder, a twa.Subspace or a list of checkpoints, "
                            f"not a {type(source).__name__}")
        if len(source) < 2:
            raise ValueError(f"TWA needs at least two checkpoints, not {len(source)}")
        return from_checkpoints(model, checkpoints(model, source), bits=bits, tol=tol,
                                layer_size=layer_size)
    if len(source.names) < 2:
        raise ValueError(f"TWA needs at least two snapshots, the subspace has {len(source.names)}")
    return source


def _phase_args(args, epochs, lr, lr_scheduler_type):
    """The Trainer's arguments for the TWA phase: its own, with the phase's epochs and schedule,
    and no checkpoints (global steps restart at 0: checkpoint-<step> would replace the run's)."""
    if not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or not epochs > 0:
        raise ValueError(f"epochs must be a number > 0, not {epochs!r}")
    try:
        schedule = SchedulerType(lr_scheduler_type)
    except ValueError:
        raise ValueError(f"lr_scheduler_type must be one of Hugging Face's schedules "
                         f"{[t.value for t in SchedulerType]}, not {lr_scheduler_type!r}") from None
    phase = copy.copy(args)
    phase.num_train_epochs, phase.max_steps = epochs, -1
    phase.learning_rate, phase.lr_scheduler_type = lr, schedule
    phase.lr_scheduler_kwargs, phase.warmup_steps = {}, 0
    phase.save_strategy, phase.load_best_model_at_end, phase.push_to_hub = SaveStrategy.NO, False, False
    return phase


def _train_with(trainer, optimizer, phase):
    """Trainer.train() with `optimizer` (the Trainer builds the schedule over its steps) and
    `phase` as its arguments, no SpanRecorder recording; the Trainer's own restored after."""
    handler = trainer.callback_handler
    args, callbacks = trainer.args, handler.callbacks
    handler.callbacks = [c for c in callbacks if not isinstance(c, SpanRecorder)]
    trainer.args, trainer.optimizer, trainer.lr_scheduler = phase, optimizer, None
    try:
        return trainer.train()
    finally:
        trainer.args, trainer.optimizer, trainer.lr_scheduler = args, None, None
        handler.callbacks = callbacks


def recompute_batch_norm(model, batches):
    """BatchNorm statistics of the model's weights over one pass of `batches` (dicts of the model's
    keyword inputs; see twa.batchnorm)."""
    batch_norm.recompute_batch_norm(model, batches, lambda batch: model(**batch))
