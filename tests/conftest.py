import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# one thread in the tests and in every script they launch: unset, each script counts the cores
# idle at its start (utils.pick_threads), and two runs a test compares bit for bit (interrupted
# and resumed against uninterrupted) could get other counts, whose float sums round differently
os.environ.setdefault("OMP_NUM_THREADS", "1")

CLASSES = ("circle", "square", "stripes")


def write_image_folder(root, per_class, size=32, seed=0, classes=CLASSES):
    """A tiny ImageFolder tree of synthetic images whose colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", max(2, per_class // 4))):
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (size, size, 3))
                pixels[..., label] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")), per_class=16)


@pytest.fixture(scope="session")
def sgd_checkpoints(tiny_data, tmp_path_factory):
    """A finished train_sgd run on tiny_data: 2 epochs of 6 batches, a checkpoint every 3 batches
    (0.pt .. 4.pt), its manifest, state.pt and metrics. Shared by the test files that read
    checkpoints: a test that changes a file changes a copy."""
    from test_cli import common, run
    save = tmp_path_factory.mktemp("sgd-checkpoints")
    run("train_sgd.py", *common(tiny_data, save, "--epochs", "2", "--save-every", "2"))
    return save
