"""Peak memory per rank and TWA step time on 1 and 2 processes (torchrun, Gloo on this CPU).

ResNet-20 with n = 101 checkpoints along a random walk (written once to a temporary folder). Each
rank builds its column shard of the basis from the files, then times TWA training steps (forward,
backward, reduce-scatter of the gradient, sharded projection, all-gather of the weights) on random
batches of the global batch size.

    python bench/sharding.py [--checkpoints 101] [--steps 20] [--batch-size 128]
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
import torch.nn.functional as F

import common
import distributed
import models
import twa


def write_checkpoints(folder, n, step=0.01, arch="resnet20"):
    model = models.build_model(arch, 10)
    gen = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n):
        state = {k: v + step * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in state.items()}
        torch.save(state, os.path.join(folder, f"{i}.pt"))


def time_steps(model, trainer, ctx, batch_size, steps):
    """Seconds per TWA step (forward, backward, trainer.step) on random CIFAR-sized batches, this
    process's share of the global batch, after one untimed step; the seconds of it spent in
    trainer.step (the projection, its collectives and the weight write); and the optimizer."""
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(ctx.rank)
    local = batch_size // ctx.world
    images, labels = torch.randn(local, 3, 32, 32, generator=gen), torch.randint(0, 10, (local,))

    def step():
        F.cross_entropy(model(images), labels).backward()
        started = time.perf_counter()
        trainer.step(optimizer)
        return time.perf_counter() - started
    step()
    started = time.perf_counter()
    in_trainer = sum(step() for _ in range(steps))
    return (time.perf_counter() - started) / steps, in_trainer / steps, optimizer


def worker(args):
    ctx = distributed.init(torch.device("cpu"))
    model = distributed.synchronise_batchnorm(models.build_model("resnet20", 10), ctx)
    files = [os.path.join(args.dir, f"{i}.pt") for i in range(args.checkpoints)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    space = twa.Subspace.from_checkpoints(model, files)
    build = time.perf_counter() - started
    trainer = twa.TWA(model, space)  # reduce-scatters the gradients itself: no DDP
    seconds, _, _ = time_steps(model, trainer, ctx, args.batch_size, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"rank": ctx.rank, "world": ctx.world, "build_s": build, "step_s": seconds,
           "peak_mib": peak / 1024, "peak_above_start_mib": (peak - before) / 1024,
           "basis_mib": space.nbytes() / 2**20, "columns": space.shard.local_size}
    with open(os.path.join(args.dir, f"result-{ctx.world}-{ctx.rank}.json"), "w") as f:
        json.dump(row, f)  # one file per rank: their stdout lines would interleave
    distributed.shutdown(ctx)


def launch(args, world, folder):
    threads = max(1, (os.cpu_count() or 1) // world)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--worker", "--dir", folder, "--checkpoints", str(args.checkpoints),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    subprocess.run(cmd, capture_output=True, text=True, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return [json.load(open(os.path.join(folder, f"result-{world}-{rank}.json"))) for rank in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=101, help="n")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoints(folder, args.checkpoints)
        for world in (1, 2):
            for r in sorted(launch(args, world, folder), key=lambda r: r["rank"]):
                rows.append([world, r["rank"], r["columns"], f"{r['basis_mib']:.1f}",
                             f"{r['peak_mib']:.0f}", f"{r['peak_above_start_mib']:.0f}",
                             f"{r['build_s']:.1f}", f"{r['step_s'] * 1e3:.0f}"])
    print(f"ResNet-20, n = {args.checkpoints}, global batch {args.batch_size}, Gloo on CPU, "
          f"{os.cpu_count()} cores shared by the ranks")
    common.print_table(["processes", "rank", "basis columns", "basis MiB", "peak RSS MiB",
                        "peak during build+train MiB", "build s", "step ms"], rows)


if __name__ == "__main__":
    main()
