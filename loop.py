"""The training loop both scripts share: the epoch loop with its stop requests and progress, the
step, evaluation and the BatchNorm recompute; the rates come from a schedules.Schedule. Knows
nothing of TWA."""
import contextlib
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

import distributed
import packed_bits
from twa.checkpoints import reshard

log = logging.getLogger("twa")


@dataclass(frozen=True)
class LoopSettings:
    """What the epoch loop reads of a script's flags: the stage's length and base rate, the logging
    cadence, and how a step runs. from_flags is the one place that maps the flags onto it."""
    epochs: int
    lr: float
    print_freq: int = 50
    eval_every: int = 1
    quiet: bool = True
    amp: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    label_smoothing: float = 0.0

    @classmethod
    def from_flags(cls, args, epochs=None, lr=None):
        """From the flags of cli.add_common_args; epochs and lr, when given, are the stage's own
        (train_sgd's TWA stage: --twa-epochs and --twa-lr)."""
        return cls(epochs=args.epochs if epochs is None else epochs, lr=args.lr if lr is None else lr,
                   print_freq=args.print_freq, eval_every=args.eval_every, quiet=args.quiet,
                   amp=args.amp, compile=args.compile, cuda_graphs=args.cuda_graphs,
                   label_smoothing=args.label_smoothing)


def check_finite(tensors, what):
    """Raise FloatingPointError (exit 1, the last saved state kept) unless every value is finite: run
    before anything is saved, so that no checkpoint or resume state ever holds a NaN or an Inf. Of a
    sharded model each process sees its own rows: they agree, so that all stop together."""
    tensors = [t for t in tensors if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(_local(t)).all() for t in tensors]).all().to(torch.int32)
    sharded = next((t for t in tensors if isinstance(t, DTensor)), None)
    if sharded is not None:
        torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN,
                                     group=sharded.device_mesh.get_group())
    if not bool(finite):  # one device-to-host read per save, not per step
        raise FloatingPointError(f"non-finite values in {what}; nothing was saved, the last saved "
                                 "state is kept")


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def at_least_float32(logits):
    """Logits for the loss: bfloat16 ones (--amp) widened to float32, where the softmax keeps its
    small probabilities; float64 ones (a float64 model) kept as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def set_lr(optimizer, lr):
    """Set the rate of every group; a rate held as a tensor (see learning_rate) is filled in place
    (fill_ launches a kernel on a GPU; copying a host value would wait for the device)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def learning_rate(settings, device):
    """The rate an optimizer starts from: with --compile a tensor on the device, so that a compiled
    step that sets a new rate every step is traced once, not once per value."""
    return torch.tensor(settings.lr, device=device) if settings.compile else settings.lr


def load_optimizer(optimizer, state, settings, device, model=None):
    """Load an optimizer_state (of `model`'s parameters when given: a sharded model's is keyed by
    name), keeping the rate in the form learning_rate gives: the saved groups would otherwise bring
    back the form (and device) of the run that saved them."""
    if model is None:
        optimizer.load_state_dict(state)
    else:
        distributed.load_optimizer_state(model, optimizer, state)
    restore_rate_form(optimizer, settings, device)


