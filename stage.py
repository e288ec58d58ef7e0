"""The TWA stage that both scripts run once they have a subspace: SWA (the checkpoints' mean with
BatchNorm recomputed), training in the subspace (resumable), and the results: twa.pt,
coefficients.json (the alphas) and twa_results.json. train_twa.py gets the subspace from checkpoint
files, train_sgd.py --twa-at from the weights it recorded."""
import logging
import os
import time
from dataclasses import dataclass

import torch

import cli
import distributed
import loop
import runfiles
import schedules
import twa
import utils

log = logging.getLogger("twa")
STATE = "twa_state.pt"


@dataclass(frozen=True)
class TWASettings:
    """What the TWA stage reads, from either script's flags: of_train_twa and of_train_sgd are the
    one place each script's names are mapped (train_sgd's --twa-lr is this stage's lr)."""
    loop: loop.LoopSettings
    opt: str
    weight_decay: float
    momentum: float
    schedule: str
    warmup_epochs: float
    bn: tuple
    train: str
    val_split: float
    randomseed: int
    deterministic: bool
    output_dir: str
    log_dir: str
    flags: dict  # the script's flags as given, recorded in the results and the resume state
    named_checkpoints: bool = False  # --checkpoints: the names are paths, kept whole

    @classmethod
    def of_train_twa(cls, args):
        return cls(loop.LoopSettings.from_flags(args), args.opt, args.weight_decay, args.momentum,
                   args.schedule, args.warmup_epochs, tuple(args.bn), args.train,
                   args.val_split, args.randomseed, args.deterministic, args.output_dir,
                   args.log_dir, dict(vars(args)), named_checkpoints=bool(args.checkpoints))

    @classmethod
    def of_train_sgd(cls, args):
        """--twa-at: TWA from the mean for --twa-epochs at --twa-lr and --twa-wd, BatchNorm
        recomputed, the outputs beside the checkpoints."""
        return cls(loop.LoopSettings.from_flags(args, epochs=args.twa_epochs, lr=args.twa_lr),
                   args.twa_opt, args.twa_wd, args.momentum, args.twa_schedule, 0.0, ("recompute",),
                   args.train, args.val_split, args.randomseed, args.deterministic,
                   args.save_dir, args.log_dir, dict(vars(args)))


def train_in_subspace(settings, ctx, loaders, model, space, report, state_path, inputs, resume=None,
                      soups_beside=None, start=None):
    """SWA (the mean, BatchNorm recomputed), then TWA (a TWASettings) from the mean or start(trainer),
    resumable through state_path; writes twa.pt, coefficients.json and twa_results.json."""
    # the same random draws (dropout) whether the subspace came from files or from this process's SGD
    utils.seed_everything(settings.randomseed, settings.deterministic, ctx.rank)
    try:
        trainer = twa.TWA(model, space, train=settings.train)  # the model holds the mean: SWA
    except ValueError as err:  # e.g. nothing to train: rank 0, or alpha with every checkpoint the mean
        hint = "; check the checkpoints, --tol and --train" if "nothing to train" in str(err) else ""
        raise cli.UsageError(f"{err}{hint}") from None
    loaders.train.set_epoch(0)  # the same crops for SWA's BatchNorm pass, after SGD in this process too
    swa = evaluate(model, loaders, settings.loop.amp, ctx)
    log.info("SWA: test loss %.4f acc %.2f", swa["loss"], swa["accuracy"])
    soups = soups_beside(swa) if soups_beside else None
    if start:
        start(trainer)
    if settings.loop.cuda_graphs:  # captured graphs read them where they are; others are copied in
        for tensor in trainer.tensors():
            torch._dynamo.mark_static_address(tensor)
    optimizer = make_optimizer(settings, trainer.parameters())
    metrics = runfiles.Metrics(os.path.join(settings.log_dir, "metrics.jsonl"), "twa",
                            resume["metrics"] if resume else (), enabled=ctx.is_main)
    progress = {"epoch": 0, "batch": 0, "totals": None, "elapsed": 0.0}
    if resume:
        trainer.move_to(resume["trained"])
        model.load_state_dict(resume["buffers"], strict=False)
        loop.load_optimizer(optimizer, resume["optimizer"], settings.loop, trainer.trained.device)
        utils.restore_rng(resume["rng"], ctx)
        progress = resume["progress"]
        log.info("resumed at epoch %d, batch %d", progress["epoch"], progress["batch"])

    def save_state():
        loop.check_finite([trainer.trained.detach(), *model.state_dict().values()], "TWA's state")
        rng = utils.all_rng_states(ctx)
        if not ctx.is_main:
            return
        buffers = {k: v for k, v in model.state_dict().items() if k not in dict(model.named_parameters())}
        runfiles.save_torch({"trained": trainer.trained.detach(), "buffers": buffers,
                             "optimizer": optimizer.state_dict(), "rng": rng, "progress": progress,
                             "metrics": metrics.rows, "args": settings.flags, "inputs": inputs},
                            state_path)

    def update(lr):
        loop.set_lr(optimizer, lr)
        trainer.step(optimizer)

    # TWA-v trains the coefficients on the held-out part, TWA-t on the training part
    coefficient_data = loaders.held_out if settings.val_split else loaders.train
    log.info("training the coefficients on the %s (%s)", "held-out part" if settings.val_split else
             "training images", "TWA-v" if settings.val_split else "TWA-t")
    train_started = time.time()
    # the model itself, not DistributedDataParallel: TWA.step reduce-scatters the gradients
    schedule = schedules.Schedule(settings.schedule, settings.loop.lr, settings.loop.epochs,
                                  settings.warmup_epochs)
    loop.run_epochs(settings.loop, ctx, model, model, (coefficient_data, loaders.test), update, progress,
                    metrics, save_state, schedule)
    by_bn = evaluate_final(model, loaders, settings, ctx)
    final = by_bn[settings.bn[0]]
    for mode, result in by_bn.items():
        log.info("TWA after BN %s: test loss %.4f acc %.2f (SWA %.2f)", mode, result["loss"],
                 result["accuracy"], swa["accuracy"])
    alpha = space.checkpoint_coefficients(trainer.coordinates)
    # only checkpoint files can be read again; the weights recorded in memory are gone
    sources = inputs.get("checkpoints")
    residual = twa.combination_residual(space, model, sources, alpha) if sources else None
    if residual and residual["relative"] is not None:
        log.info("sum_i alpha_i w_i misses the TWA weights by %.2g of their move from the mean",
                 residual["relative"])
    weights = distributed.full_state_dict(model, ctx)  # every rank: a sharded model gathers
    if ctx.is_main:
        write_results(settings, weights, space, trainer, alpha, residual,
                      {"swa": swa, "twa": final, "twa_by_bn": by_bn, "soup": soups, **report,
                       "train_seconds": time.time() - train_started})


