"""The batch loaders of a run, built for its flags (build_loaders) over the datasets of data.py. Both
yield (images, labels) already on the training device and shuffle with a generator seeded by (seed,
epoch), so an epoch's order is a pure function of the two and resuming needs only counters.

Small images (CIFAR-10/100, ImageFolder trees of images up to 64 px): kept decoded on the device and
cropped, flipped and normalised a whole batch at a time there (TensorLoader). Large images (ImageNet)
and `--loader torchvision`: torchvision transforms in DataLoader worker processes (EpochLoader).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import data

LOADERS = ("memory", "torchvision")
PAD = 4  # random-crop padding for small images
# evaluation batch: on the CPU, 512 ran ResNet-20's evaluation at 1.3x the training forward's time
# per image and 128-256 at 0.5x (bench/evaluation.py); GPUs are not slower at 256
EVAL_BATCH = 256


def epoch_generator(seed, epoch):
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# ---------------------------------------------------------------------------------------------------
# The in-memory loader for small images
# ---------------------------------------------------------------------------------------------------

class BatchOrder:
    """What both loaders share: a (seed, epoch)-shuffled order of n examples cut into global batches
    of batch_size, of which rank r takes every world_size-th example (as DistributedSampler)."""

    def __init__(self, n, batch_size, shuffle, seed, rank, world_size):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return self.batches()

    def order(self, gen):
        return torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)

    def global_size(self, batch):
        """The number of examples in global batch `batch`, over all ranks."""
        return min(self.batch_size, self.n - batch * self.batch_size)

    def shares(self, order, start=0):
        """This rank's indices of each global batch from batch number `start` on."""
        return [order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world_size]
                for b in range(start, len(self))]


class TensorLoader(BatchOrder):
    """Batches from uint8 images (N, C, H, W) and labels held on the device; with `augment`, each batch
    gets a random crop after zero-padding by PAD pixels and a random horizontal flip."""

    def __init__(self, images, labels, batch_size, mean, std, augment=False, shuffle=False, seed=0,
                 channels_last=False, rank=0, world_size=1):
        super().__init__(len(labels), batch_size, shuffle, seed, rank, world_size)
        self.images, self.labels, self.augment = images, labels, augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        device = images.device
        self.shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)

    def batches(self, start=0):
        """The epoch's batches from batch number `start` on (for resuming inside an epoch)."""
        gen = epoch_generator(self.seed, self.epoch)
        order = self.order(gen)
        shifts = torch.randint(0, 2 * PAD + 1, (self.n, 2), generator=gen)
        flips = torch.rand(self.n, generator=gen) < 0.5
        device = self.images.device
        # pinned and asynchronous on a GPU: the epoch starts without waiting for the device
        order, shifts, flips = (to_device(t, device) for t in (order, shifts, flips))
        for idx in self.shares(order, start):
            images = self.images[idx]
            if self.augment:
                images = crop_and_flip(images, shifts[idx], flips[idx])
            images = (images.float() - self.shift).mul_(self.scale)
            yield images.contiguous(memory_format=self.memory_format), self.labels[idx]