def restore_rate_form(optimizer, settings, device):
    """The rate of every group in the form learning_rate gives (after loading a saved state)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(settings, device)


def make_step(forward, update, settings, ctx):
    """step(images, labels, lr, scale) -> (summed loss, correct count): forward, the loss as this
    rank's sum times `scale`, backward and update(lr). With --compile the whole step is compiled
    (forward and backward graphs, the projection and the optimizer between), with lr and scale
    passed as tensors on the device, filled in place, so that it is traced once. --cuda-graphs
    captures the compiled graphs with CUDA graphs (torch.compile's "reduce-overhead"), one per batch
    shape: shapes are kept static, so the last partial batch gets graphs of its own."""
    def step(images, labels, lr, scale):
        with autocast(ctx.device, settings.amp):
            logits = forward(images)
        loss = F.cross_entropy(at_least_float32(logits), labels, label_smoothing=settings.label_smoothing,
                               reduction="sum")
        (loss * scale).backward()
        update(lr)
        return loss.detach(), (logits.argmax(1) == labels).sum()
    if not settings.compile:
        return step
    graphs = settings.cuda_graphs
    if graphs and ctx.device.type != "cuda":
        log.warning("--cuda-graphs: CUDA graphs need a CUDA device; on %s the step is compiled "
                    "without them", ctx.device.type)
    compiled = torch.compile(step, mode="reduce-overhead" if graphs else None,
                             dynamic=False if graphs else None)
    lr_tensor, scale_tensor = torch.zeros((), device=ctx.device), torch.zeros((), device=ctx.device)
    calls = 0

    def compiled_step(images, labels, lr, scale):
        nonlocal calls
        if graphs:  # the outputs of the previous replay have been read: its buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        loss, correct = compiled(images, labels, lr_tensor.fill_(lr), scale_tensor.fill_(scale))
        calls += 1
        if graphs and calls == 3 and ctx.device.type == "cuda":  # warm-up and capture are done
            report_graph_skips()
        return loss, correct
    return compiled_step


def report_graph_skips():
    """Warn when torch.compile ran some graphs of the step without capturing them."""
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    if skipped:
        log.warning("--cuda-graphs: %d compiled graphs of the step run without CUDA graphs "
                    "(TORCH_LOGS=perf_hints says why)", skipped)


def autocast(device, enabled):
    """bfloat16 autocast when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def evaluate(model, loader, amp=False, ctx=None):
    """{'loss', 'accuracy' (percent), 'correct'} of `model` over the unshuffled `loader` (each rank's
    share, summed); 'correct' says which examples it got right, in the data's order, as packed bits
    (packed_bits.pack_bits), so that two models scored on the same data can be compared pairwise."""
    # FSDP2 keeps the storage of the weights it gathers for later forwards: allocated in inference
    # mode, no training step could write it again
    with torch.no_grad() if distributed.is_sharded(model) else torch.inference_mode():
        result = _evaluate(model, loader, amp, ctx)
    reshard(model)  # FSDP2 keeps the root's weights gathered after a forward with no backward
    return result


def _evaluate(model, loader, amp, ctx):
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    right = torch.zeros(loader.n, dtype=torch.int32, device=device)
    shares = iter(loader.shares(loader.order(None)))
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images)
        hits = logits.argmax(1) == labels
        sums[0] += F.cross_entropy(at_least_float32(logits), labels, reduction="sum")
        sums[1] += hits.sum()
        sums[2] += len(labels)
        right[next(shares).to(device)] = hits.to(torch.int32)
    loss, correct, count = distributed.sum_(sums, ctx).tolist() if ctx else sums.tolist()
    right = distributed.sum_(right, ctx) if ctx else right  # each example is one rank's
    return {"loss": loss / count, "accuracy": 100.0 * correct / count,
            "correct": packed_bits.pack_bits(right.cpu().numpy())}


BN_MODES = ("recompute", "running")


def recompute_bn(model, loader, mode="recompute"):
    """BatchNorm statistics for weights that no training step produced (an average of models).
    recompute: reset them and take the cumulative average over one pass of `loader`. running: one
    more pass in train mode that updates the running averages with each layer's momentum (0.1),
    without a reset (the reference's bn_update after TWA)."""
    if mode == "recompute":
        update_bn(loader, model)
        return
    if mode != "running":
        raise ValueError(f"unknown BatchNorm mode {mode!r}")
    was_training = model.training
    model.train()
    with torch.no_grad():
        for images, _ in loader:
            model(images)
    model.train(was_training)


def progress_bar(enabled):
    """A progress(iterable, description) wrapper: tqdm on a terminal, else the iterable itself."""
    if not enabled or not sys.stdout.isatty():
        return lambda items, desc=None, **kw: items
    return lambda items, desc=None, **kw: tqdm(items, desc=desc, leave=False, dynamic_ncols=True, **kw)


class Interrupt:
    """The SIGINT/SIGTERM handler outside the epochs: it raises KeyboardInterrupt at once, and keeps
    the signal's name too. Python drops an exception raised inside a weakref callback or __del__ (an
    import's module-lock cleanup is one), which would lose the signal: the epochs' StopRequest then
    starts with it and stops at the first step instead."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signal.Signals(signum).name
        raise KeyboardInterrupt

    def unraisable(self, default_hook):
        """A sys.unraisablehook that is silent on the KeyboardInterrupt this handler raised (kept in
        self.signal) and passes anything else on to default_hook."""
        def hook(unraisable):
            if not (self.signal and unraisable.exc_type is KeyboardInterrupt):
                default_hook(unraisable)
        return hook


class StopRequest:
    """While active (a context manager), SIGINT/SIGTERM set a flag that the training loop checks, so
    that it saves a resumable state and exits; a second signal stops at once. A signal that an
    Interrupt handler took before (and Python dropped) counts as the first."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
            self.signal = self.signal or getattr(self.previous[sig], "signal", None)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __bool__(self):
        return self.signal is not None


