"""Building the basis: time, peak memory and orthogonality, ours against a naive reference loop.

For each size D and count n: n checkpoint files along a random walk (small steps; the cosine between
neighbours is printed, >= 0.99), then, each in a fresh process so that peak memory is its own:
  - ours: twa.Subspace.from_checkpoints streaming the files (two passes, one file in memory at a
    time), at each storage precision;
  - naive: every checkpoint loaded into one float32 n x D matrix, then one pass of classical
    Gram-Schmidt in float32 (what the reference code does, minus its extra copies).
Peak memory is the process's peak resident size during the build (the kernel's mark is reset just
before it) above its size at that point; the table also
gives it as a multiple of the basis's own bytes (n x D x bytes per entry). Also real ResNet-20
checkpoints with --real DIR (files 0.pt .. n-1.pt).

    python bench/basis.py [--quick] [--real DIR --real-count N]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import common
import twa

ALL_BITS = (32, 16, 8, 4)
# (D, n, storage precisions): the low-bit builds of the largest case take too long on 2 cores
CONFIGS = [(270_000, 20, ALL_BITS), (270_000, 100, ALL_BITS), (15_000_000, 20, ALL_BITS),
           (15_000_000, 100, (32,))]
QUICK = [(270_000, 20, ALL_BITS), (270_000, 100, (32, 8))]


class Flat(nn.Module):
    """A model that is one parameter vector of size D."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))


def write_random_walk(folder, dim, n, step=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=gen)
    first = None
    for i in range(n):
        w += step * torch.randn(dim, generator=gen)
        torch.save({"w": w}, os.path.join(folder, f"{i}.pt"))
        if i == 0:
            first = w.clone()
        if i == 1:
            cosine = torch.nn.functional.cosine_similarity(first, w, dim=0).item()
    return cosine


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():
    """Make the kernel's peak-RSS mark start again from the current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes():
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def naive_build(model, files, dim):
    """All checkpoints in one float32 matrix, then one classical Gram-Schmidt pass."""
    p = torch.empty(len(files), dim)
    params = twa.trainable_parameters(model)
    for i, f in enumerate(files):
        twa.checkpoints.flatten_checkpoint(twa.checkpoints.load_state_dict(f), params, out=p[i])
    return common.one_pass_gram_schmidt_(p)


def orthogonality_error(p):
    gram = torch.zeros(len(p), len(p), dtype=torch.float64)
    for start in range(0, p.shape[1], 1 << 16):
        block = p[:, start:start + (1 << 16)].double()
        gram += block @ block.t()
    return (gram - torch.eye(len(p), dtype=torch.float64)).abs().max().item()


def worker(args):
    """One build in this process; prints a JSON line."""
    torch.set_num_threads(torch.get_num_threads())
    if args.real:
        import models
        model = models.build_model("resnet20", 10)
        files = [os.path.join(args.dir, f"{i}.pt") for i in range(args.count)]
    else:
        model = Flat(args.dim)
        files = [os.path.join(args.dir, f"{i}.pt") for i in range(args.count)]
    dim = sum(p.numel() for p in model.parameters())
    reset_peak()
    before = resident_bytes()
    started = time.perf_counter()
    if args.method == "naive":
        p = naive_build(model, files, dim)
        seconds, peak = time.perf_counter() - started, peak_bytes() - before
        error, rank, stored = orthogonality_error(p), len(p), p.nbytes
    else:
        space = twa.Subspace.from_checkpoints(model, files, bits=args.bits)
        seconds, peak = time.perf_counter() - started, peak_bytes() - before
        error, rank, stored = space.orthogonality_error(), space.rank, space.nbytes()
    print(json.dumps({"seconds": seconds, "peak": peak, "error": error, "rank": rank,
                      "stored": stored, "dim": dim}))


def run_worker(folder, method, count, dim=0, bits=32, real=False):
    cmd = [sys.executable, __file__, "--worker", method, "--dir", folder, "--count", str(count),
           "--dim", str(dim), "--bits", str(bits)] + (["--real"] if real else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def row(label, n, result, bits):
    ideal = n * result["dim"] * bits / 8
    return [label, n, f"{result['dim'] / 1e6:.2f}M", bits, f"{result['seconds']:.1f}",
            f"{result['peak'] / 2**20:.0f}", f"{result['peak'] / ideal:.2f}", f"{result['error']:.1e}",
            result["rank"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the small cases")
    parser.add_argument("--real", nargs="?", const=True, default=None,
                        help="a folder of real ResNet-20 checkpoints 0.pt .. (n-1).pt")
    parser.add_argument("--real-count", type=int, default=20, help="real checkpoints to use")
    parser.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.method = args.worker
        args.real = bool(args.real)
        return worker(args)
    header = ["method", "n", "D", "bits", "seconds", "peak MiB", "peak / (n D bits/8)",
              "max|PP^T-I|", "rank"]
    rows = []
    for dim, n, bits_list in (QUICK if args.quick else CONFIGS):
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
            cosine = write_random_walk(folder, dim, n)
            print(f"random walk n={n} D={dim}: cosine of neighbours {cosine:.4f}", flush=True)
            naive = run_worker(folder, "naive", n, dim)
            rows.append(row("naive CGS, float32", n, naive, 32))
            for bits in bits_list:
                rows.append(row("ours (CGS2, streamed)", n, run_worker(folder, "ours", n, dim, bits), bits))
            print(f"  naive {naive['error']:.1e} vs ours {rows[-len(bits_list)][7]}", flush=True)
    if args.real:
        rows.append(row("naive, real ResNet-20 ckpts", args.real_count,
                        run_worker(args.real, "naive", args.real_count, real=True), 32))
        for bits in ALL_BITS:
            result = run_worker(args.real, "ours", args.real_count, bits=bits, real=True)
            rows.append(row("ours, real ResNet-20 ckpts", args.real_count, result, bits))
    print(f"\nbasis build, torch threads {torch.get_num_threads()}")
    common.print_table(header, rows)


if __name__ == "__main__":
    main()
