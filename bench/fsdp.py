"""Memory per process and TWA step time: the DDP route (a whole model on every process, the basis
split by columns, a reduce-scatter of the gradient and an all-gather of the weights per step)
against the FSDP2 route (the model sharded by fully_shard, the basis following its shards, one
k-sized all-reduce per step), on 1, 2 and 4 processes (torchrun, Gloo on this CPU).

    python bench/fsdp.py [--arch VGG16BN] [--checkpoints 61] [--bits 32] [--worlds 1 2 4]

The checkpoints lie on a random walk, written once to a temporary folder. Bytes are counted from
the tensors each process holds: its parameters (local shards under FSDP), the basis, TWA's own
D-sized buffers and the optimizer's state; the peak RSS is beside them.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import common
import distributed
import models
import twa
from sharding import time_steps, write_checkpoints


def local_bytes(tensors):
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)


def worker(args):
    ctx = distributed.init(torch.device("cpu"))
    model = models.build_model(args.arch, 10)
    if args.route != "ddp":  # the scripts' --fsdp: per block, then the root
        model = distributed.shard(model, ctx, keep_gathered=args.route == "fsdp-keep")
    files = [os.path.join(args.dir, f"{i}.pt") for i in range(args.checkpoints)]
    started = time.perf_counter()
    space = twa.Subspace.from_checkpoints(model, files, bits=args.bits)
    build = time.perf_counter() - started
    trainer = twa.TWA(model, space)
    seconds, in_trainer, optimizer = time_steps(model, trainer, ctx, args.batch_size, args.steps)
    basis = {id(t) for block in space.blocks for t in block.basis.tensors().values()}
    own = [t for t in trainer.tensors() if id(t) not in basis and t is not trainer.trained]
    optimizer_state = [v for state in optimizer.state.values() for v in state.values()
                       if torch.is_tensor(v)]
    row = {"rank": ctx.rank, "world": ctx.world, "route": args.route, "build_s": build,
           "step_s": seconds, "trainer_s": in_trainer, "params": local_bytes(model.parameters()),
           "basis": space.nbytes(),
           "twa_buffers": local_bytes(own), "optimizer": local_bytes([trainer.trained, *optimizer_state]),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "columns": space.shard.local_size}
    with open(os.path.join(args.dir, f"result-{args.route}-{ctx.world}-{ctx.rank}.json"), "w") as f:
        json.dump(row, f)  # one file per rank: their stdout lines would interleave
    del model, space, trainer, optimizer  # before the group goes: see distributed.leave
    distributed.shutdown(ctx)


def launch(args, route, world, folder):
    threads = max(1, (os.cpu_count() or 1) // world)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--worker", "--route", route, "--dir", folder, "--arch", args.arch,
           "--checkpoints", str(args.checkpoints), "--bits", str(args.bits),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        sys.exit(f"{route} on {world} processes failed:\n{proc.stderr[-2000:]}")
    return [json.load(open(os.path.join(folder, f"result-{route}-{world}-{rank}.json")))
            for rank in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="VGG16BN", help="a model of models/ (10 classes)")
    parser.add_argument("--checkpoints", type=int, default=61, help="n")
    parser.add_argument("--bits", "--pbits", dest="bits", type=int, default=32, choices=(32, 16, 8, 4),
                        help="basis storage")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="global batch size")
    parser.add_argument("--routes", nargs="+", default=["ddp", "fsdp"], choices=("ddp", "fsdp", "fsdp-keep"),
                        help="ddp: a whole model per process; fsdp: --fsdp; fsdp-keep: --fsdp "
                        "--fsdp-keep-gathered")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--route", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows, worst_of, mib = [], {}, 2 ** 20
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoints(folder, args.checkpoints, arch=args.arch)
        for world in args.worlds:
            for route in args.routes:
                ranks = launch(args, route, world, folder)
                worst = max(ranks, key=lambda r: r["params"] + r["basis"] + r["twa_buffers"])
                worst["total"] = worst["params"] + worst["basis"] + worst["twa_buffers"] + worst["optimizer"]
                worst["step_s"] = max(r["step_s"] for r in ranks)
                worst["trainer_s"] = max(r["trainer_s"] for r in ranks)
                worst_of[world, route] = worst
                rows.append([world, route, f"{worst['params'] / mib:.1f}", f"{worst['basis'] / mib:.0f}",
                             f"{worst['twa_buffers'] / mib:.0f}", f"{worst['optimizer'] / 1024:.1f}",
                             f"{worst['total'] / mib:.0f}", f"{max(r['peak_rss'] for r in ranks) / mib:.0f}",
                             f"{max(r['build_s'] for r in ranks):.1f}", f"{worst['step_s'] * 1e3:.0f}",
                             f"{worst['trainer_s'] * 1e3:.0f}"])
    print(f"{args.arch}, n = {args.checkpoints}, {args.bits}-bit basis, global batch "
          f"{args.batch_size}, Gloo on CPU, {os.cpu_count()} cores shared by the processes; per "
          "process (the largest rank)")
    common.print_table(["processes", "route", "params MiB", "basis MiB", "TWA buffers MiB",
                        "optimizer KiB", "total MiB", "peak RSS MiB", "build s", "step ms",
                        "of it in TWA.step ms"], rows)
    print_ratios(worst_of, args.worlds, args.routes)


def print_ratios(worst_of, worlds, routes):
    """The issue's targets, against the smallest world run (one process): each process's basis
    against its share of that one's, each process's tensors against that one's, and each sharded
    route's step against the DDP route's."""
    base = min(worlds)
    for world in sorted(w for w in worlds if w > base):
        for route in routes:
            now, then = worst_of[world, route], worst_of[base, route]
            line = (f"{world} processes against {base}, {route}: basis per process "
                    f"{now['basis'] / (then['basis'] * base / world):.3f}x its share, tensors per "
                    f"process {now['total'] / then['total']:.2f}x")
            if route != "ddp" and "ddp" in routes:
                ddp = worst_of[world, "ddp"]
                passes = (now["step_s"] - now["trainer_s"]) / (ddp["step_s"] - ddp["trainer_s"])
                line += (f", TWA step {now['step_s'] / ddp['step_s']:.2f}x DDP's (forward and "
                         f"backward {passes:.2f}x, TWA.step {now['trainer_s'] / ddp['trainer_s']:.2f}x)")
            print(line)

if __name__ == "__main__":
    main()
