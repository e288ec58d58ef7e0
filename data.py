"""The datasets a run reads: CIFAR-10/100 through torchvision and ImageFolder trees (checked before
they are walked), small images decoded once into a uint8 tensor and cached beside the data, their
input normalisation, and the held-out split of the training set. The batch loaders over them are
loaders.py's.
"""
import functools
import hashlib
import logging
import os
import stat

import numpy as np
import torch
from PIL import Image
from torchvision import datasets as tv_datasets

from runfiles import WriteFailed, save_torch

log = logging.getLogger("twa")
DATASETS = ("CIFAR10", "CIFAR100", "ImageNet", "ImageFolder")
SMALL_IMAGE = 64  # images up to this size are kept decoded in memory
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The reference code's CIFAR constants, used for CIFAR-100 too; its checkpoints expect these inputs
REFERENCE_MEAN, REFERENCE_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
NORMALIZATIONS = ("dataset", "reference")


class DataError(ValueError):
    """A data folder or dataset that cannot be used."""


# ---------------------------------------------------------------------------------------------------
# Reading datasets
# ---------------------------------------------------------------------------------------------------

def split_dirs(root):
    """train/ and val/ (or test/) inside an ImageFolder root."""
    train = os.path.join(root, "train")
    test = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))),
                None)
    if not os.path.isdir(train) or test is None:
        raise DataError(f"--data-dir {root} must hold train/ and val/ (or test/) class folders")
    return train, test


WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")  # PIL modes above 8 bits per channel


def image_folder(path):
    check_tree(path)
    try:
        folder = tv_datasets.ImageFolder(path, loader=_open_image)
    except (FileNotFoundError, RuntimeError) as err:  # no class folders, or no images in them
        raise DataError(f"no images found in {path}: {err}") from None
    return folder


@functools.lru_cache(maxsize=None)  # one walk per folder and process
def check_tree(path):
    """Refuse, naming it, what ImageFolder would follow or open wrongly: a symbolic link back into
    a folder already walked (a loop, which it follows some 40 levels deep, relabelling the images
    it finds again), and an image name that is a dangling link or no regular file (a named pipe
    blocks the decode forever)."""
    for folder, _, files in os.walk(path, followlinks=True):
        real, above = os.path.realpath(folder), folder
        while above != path and os.path.dirname(above) != above:
            above = os.path.dirname(above)
            if os.path.realpath(above) == real:
                raise DataError(f"{folder} leads back to {above} (a symbolic link loop); remove the "
                                "link")
        for name in files:
            if not name.lower().endswith(tv_datasets.folder.IMG_EXTENSIONS):
                continue
            file = os.path.join(folder, name)
            try:
                mode = os.stat(file).st_mode
            except OSError as err:
                raise DataError(f"cannot read image {file} ({err.strerror}: a dangling link?)") from None
            if not stat.S_ISREG(mode):
                raise DataError(f"{file} is not a regular file; remove it from the data folder")


