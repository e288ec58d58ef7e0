"""The in-memory loader: augmentation, seeded order, resuming inside an epoch, sharding, caching."""
import os
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import data
import loaders


def test_crop_and_flip_matches_per_image_slicing():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 10), generator=gen, dtype=torch.uint8)
    shifts = torch.randint(0, 2 * loaders.PAD + 1, (6, 2), generator=gen)
    flips = torch.tensor([True, False, True, False, False, True])
    out = loaders.crop_and_flip(images, shifts, flips)
    padded = F.pad(images, (loaders.PAD,) * 4)
    for i in range(6):
        dy, dx = shifts[i].tolist()
        expected = padded[i, :, dy:dy + 8, dx:dx + 10]
        expected = expected.flip(-1) if flips[i] else expected
        assert torch.equal(out[i], expected)


def loader(n=50, batch=8, **kw):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 4, 4), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n)  # the label names the example
    return loaders.TensorLoader(images, labels, batch, (0.5,) * 3, (0.25,) * 3, augment=True,
                             shuffle=True, seed=3, **kw)


def labels_of(batches):
    return [y.tolist() for _, y in batches]


def test_order_is_a_function_of_seed_and_epoch():
    a, b = loader(), loader()
    assert labels_of(a) == labels_of(b)
    b.set_epoch(1)
    assert labels_of(a) != labels_of(b)
    seen = sorted(sum(labels_of(a), []))
    assert seen == list(range(50))  # every example once per epoch


def test_resuming_inside_an_epoch_gives_the_same_batches():
    full = list(loader().batches())
    tail = list(loader().batches(start=3))
    assert len(tail) == len(full) - 3
    for (x1, y1), (x2, y2) in zip(full[3:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_ranks_split_each_global_batch():
    whole = labels_of(loader())
    shards = [labels_of(loader(rank=r, world_size=2)) for r in range(2)]
    for batch, first, second in zip(whole, *shards):
        assert sorted(first + second) == sorted(batch)
        assert not set(first) & set(second)


def test_normalisation_matches_torchvision(tiny_data):
    args = SimpleNamespace(datasets="ImageFolder", data_dir=tiny_data, batch_size=8, workers=0,
                           randomseed=0, channels_last=False, train_subset=0)
    _, memory_test, classes, *_ = loaders.build_loaders(
        SimpleNamespace(**vars(args), loader="memory"), torch.device("cpu"))
    _, classic_test, *_ = loaders.build_loaders(
        SimpleNamespace(**vars(args), loader="torchvision"), torch.device("cpu"))
    assert classes == 3
    for (x1, y1), (x2, y2) in zip(memory_test, classic_test):
        assert torch.equal(y1, y2)
        assert torch.allclose(x1, x2, atol=1e-5)


def test_channel_stats():
    images = torch.tensor([[[[0, 255]], [[51, 51]], [[0, 0]]]], dtype=torch.uint8)  # 1 x 3 x 1 x 2
    mean, std = data.channel_stats(images)
    assert mean == (0.5, 0.2, 0.0)
    assert abs(std[0] - (0.5 ** 2 * 2) ** 0.5) < 1e-9 and std[1] == 0.0


def test_decoded_folder_is_cached_and_rebuilt_when_a_file_changes(tmp_path):
    from conftest import write_image_folder
    root = write_image_folder(str(tmp_path / "tree"), per_class=4)
    cache = tmp_path / "cache"
    images, labels, classes = data.decoded_image_folder(os.path.join(root, "train"), str(cache))
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    files = os.listdir(cache)
    assert len(files) == 1
    again = data.decoded_image_folder(os.path.join(root, "train"), str(cache))
    assert torch.equal(again[0], images) and os.listdir(cache) == files
    changed = os.path.join(root, "train", classes[0], "0000.png")
    write_image_folder(str(tmp_path / "other"), per_class=4, seed=9)
    os.replace(os.path.join(tmp_path, "other", "train", classes[0], "0000.png"), changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = data.decoded_image_folder(os.path.join(root, "train"), str(cache))
    assert len(os.listdir(cache)) == 2
    assert not torch.equal(rebuilt[0][0], images[0]) and torch.equal(rebuilt[0][1:], images[1:])


def test_a_truncated_cache_is_rebuilt_with_a_warning_and_the_folder_is_settable(tmp_path, monkeypatch,
                                                                               caplog):
    from conftest import write_image_folder
    root = write_image_folder(str(tmp_path / "tree"), per_class=4)
    monkeypatch.setenv("TWA_CACHE_DIR", str(tmp_path / "cache"))
    first = data.decoded_image_folder(os.path.join(root, "train"))
    cached = [os.path.join(tmp_path / "cache", n) for n in os.listdir(tmp_path / "cache")]
    assert len(cached) == 1 and cached[0].endswith(".pt")
    with open(cached[0], "r+b") as f:
        f.truncate(100)
    again = data.decoded_image_folder(os.path.join(root, "train"))
    assert torch.equal(first[0], again[0]) and "rebuilding" in caplog.text
    assert os.path.getsize(cached[0]) > 100


def small_tree(root):
    from conftest import write_image_folder
    return write_image_folder(str(root), per_class=4, size=8)


def test_trees_that_would_mislead_the_loader_are_refused(tmp_path):
    """A symbolic link loop, a dangling link, a named pipe and 16-bit images each stop the run with
    one line naming the file, instead of relabelled copies, a hang or blank images."""
    import numpy as np
    import pytest
    from PIL import Image

    def refused(tree, message):
        with pytest.raises(data.DataError, match=message):
            data.decoded_image_folder(os.path.join(tree, "train"), cache_dir=str(tmp_path / "cache"))

    loop = small_tree(tmp_path / "loop")
    os.symlink(os.path.join(loop, "train"), os.path.join(loop, "train", "circle", "again"))
    refused(loop, "symbolic link loop")
    dangling = small_tree(tmp_path / "dangling")
    os.symlink(tmp_path / "nowhere.png", os.path.join(dangling, "train", "circle", "gone.png"))
    refused(dangling, "dangling")
    pipe = small_tree(tmp_path / "pipe")
    os.mkfifo(os.path.join(pipe, "train", "circle", "x.png"))
    refused(pipe, "not a regular file")
    wide = small_tree(tmp_path / "wide")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(
        os.path.join(wide, "train", "circle", "0000.png"))
    refused(wide, "more than 8 bits")
    flat = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    flat[:, 1:] = torch.randint(0, 255, (4, 2, 2, 2), dtype=torch.uint8)
    with pytest.raises(data.DataError, match="channel 0 is constant"):
        data.input_normalization(SimpleNamespace(normalize="dataset", datasets="ImageFolder"), flat)


def test_an_unwritable_cache_is_a_warning_and_a_run_without_it(tmp_path, monkeypatch, caplog):
    tree = small_tree(tmp_path / "tree")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TWA_CACHE_DIR", str(blocker))
    images, labels, classes = data.decoded_image_folder(os.path.join(tree, "train"))
    assert len(labels) == 12 and images.shape[1:] == (3, 8, 8)
    assert "decode cache" in caplog.text