def evaluate_final(model, loaders, settings, ctx):
    """The trained weights evaluated with the BatchNorm statistics of each of settings.bn, every mode
    starting from the statistics that training left; the model keeps those of the first mode."""
    trained = {name: buffer.clone() for name, buffer in model.named_buffers()}
    results = {}
    for mode in reversed(settings.bn):
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(trained[name])
        # the pass sees one fixed epoch's crops, also when a resumed run has no epoch left
        loaders.train.set_epoch(settings.loop.epochs)
        results[mode] = evaluate(model, loaders, settings.loop.amp, ctx, bn=mode)
    return {mode: results[mode] for mode in settings.bn}


def evaluate(model, loaders, amp, ctx, bn="recompute"):
    """loop.evaluate on the run's test images, and on its held-out part when there is one, after
    BatchNorm statistics for an average of models (loop.recompute_bn in mode `bn`; None keeps the
    model's)."""
    if bn:
        loop.recompute_bn(model, loaders.train, bn)
    result = loop.evaluate(model, loaders.test, amp, ctx)
    if loaders.held_out_eval is not None:
        result["held_out"] = loop.evaluate(model, loaders.held_out_eval, amp, ctx)
    return result


def basis_report(space, seconds, bits, ctx, **extra):
    """What twa_results.json says of the basis, whichever way it was built."""
    return {"checkpoints": len(space.names), "rank": space.rank, "blocks": len(space.blocks),
            "seconds": seconds, **space.basis_quality(), "bits": bits,
            "basis_bytes_per_process": space.nbytes(), "processes": ctx.world,
            "columns_per_process": space.shard.local_size, **extra}


def make_optimizer(settings, params):
    lr = loop.learning_rate(settings.loop, params[0].device)
    if settings.opt == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def write_results(settings, weights, space, trainer, alpha, residual, results):
    names = [path if settings.named_checkpoints else os.path.basename(path) for path in space.names]
    blocks = [{"parameters": block.names, "entries": block.entries, "alpha": a.tolist()}
              for block, a in zip(space.blocks, alpha)]
    coefficients = {"checkpoints": names, "alpha": alpha[0].tolist() if len(blocks) == 1 else None,
                    "blocks": blocks, "uniform": 1.0 / len(names), "train": settings.train,
                    "reconstruction": residual,
                    "coordinates": trainer.coordinates.detach().cpu().double().tolist()}
    results = {**results, "mode": "TWA-v" if settings.val_split else "TWA-t", "args": settings.flags,
               "git": runfiles.git_revision()}
    # replaced together: a failed write leaves the previous run's three files, not a mix
    runfiles.atomic_write_all([
        (os.path.join(settings.output_dir, "twa.pt"), runfiles.torch_writer(weights)),
        (os.path.join(settings.output_dir, "coefficients.json"), runfiles.json_writer(coefficients)),
        (os.path.join(settings.log_dir, "twa_results.json"), runfiles.json_writer(results))])
    log.info("wrote twa.pt and coefficients.json to %s", settings.output_dir)