def run_epochs(settings, ctx, model, forward, loaders, update, progress, metrics, save_state, schedule,
               on_step=lambda batch: False, until=None):
    """Train epochs progress["epoch"] .. settings.epochs - 1 (or until - 1: the schedule still spans
    settings.epochs) at the rates of `schedule` (a schedules.Schedule) and evaluate after each.
    update(lr) applies one optimizer step; on_step(batch) may save a checkpoint and says whether the
    resume state must be saved as well. SIGINT/SIGTERM (on any rank) save the state at the next step
    and exit with code 143."""
    train_loader, test_loader = loaders
    if schedule.name == "step" and schedule.epochs == 1:
        log.warning("the step schedule over 1 epoch runs at lr / 10 throughout (its first decay is at "
                    "epoch 0); step-fraction decays at 50% and 75% of the steps instead")
    step = make_step(forward, update, settings, ctx)
    steps = len(train_loader)
    bar = progress_bar(not settings.quiet and ctx.is_main)
    last = until or settings.epochs
    epochs = bar(range(progress["epoch"], last), desc=metrics.stage, initial=progress["epoch"],
                 total=last)
    with StopRequest() as stop:
        for epoch in epochs:
            started, spent_before = time.time(), progress["elapsed"]
            train_loader.set_epoch(epoch)

            def lr_for_batch(batch):
                return schedule.rate(epoch, batch, steps)

            def after_step(batch, totals):
                # under torchrun the ranks agree on a stop request every -p steps (an all-reduce
                # and a read of one number), not every step; alone, the flag is read as it is
                agree = ctx.world == 1 or (batch + 1) % settings.print_freq == 0 or batch + 1 == steps
                stopping = agree and distributed.any_(bool(stop), ctx)
                if on_step(batch) and batch + 1 < steps or stopping:
                    progress.update(batch=batch + 1, totals=totals(),
                                    elapsed=spent_before + time.time() - started)
                    save_state()
                return stopping

            totals = train_epoch(model, step, train_loader, epoch, lr_for_batch, settings, ctx,
                                 progress["batch"], progress["totals"], after_step)
            if totals is None:
                stopped(stop, f"in epoch {epoch} at step {progress['batch']}")
            elapsed = spent_before + time.time() - started
            test = {"loss": None, "accuracy": None, "correct": None}
            if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == last:
                test = evaluate(model, test_loader, settings.amp, ctx)
            metrics.append({"epoch": epoch + 1, "lr": lr_for_batch(steps - 1),
                            "train_loss": totals["loss"] / totals["count"],
                            "train_acc": 100 * totals["correct"] / totals["count"],
                            "test_loss": test["loss"], "test_acc": test["accuracy"],
                            "test_correct": test["correct"], "time": elapsed})
            log.info("%s epoch %d/%d: train loss %.4f%s (%.0f s)", metrics.stage, epoch + 1,
                     settings.epochs, totals["loss"] / totals["count"], "" if test["loss"] is None else
                     f", test loss {test['loss']:.4f} acc {test['accuracy']:.2f}", elapsed)
            progress.update(epoch=epoch + 1, batch=0, totals=None, elapsed=0.0)
            save_state()
            if epoch + 1 < last and distributed.any_(bool(stop), ctx):  # one during the evaluation
                stopped(stop, f"after epoch {epoch + 1}")


def stopped(stop, where):
    log.info("stopped by %s %s; state saved, continue with --resume", stop.signal or "another rank",
             where)
    raise SystemExit(128 + signal.SIGTERM)


def train_epoch(model, step, loader, epoch, lr_for_batch, settings, ctx, start_batch=0,
                totals=None, after_step=lambda batch, totals: False):
    """One epoch from batch `start_batch` on, one step(images, labels, lr, scale) (make_step) per
    batch. Loss and accuracy are summed on the device and read (over all ranks) only at each log
    line, every -p steps, where they are checked to be finite. Returns the epoch's totals, or None
    when after_step(batch, totals) asks to stop."""
    model.train()
    device = next(model.parameters()).device
    base = totals or {"loss": 0.0, "correct": 0, "count": 0}
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count of this rank

    def merged():
        loss, correct, count = distributed.sum_(sums.clone(), ctx).tolist()
        return {"loss": base["loss"] + loss, "correct": base["correct"] + int(correct),
                "count": base["count"] + int(count)}

    batches = progress_bar(not settings.quiet and ctx.is_main)(
        loader.batches(start_batch), desc=f"epoch {epoch}", total=len(loader) - start_batch)
    for batch, (images, labels) in enumerate(batches, start=start_batch):
        lr = lr_for_batch(batch)
        # this rank's sum over the global batch's count, times the world that DDP divides by: the
        # one-process mean loss whatever the shares' sizes (an uneven last batch, an empty share)
        loss, correct = step(images, labels, lr, ctx.world / loader.global_size(batch))
        sums[0] += loss
        sums[1] += correct
        sums[2] += len(labels)
        if (batch + 1) % settings.print_freq == 0 or batch + 1 == len(loader):
            now = merged()
            if not math.isfinite(now["loss"]):
                raise FloatingPointError(f"non-finite loss in epoch {epoch} by step {batch + 1}; the "
                                         "last saved state is kept")
            log.info("epoch %d [%d/%d] lr %.4g loss %.4f acc %.2f", epoch, batch + 1, len(loader), lr,
                     now["loss"] / now["count"], 100 * now["correct"] / now["count"])
        if after_step(batch, merged):
            return None
    return merged()
