"""Per-step cost of TWA, side by side in one run.

1. Memory bandwidth, measured by copying a large tensor (bytes read + written per second).
2. The projection of one step (c = P g, then weights = mean + P^T (c - c0)) for each storage
   precision at D = 15M, n = 101 (VGG16BN size), against the floor 2 x bytes(P) / bandwidth: a
   step must read P twice.
3. A whole training step (forward, backward, update) with TWA against plain SGD for ResNet-20 with
   n = 31 and VGG16BN with n = 101, on one batch of random images, interleaved rounds.

    python bench/step.py [--quick] [--rounds 5]
"""
import argparse

import torch
import torch.nn.functional as F

import common
import models
import twa

BITS = (32, 16, 8, 4)


def random_subspace(dim, n, bits, seed=0):
    """A Subspace whose basis holds random rows (timing does not depend on their values)."""
    gen = torch.Generator().manual_seed(seed)
    basis = twa.Basis(n, dim, bits)
    if bits >= 16:
        for i in range(n):
            basis.data[i] = torch.randn(dim, generator=gen) / dim ** 0.5
    else:
        basis.data.random_(0, 256, generator=gen)
        basis.scale.fill_(1e-4)
        basis.low.fill_(-1e-4 * 127)
    basis.rows = n
    span = twa.Span(basis, slice(0, dim), torch.zeros(n, n, dtype=torch.float64),
                    torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64))
    return twa.Subspace([span], torch.randn(dim, generator=gen), [f"{i}.pt" for i in range(n)])


def bandwidth(rounds):
    src = torch.randn(1 << 28)  # 1 GiB
    dst = torch.empty_like(src)
    seconds = min(common.timed(lambda: dst.copy_(src), torch.device("cpu")) for _ in range(rounds))
    return 2 * src.nbytes / seconds


def projection_table(dim, n, rounds, bytes_per_second):
    rows = []
    g, out = torch.randn(dim), torch.empty(dim)
    for bits in BITS:
        space = random_subspace(dim, n, bits)
        c = torch.zeros(n, dtype=torch.float64)

        def project():
            c.copy_(space.gradient(g))
            space.weights(c, out)
        project()
        seconds = common.median([common.timed(project, torch.device("cpu")) for _ in range(rounds)])
        floor = 2 * space.nbytes() / bytes_per_second
        rows.append([bits, f"{space.nbytes() / 2**20:.0f}", f"{seconds * 1e3:.1f}",
                     f"{floor * 1e3:.1f}", f"{seconds / floor:.2f}"])
        space = None  # free this basis before the next one is allocated
    print(f"\nprojection, D = {dim / 1e6:.1f}M, n = {n}; bandwidth {bytes_per_second / 1e9:.1f} GB/s")
    common.print_table(["bits", "P MiB", "ms", "floor ms", "x floor"], rows)


def step_table(cases, rounds, batch):
    rows = []
    for arch, n in cases:
        torch.manual_seed(0)
        images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        plain_model = models.build_model(arch, 10)
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        twa_model = models.build_model(arch, 10)
        dim = sum(p.numel() for p in twa_model.parameters())
        trainer = twa.TWA(twa_model, random_subspace(dim, n, 32))
        twa_opt = torch.optim.SGD(trainer.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)

        def plain_step():
            F.cross_entropy(plain_model(images), labels).backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def twa_step():
            F.cross_entropy(twa_model(images), labels).backward()
            trainer.step(twa_opt)
        times = {"plain": [], "twa": []}
        plain_step(), twa_step()  # warm up
        for _ in range(rounds):
            times["plain"].append(common.timed(plain_step, torch.device("cpu")))
            times["twa"].append(common.timed(twa_step, torch.device("cpu")))
        plain, ours = common.median(times["plain"]), common.median(times["twa"])
        rows.append([arch, n, f"{dim / 1e6:.2f}M", f"{plain * 1e3:.0f}", f"{ours * 1e3:.0f}",
                     f"{ours / plain:.3f}"])
    print(f"\ntraining step, batch {batch}, median of {rounds} interleaved rounds")
    common.print_table(["arch", "n", "D", "SGD ms", "TWA ms", "TWA / SGD"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="repeats per measurement")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the step table")
    parser.add_argument("--quick", action="store_true", help="D = 1.5M and ResNet-20 only")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    bytes_per_second = bandwidth(args.rounds)
    projection_table(1_500_000 if args.quick else 15_000_000, 101, args.rounds, bytes_per_second)
    cases = [("resnet20", 31)] if args.quick else [("resnet20", 31), ("VGG16BN", 101)]
    step_table(cases, args.rounds, args.batch_size)


if __name__ == "__main__":
    main()
