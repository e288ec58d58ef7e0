"""Per-step cost of TWA, side by side in one run.

1. Memory bandwidth, measured by copying a large tensor (bytes read + written per second).
2. The projection of one step (c = P g, then weights = mean + P^T (c - c0)) for each storage
   precision at D = 15M, n = 101 (VGG16BN size), against the floor 2 x bytes(P) / bandwidth: a
   step must read P twice. Low precisions through the compiled kernels and the blocked products.
3. A whole training step (forward, backward, update) with TWA against plain SGD for ResNet-20 with
   n = 31 and VGG16BN with n = 101, on one batch of random images, interleaved rounds; with
   --gpu-cases instead ResNet-20 with n = 61 and torchvision's ResNet-18 on ImageNet-sized random
   images with n = 301, each at 32 and 8 bits.

    python bench/step.py [--quick] [--rounds 5] [--threads N] [--projection-only] [--bits 16 8] [--device cuda]
                         [--gpu-cases]
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision

import common  # first: puts the project on the path
import models
import twa
import utils

# (arch, n, image size, classes, storage bits) of the training-step table
CASES = [("resnet20", 31, 32, 10, 32), ("VGG16BN", 101, 32, 10, 32)]
GPU_CASES = [(arch, n, size, classes, bits) for arch, n, size, classes in
             (("resnet20", 61, 32, 10), ("resnet18", 301, 224, 1000)) for bits in (32, 8)]

BITS = (32, 16, 8, 4)


def random_subspace(dim, n, bits, device, seed=0):
    """A Subspace whose basis holds random rows (timing does not depend on their values)."""
    gen = torch.Generator(device).manual_seed(seed)
    basis = twa.storage.empty_basis(n, dim, bits, device)
    if bits >= 16:
        for i in range(n):
            basis.store(i, 0, dim, torch.randn(dim, generator=gen, device=device) / dim ** 0.5)
    else:
        basis.data.random_(0, 256, generator=gen)
        basis.scale.fill_(1e-4)
        basis.low.fill_(-1e-4 * 127)
    basis.rows = n
    zeros = dict(dtype=torch.float64, device=device)
    block = twa.subspace.Block(basis, slice(0, dim), torch.zeros(n, n, **zeros), torch.zeros(n, **zeros),
                    torch.zeros(n, n, **zeros))
    return twa.Subspace([block], torch.randn(dim, generator=gen, device=device),
                        [f"{i}.pt" for i in range(n)])


def bandwidth(rounds, device):
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    seconds = min(common.timed(lambda: dst.copy_(src), device) for _ in range(rounds))
    return 2 * src.nbytes / seconds


def projection_table(dim, n, rounds, bytes_per_second, device, bits_list=BITS):
    """Each precision's projection against the floor; low precisions both through the compiled
    kernels (fused, the default for large bases) and through the blocked products, side by side."""
    rows = []
    g, out = torch.randn(dim, device=device), torch.empty(dim, device=device)
    for bits in bits_list:
        space = random_subspace(dim, n, bits, device)
        basis = space.blocks[0].basis
        c = torch.zeros(n, dtype=torch.float64, device=device)

        def project():
            c.copy_(space.gradient(g))
            space.weights(c, out)

        modes = (True, False) if bits < 32 else (False,)
        times = {mode: [] for mode in modes}
        for mode in modes:  # warm up (the first fused product compiles its kernel)
            basis.fused = mode
            project()
        for _ in range(rounds):  # interleaved, so that a slow moment of the machine hits both
            for mode in modes:
                basis.fused = mode
                times[mode].append(common.timed(project, device))
        floor = 2 * space.nbytes() / bytes_per_second
        fused = common.median(times[True]) if bits < 32 else None
        blocked = common.median(times[False])
        rows.append([bits, f"{space.nbytes() / 2**20:.0f}", f"{floor * 1e3:.1f}",
                     f"{blocked * 1e3:.1f}", f"{blocked / floor:.2f}",
                     "-" if fused is None else f"{fused * 1e3:.1f}",
                     "-" if fused is None else f"{fused / floor:.2f}"])
        space = basis = None  # free this basis before the next one is allocated
    print(f"\nprojection, D = {dim / 1e6:.1f}M, n = {n}; bandwidth {bytes_per_second / 1e9:.1f} GB/s")
    common.print_table(["bits", "P MiB", "floor ms", "blocked ms", "x floor", "fused ms", "x floor"],
                       rows)


def build(arch, classes, device):
    model = models.build_model(arch, classes) if arch in models.ARCHS else \
        torchvision.models.get_model(arch, num_classes=classes)
    return model.to(device)


def step_table(cases, rounds, batch, device):
    rows = []
    for arch, n, size, classes, bits in cases:
        torch.manual_seed(0)
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, classes, (batch,), device=device)
        plain_model = build(arch, classes, device)
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        twa_model = build(arch, classes, device)
        dim = sum(p.numel() for p in twa_model.parameters())
        trainer = twa.TWA(twa_model, random_subspace(dim, n, bits, device))
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
            times["plain"].append(common.timed(plain_step, device))
            times["twa"].append(common.timed(twa_step, device))
        plain, ours = common.median(times["plain"]), common.median(times["twa"])
        rows.append([arch, n, bits, f"{dim / 1e6:.2f}M", f"{plain * 1e3:.1f}", f"{ours * 1e3:.1f}",
                     f"{ours / plain:.3f}"])
        trainer = plain_model = twa_model = None  # free this case before the next
    print(f"\ntraining step, batch {batch}, median of {rounds} interleaved rounds, device {device}")
    common.print_table(["arch", "n", "bits", "D", "SGD ms", "TWA ms", "TWA / SGD"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="repeats per measurement")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size of the step table")
    parser.add_argument("--quick", action="store_true", help="D = 1.5M and ResNet-20 only")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--projection-only", action="store_true", help="skip the training steps")
    parser.add_argument("--bits", type=int, nargs="+", default=BITS, choices=BITS,
                        help="storage precisions of the projection table")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--gpu-cases", action="store_true", help="the GPU check's training steps: "
                        "ResNet-20 n = 61 and ResNet-18 (224 px) n = 301, at 32 and 8 bits")
    args = parser.parse_args()
    device = utils.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, torch threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    bytes_per_second = bandwidth(args.rounds, device)
    projection_table(1_500_000 if args.quick else 15_000_000, 101, args.rounds, bytes_per_second,
                     device, args.bits)
    if args.projection_only:
        return
    cases = GPU_CASES if args.gpu_cases else CASES[:1] if args.quick else CASES
    step_table(cases, args.rounds, args.batch_size, device)


if __name__ == "__main__":
    main()
