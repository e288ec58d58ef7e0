"""Training throughput of the data paths, side by side in one run.

Images per second of training steps (forward, backward, SGD step) of ResNet-20 and VGG16BN on the real
CIFAR-10, fed by: compute only (normalised tensors prepared beforehand, no augmentation), the in-memory
loader (uint8 on the device, crop + flip + normalise per batch), and torchvision's DataLoader with the
default workers. Rounds are interleaved so that machine noise hits every path alike; the medians and
their ratios are printed.

    python bench/throughput.py [--archs resnet20 VGG16BN] [--steps 30] [--rounds 3] [--amp] [--compile]
"""
import itertools
import time

import torch
import torch.nn.functional as F

import common  # noqa: F401  (puts the project on the path)
import loaders
import loop
import utils

WARMUP = 3


def parse_args():
    parser = common.timing_parser(__doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per path and round")
    parser.add_argument("-b", "--batch-size", type=int, default=128, help="batch size")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 ImageFolder tree (default: cache)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--channels-last", action="store_true", help="also use channels-last")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast in the forward pass")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser.parse_args()


def compute_only_batches(loader, steps):
    """Batches prepared beforehand by the in-memory loader without augmentation."""
    plain = loaders.TensorLoader(loader.images, loader.labels, loader.batch_size, (0, 0, 0), (1, 1, 1))
    plain.shift, plain.scale = loader.shift, loader.scale
    batches = list(itertools.islice(plain.batches(), steps + WARMUP))
    return lambda: iter(batches)


def time_steps(model, optimizer, batches, steps, device, amp=False):
    """(seconds to the first batch, seconds for `steps` training steps after WARMUP untimed ones)."""
    started = time.perf_counter()
    iterator = itertools.chain([next(iter_batches := batches())], iter_batches)
    first = time.perf_counter() - started

    def step(images, labels):
        with loop.autocast(device, amp):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for images, labels in itertools.islice(iterator, WARMUP):
        step(images, labels)
    return first, common.timed(lambda: [step(x, y) for x, y in itertools.islice(iterator, steps)],
                               device)


def main():
    args = parse_args()
    device = utils.pick_device(args.device)
    torch.manual_seed(0)
    root = common.cifar10_dir(args.data_dir)
    memory, _, classes, *_ = loaders.build_loaders(common.data_args(root, args.batch_size), device)
    classic, *_ = loaders.build_loaders(common.data_args(root, args.batch_size, "torchvision"), device)
    reference, *_ = loaders.build_loaders(
        common.data_args(root, args.batch_size, "torchvision", workers=4), device)
    paths = {
        "compute only": compute_only_batches(memory, args.steps),
        "in-memory loader": lambda: memory.batches(),
        f"torchvision, {classic.workers} workers": lambda: classic.batches(),
        "torchvision, 4 workers": lambda: reference.batches(),
    }
    rows, epoch_rows = [], []
    for arch in args.archs:
        model = utils.build_model(arch, "ImageFolder", classes, device, args.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()
        forward = torch.compile(model) if args.compile else model
        seconds = {name: [] for name in paths}
        startup = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, batches in paths.items():
                first, timed = time_steps(forward, optimizer, batches, args.steps, device, args.amp)
                startup[name].append(first)
                seconds[name].append(timed)
        rate = {name: args.steps * args.batch_size / common.median(s) for name, s in seconds.items()}
        epoch = {name: common.median(startup[name]) + len(memory) * args.batch_size / rate[name]
                 for name in paths}
        base, mem, tv, tv4 = rate.values()
        rows.append([arch, *(f"{r:.0f}" for r in rate.values()), f"{mem / base:.3f}",
                     f"{mem / tv:.2f}", f"{mem / tv4:.2f}"])
        epoch_rows.append([arch, *(f"{common.median(startup[n]):.2f} / {epoch[n]:.0f}" for n in paths),
                           f"{epoch[list(paths)[2]] / epoch['in-memory loader']:.2f}"])
    print(f"images/s, median of {args.rounds} interleaved rounds of {args.steps} steps, batch "
          f"{args.batch_size}, device {device}, torch threads {torch.get_num_threads()}, "
          f"amp {args.amp}, compile {args.compile}, channels-last {args.channels_last}")
    common.print_table(["arch", *paths, "memory/compute", "memory/torchvision",
                        "memory/torchvision-4"], rows)
    print(f"\nseconds to the first batch / estimated epoch seconds ({len(memory)} steps)")
    common.print_table(["arch", *paths, "torchvision/memory epoch"], epoch_rows)


if __name__ == "__main__":
    main()