def decoded_image_folder(path, cache_dir=None, write_cache=True):
    """(images uint8 N x C x H x W, labels, classes) of an ImageFolder tree of equal-size images,
    decoded once and cached as a .pt file keyed by the files' names, sizes and times (written
    atomically, by one process when write_cache is true only for it)."""
    folder = image_folder(path)
    key = hashlib.sha1()
    for file, label in folder.samples:
        stat = os.stat(file)
        key.update(f"{os.path.relpath(file, path)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    try:
        cache = os.path.join(cache_dir or _cache_dir(path),
                             f"{os.path.basename(path)}-{key.hexdigest()[:16]}.pt")
    except OSError as err:  # no writable cache folder anywhere: the cache only saves time
        log.warning("no decode cache (%s); decoding the images every run", err)
        cache, write_cache = None, False
    if cache and os.path.isfile(cache):
        try:
            saved = torch.load(cache, weights_only=True)
            return saved["images"], saved["labels"], saved["classes"]
        except Exception as err:  # a truncated or foreign file: decode again and replace it
            log.warning("unreadable decode cache %s (%s: %s); rebuilding it", cache,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    arrays = [_decode(file) for file, _ in folder.samples]
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"images in {path} differ in size; use --loader torchvision")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(folder.targets, dtype=torch.int64)
    if write_cache:
        try:
            save_torch({"images": images, "labels": labels, "classes": folder.classes}, cache)
        except WriteFailed as err:  # the cache only saves time
            log.warning("decode cache not written: %s", err)
    return images, labels, folder.classes


def _decode(file):
    """An image file as an RGB array; a file that is not a whole image is a DataError naming it."""
    return np.asarray(_open_image(file))


def _open_image(file):
    """ImageFolder's loader for the torchvision path: an RGB PIL image, or a DataError naming the
    file (raised in a DataLoader worker, the run stops with that one line)."""
    try:
        with Image.open(file) as image:
            mode = image.mode
            rgb = None if mode in WIDE_MODES else image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for truncated or bad files
        raise DataError(f"cannot decode image {file} ({err}); remove or replace it") from None
    if rgb is None:  # PIL's RGB conversion clips such pixels to 255: blank images
        raise DataError(f"{file} has {mode} pixels (more than 8 bits per channel), which would "
                        "decode as blank images; convert the data to 8 bits")
    return rgb


def _cache_dir(path):
    """$TWA_CACHE_DIR when set; else .twa-cache beside the data when writable; else
    ~/.cache/twa/<hash of the data path>."""
    if os.environ.get("TWA_CACHE_DIR"):
        return os.environ["TWA_CACHE_DIR"]
    local = os.path.join(os.path.dirname(os.path.abspath(path)), ".twa-cache")
    try:
        os.makedirs(local, exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    user = os.path.join(os.path.expanduser("~"), ".cache", "twa", digest)
    os.makedirs(user, exist_ok=True)
    return user


def torchvision_cifar(name, root, train):
    cls = tv_datasets.CIFAR10 if name == "CIFAR10" else tv_datasets.CIFAR100
    try:
        data = cls(root=root, train=train, download=True)
    except Exception as err:  # no network, or a partial download
        raise DataError(f"could not get {name} into --data-dir {root} ({err}); for a local ImageFolder "
                        "copy use --datasets ImageFolder --data-dir <tree>") from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(data.targets, dtype=torch.int64), data.classes


def channel_stats(images):
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1).tolist())


def small_image_tensors(args, write_cache=True):
    """(train images, train labels, test images, test labels, classes) as uint8 tensors on the CPU;
    write_cache: whether this process writes the decode cache of an ImageFolder tree."""
    if args.datasets in ("CIFAR10", "CIFAR100"):
        train = torchvision_cifar(args.datasets, args.data_dir, True)
        test = torchvision_cifar(args.datasets, args.data_dir, False)
    else:
        train_dir, test_dir = split_dirs(args.data_dir)
        train = decoded_image_folder(train_dir, write_cache=write_cache)
        test = decoded_image_folder(test_dir, write_cache=write_cache)
        if train[2] != test[2]:
            raise DataError(f"{train_dir} and {test_dir} have different class folders")
    images, labels = train[0], train[1]
    if args.train_subset > len(labels):
        raise DataError(f"--train-subset {args.train_subset} exceeds the {len(labels)} training images")
    if 0 < args.train_subset < len(labels):  # fixed seed: both scripts and all runs see one subset
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:args.train_subset]
        images, labels = images[keep], labels[keep]
    return images, labels, test[0], test[1], train[2]


def default_normalization(datasets):
    """reference for CIFAR-10/100 (so the reference's checkpoints score as they did there), else the
    training images' own statistics."""
    return "reference" if datasets in ("CIFAR10", "CIFAR100") else "dataset"


def input_normalization(args, train_images):
    """Per-channel (mean, std) that the small-image loaders subtract and divide by."""
    choice = getattr(args, "normalize", None) or default_normalization(args.datasets)
    if choice == "reference":
        return REFERENCE_MEAN, REFERENCE_STD
    mean, std = channel_stats(train_images)
    if min(std) == 0:  # dividing by it would make every input of that channel infinite
        raise DataError(f"input channel {std.index(0)} is constant over all training images: "
                        "nothing to normalise it by; use --normalize reference or other images")
    return mean, std


def is_small_image_dataset(args):
    if args.datasets in ("CIFAR10", "CIFAR100"):
        return True
    if args.datasets == "ImageNet":
        return False
    train_dir, _ = split_dirs(args.data_dir)
    return max(image_size(image_folder(train_dir).samples[0][0])) <= SMALL_IMAGE


def image_size(file):
    """(width, height) of an image file, or a DataError naming it."""
    try:
        with Image.open(file) as image:
            return image.size
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode image {file} ({err}); remove or replace it") from None


def held_out_split(n, percent, seed):
    """The sorted indices of a seeded random `percent`% of n training examples."""
    count = round(n * percent / 100)
    if not 0 < count < n:
        raise DataError(f"--val-split {percent}% of {n} training images leaves no held-out or no "
                        "training images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:count].sort().values
