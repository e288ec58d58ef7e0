"""Evaluation throughput against the forward-only compute of training, side by side in one run.

Images per second on the real CIFAR-10 test set (or its first --images) for ResNet-20 and VGG16BN:
- training forward: the forward pass of a training step (train mode, autograd recording), on
  batches prepared beforehand: the compute that evaluation should not exceed per image;
- loop.evaluate as the scripts run it (eval mode, the in-memory test loader, loss and accuracy
  summed on the device), at the scripts' evaluation batch (loaders.EVAL_BATCH) and others;
- the same under torch.no_grad instead of loop.evaluate's torch.inference_mode, and with
  channels-last.
Rounds are interleaved; medians and the ratio evaluation / training forward are printed.

    python bench/evaluation.py [--archs resnet20 VGG16BN] [--rounds 3] [--images 2048]
"""
import itertools

import torch

import common
import loop
import utils
from loaders import EVAL_BATCH, build_loaders

TRAIN_BATCH = 128


def parse_args():
    parser = common.timing_parser(__doc__)
    parser.add_argument("--images", type=int, default=2048, help="test images evaluated per round")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 ImageFolder tree (default: cache)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args()


def test_loader(test, images, batch, channels_last):
    """The scripts' test loader over the first `images` test images, at another batch size."""
    loader = type(test)(test.images[:images], test.labels[:images], batch, (0, 0, 0), (1, 1, 1),
                        channels_last=channels_last)
    loader.shift, loader.scale = test.shift, test.scale
    return loader


def training_forward(model, batches):
    model.train()
    for images, _ in batches:
        model(images)


def paths(model, test, images, channels_last_model):
    """name -> function that processes `images` test images once."""
    plain = list(itertools.islice(test_loader(test, images, TRAIN_BATCH, False).batches(),
                                  images // TRAIN_BATCH))
    out = {"training forward, b128": lambda: training_forward(model, plain)}
    for batch in sorted({128, 256, 512, EVAL_BATCH}):
        loader = test_loader(test, images, batch, False)
        out[f"evaluate, b{batch}"] = lambda loader=loader: loop.evaluate(model, loader)
    loader = test_loader(test, images, EVAL_BATCH, False)
    out[f"evaluate under no_grad, b{EVAL_BATCH}"] = \
        lambda: evaluate_with(torch.no_grad(), model, loader)
    loader = test_loader(test, images, EVAL_BATCH, True)
    out[f"evaluate channels-last, b{EVAL_BATCH}"] = \
        lambda: loop.evaluate(channels_last_model, loader)
    return out


def evaluate_with(mode, model, loader):
    """loop.evaluate's work under another autograd mode."""
    model.eval()
    with mode:
        for images, labels in loader:
            logits = model(images)
            torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            (logits.argmax(1) == labels).sum()


def main():
    args = parse_args()
    device = utils.pick_device(args.device)
    torch.manual_seed(0)
    root = common.cifar10_dir(args.data_dir)
    loaders = build_loaders(common.data_args(root, TRAIN_BATCH), device)
    images = min(args.images, loaders.test.n) // TRAIN_BATCH * TRAIN_BATCH
    rows = []
    for arch in args.archs:
        model = utils.build_model(arch, "ImageFolder", loaders.classes, device)
        channels_last = utils.build_model(arch, "ImageFolder", loaders.classes, device, channels_last=True)
        channels_last.load_state_dict(model.state_dict())
        runs = paths(model, loaders.test, images, channels_last)
        for fn in runs.values():  # warm-up
            fn()
        seconds = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                seconds[name].append(common.timed(fn, device))
        rate = {name: images / common.median(s) for name, s in seconds.items()}
        reference = rate["training forward, b128"]
        rows += [[arch, name, f"{r:.0f}", f"{reference / r:.2f}"] for name, r in rate.items()]
    print(f"images/s over {images} test images, median of {args.rounds} interleaved rounds, device "
          f"{device}, torch threads {torch.get_num_threads()}; 'time / fwd': seconds per image over "
          "the training forward's")
    common.print_table(["arch", "path", "images/s", "time / fwd"], rows)


if __name__ == "__main__":
    main()