def to_device(tensor, device):
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def crop_and_flip(images, shifts, flips):
    """Per-image random crop of the zero-padded batch at (dy, dx) = shifts, then flip where `flips`."""
    b, _, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    rows = (shifts[:, 0, None] + torch.arange(h, device=images.device))[:, :, None]  # b, h, 1
    cols = (shifts[:, 1, None] + torch.arange(w, device=images.device))[:, None, :]  # b, 1, w
    cols = torch.where(flips[:, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # gathered as (b, h, w, c)


# ---------------------------------------------------------------------------------------------------
# The torchvision loader
# ---------------------------------------------------------------------------------------------------

class EpochLoader(BatchOrder):
    """torchvision's DataLoader with worker processes over the shared batch order; batches are moved
    to `device`."""

    def __init__(self, dataset, batch_size, device, shuffle=False, workers=4, seed=0,
                 channels_last=False, rank=0, world_size=1):
        super().__init__(len(dataset), batch_size, shuffle, seed, rank, world_size)
        self.dataset, self.device, self.workers = dataset, device, workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def batches(self, start=0):
        order = self.order(epoch_generator(self.seed, self.epoch))
        shares = [idx.tolist() for idx in self.shares(order, start)]
        # only the last global batch can leave a rank nothing (batch_size >= world_size), and a
        # DataLoader cannot collate an empty batch
        empty = shares and not shares[-1]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=shares[:-1] if empty else shares, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        shape = None
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            shape = images.shape[1:]
            yield images, labels.to(self.device, non_blocking=True)
        if empty:
            shape = shape or self.dataset[0][0].shape  # a rank with no image at all this epoch
            yield (torch.zeros((0, *shape), device=self.device).contiguous(
                memory_format=self.memory_format), torch.zeros(0, dtype=torch.int64, device=self.device))


class TensorImages(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images as a Dataset of (transformed PIL image, label) for EpochLoader."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
        return self.transform(image), int(self.labels[i])


# ---------------------------------------------------------------------------------------------------
# The loaders of a run
# ---------------------------------------------------------------------------------------------------

class Loaders(NamedTuple):
    """train: the training part, augmented and shuffled; test: the test set; held_out and
    held_out_eval: the held-out part of the training set (--val-split) augmented and shuffled for
    training on it, and plain for measuring on it (None without a split)."""
    train: object
    test: object
    classes: int
    held_out: object = None
    held_out_eval: object = None


def build_loaders(args, device, rank=0, world_size=1, split=None):
    """Loaders for args.datasets at args.data_dir. split(n) gives the held-out indices of the n
    training examples (or None for no held-out part)."""
    if args.datasets not in data.DATASETS:
        raise data.DataError(f"unknown --datasets {args.datasets!r}; choose one of: "
                             f"{', '.join(data.DATASETS)}")
    split = split or (lambda n: None)
    if not data.is_small_image_dataset(args):
        return large_image_loaders(args, device, rank, world_size, split)
    train_x, train_y, test_x, test_y, classes = data.small_image_tensors(args, write_cache=rank == 0)
    mean, std = data.input_normalization(args, train_x)
    held = split(len(train_y))
    keep = torch.ones(len(train_y), dtype=torch.bool)
    if held is not None:
        keep[held] = False
    common = dict(channels_last=args.channels_last, rank=rank, world_size=world_size)
    if args.loader == "torchvision":
        size = train_x.shape[-1]
        normalise = [T.ToTensor(), T.Normalize(mean, std)]
        train_tf = T.Compose([T.RandomCrop(size, padding=PAD), T.RandomHorizontalFlip(), *normalise])
        test_tf = T.Compose(normalise)

        def loader(x, y, train):
            return EpochLoader(TensorImages(x, y, train_tf if train else test_tf),
                               args.batch_size if train else EVAL_BATCH, device, shuffle=train,
                               workers=args.workers, seed=args.randomseed, **common)
    else:
        train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))
        keep = keep.to(device)

        def loader(x, y, train):
            return TensorLoader(x, y, args.batch_size if train else EVAL_BATCH, mean, std,
                                augment=train, shuffle=train, seed=args.randomseed, **common)
    loaders = Loaders(loader(train_x[keep], train_y[keep], True), loader(test_x, test_y, False),
                      len(classes))
    if held is None:
        return loaders
    held = held.to(train_y.device)
    return loaders._replace(held_out=loader(train_x[held], train_y[held], True),
                            held_out_eval=loader(train_x[held], train_y[held], False))


def large_image_loaders(args, device, rank, world_size, split):
    """ImageNet transforms (RandomResizedCrop + flip; Resize + CenterCrop) through a DataLoader."""
    train_dir, test_dir = data.split_dirs(args.data_dir)
    size = 224
    if args.datasets == "ImageFolder":
        size = min(data.image_size(data.image_folder(train_dir).samples[0][0]))
    normalise = [T.ToTensor(), T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalise])
    test_tf = T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), *normalise])
    train_set, test_set = data.image_folder(train_dir), data.image_folder(test_dir)
    train_set.transform, test_set.transform = train_tf, test_tf
    common = dict(workers=args.workers, channels_last=args.channels_last, rank=rank,
                  world_size=world_size)

    def loader(dataset, train):
        return EpochLoader(dataset, args.batch_size, device, shuffle=train, seed=args.randomseed,
                           **common)
    held = split(len(train_set))
    if held is None:
        return Loaders(loader(train_set, True), loader(test_set, False), len(train_set.classes))
    keep = torch.ones(len(train_set), dtype=torch.bool)
    keep[held] = False
    plain = data.image_folder(train_dir)
    plain.transform = test_tf
    subset = torch.utils.data.Subset
    return Loaders(loader(subset(train_set, keep.nonzero().view(-1).tolist()), True),
                   loader(test_set, False), len(train_set.classes),
                   loader(subset(train_set, held.tolist()), True),
                   loader(subset(plain, held.tolist()), False))
