"""torchrun with 2 CPU processes (Gloo) against 1 process on the same global batches."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs the scripts end to end


def launch(script, processes, *args):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    proc = subprocess.run([*prefix, os.path.join(ROOT, script), *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]  # no deprecated collective


def flags(data, save_dir):
    return ["--datasets", "ImageFolder", "--data-dir", data, "--arch", "resnet20", "-b", "24",
            "--save-dir", save_dir, "--print-freq", "2", "--device", "cpu"]


def relative_difference(a, b):
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum((a[k].double() - b[k].double()).square().sum() for k in keys)
    den = sum(a[k].double().square().sum() for k in keys)
    return (num / den).sqrt().item()


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for n in (1, 2):
        launch("train_sgd.py", n, *flags(tiny_data, root / f"sgd{n}"), "--epochs", "2",
               "--save-every", "2", "--lr", "0.02")
        launch("train_twa.py", n, *flags(tiny_data, root / "sgd1"), "--epochs", "2", "--lr", "0.1",
               "--params_end", "5", "--output-dir", root / f"twa{n}", "--log-dir", root / f"twa{n}")
    return root


def test_sgd_on_two_processes_matches_one(runs):
    """The first steps agree to rounding; later ones drift apart as any two float orders of the
    same sums do in a chaotic training (about 10x per step on this tiny problem)."""
    for i in (1, 2):  # after 1 and 2 steps
        one = torch.load(runs / "sgd1" / f"{i}.pt", weights_only=True)
        two = torch.load(runs / "sgd2" / f"{i}.pt", weights_only=True)
        assert set(one) == set(two)
        assert relative_difference(one, two) <= 1e-5, i


def test_twa_on_two_processes_matches_one(runs):
    one = torch.load(runs / "twa1" / "twa.pt", weights_only=True)
    two = torch.load(runs / "twa2" / "twa.pt", weights_only=True)
    params = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
    assert relative_difference(params, {k: two[k] for k in params}) <= 1e-5
    alpha = [json.load(open(runs / f"twa{n}" / "coefficients.json"))["alpha"] for n in (1, 2)]
    # alpha maps nearly parallel checkpoints: ill-conditioned, so it agrees less tightly
    assert torch.allclose(torch.tensor(alpha[0]), torch.tensor(alpha[1]), rtol=1e-3, atol=1e-3)


def test_each_process_holds_half_of_the_basis(runs):
    one, two = (json.load(open(runs / f"twa{n}" / "twa_results.json"))["basis"] for n in (1, 2))
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["columns_per_process"] == 269_267  # resnet20 with 3 classes: all of D
    assert abs(two["columns_per_process"] - one["columns_per_process"] / 2) <= 256
    assert abs(two["basis_bytes_per_process"] / one["basis_bytes_per_process"] - 0.5) <= 0.01


def test_low_precision_pca_basis_on_two_processes_matches_one(runs, tiny_data):
    """Shards start on whole quantisation groups, so each stores exactly its part of the codes."""
    for n in (1, 2):
        launch("train_twa.py", n, *flags(tiny_data, runs / "sgd1"), "--epochs", "1", "--lr", "0.1",
               "--params_end", "5", "--pbits", "8", "--extract", "PCA", "--n_components", "3",
               "--output-dir", runs / f"pca{n}", "--log-dir", runs / f"pca{n}")
    one = torch.load(runs / "pca1" / "twa.pt", weights_only=True)
    two = torch.load(runs / "pca2" / "twa.pt", weights_only=True)
    params = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
    assert relative_difference(params, {k: two[k] for k in params}) <= 1e-5


def test_layerwise_twa_v_on_two_processes_matches_one(runs, tiny_data):
    """Blocks that straddle the shard boundary, and coefficients trained on the held-out part."""
    for n in (1, 2):
        launch("train_twa.py", n, *flags(tiny_data, runs / "sgd1"), "--epochs", "2", "--lr", "0.1",
               "--params_end", "5", "--layer-size", "20000", "--val-split", "25",
               "--output-dir", runs / f"blocks{n}", "--log-dir", runs / f"blocks{n}")
    one = torch.load(runs / "blocks1" / "twa.pt", weights_only=True)
    two = torch.load(runs / "blocks2" / "twa.pt", weights_only=True)
    params = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
    assert relative_difference(params, {k: two[k] for k in params}) <= 1e-5
    blocks = [json.load(open(runs / f"blocks{n}" / "coefficients.json"))["blocks"] for n in (1, 2)]
    assert len(blocks[0]) == len(blocks[1]) > 1
    assert json.load(open(runs / "blocks2" / "twa_results.json"))["mode"] == "TWA-v"
