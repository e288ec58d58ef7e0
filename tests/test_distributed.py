"""torchrun with 2 CPU processes (Gloo) against 1 process on the same global batches."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs the scripts end to end


# 1 process and 2 sum the global batch, and BatchNorm's statistics, in other orders; compared in
# float64 (float64_run.py), they may differ by the rounding of those sums alone. A sum of n terms
# taken in another order differs by at most about n u relative (u = 2^-53; Higham, Accuracy and
# Stability of Numerical Algorithms, 2nd ed., 4.2), whatever kernels the CPU has; the longest sum
# of a step here is the first convolution's weight gradient over 24 images of 32 x 32 pixels.
# Measured (x86 with AVX-512, seeds 0 and 1, DDP and FSDP alike): 4e-16 to 9e-16 after 1 to 4
# steps, under 1/2000 of this bound per step; float32 runs differ by 3e-7 to 8e-5 there, which is
# 2^29 times float64's u and no bound one machine's printout can set for another's kernels.
FLOAT64_ORDERS = 2.0 ** -53 * 24 * 32 * 32
# TWA cannot run in float64 (its basis is stored in float32 or fewer bits): its weights are float32
# combinations whose every projection sums over all D coordinates, in another order on another
# number of processes. The rounding of such a sum grows like sqrt(n) u (u = 2^-24; Higham and Mary,
# SIAM J. Sci. Comput. 41(5), 2019), so two orders differ by at most twice that; D = 269,267
# (resnet20, 3 classes) gives 6.2e-5. Measured 2.7e-6 over files (x86 with AVX-512); over the one
# command's recorded weights 4.9e-6 there and 1.4e-5 on an AVX2 AMD EPYC.
TWA_ORDERS = 2 * 269_267 ** 0.5 * 2.0 ** -24


def launch(script, processes, *args, float64=False):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    wide = [os.path.join(ROOT, "tests", "float64_run.py")] if float64 else []
    proc = subprocess.run([*prefix, *wide, os.path.join(ROOT, script), *map(str, args), "--quiet"],
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
        launch("train_sgd.py", n, *flags(tiny_data, root / f"sgd{n}-float64"), "--epochs", "2",
               "--save-every", "2", "--lr", "0.02", float64=True)
        launch("train_twa.py", n, *flags(tiny_data, root / "sgd1"), "--epochs", "2", "--lr", "0.1",
               "--params_end", "5", "--output-dir", root / f"twa{n}", "--log-dir", root / f"twa{n}")
    return root


def test_sgd_on_two_processes_matches_one(runs):
    """Every step of two epochs agrees to float64 rounding (FLOAT64_ORDERS)."""
    for i in range(1, 5):  # after 1 to 4 steps
        one = torch.load(runs / "sgd1-float64" / f"{i}.pt", weights_only=True)
        two = torch.load(runs / "sgd2-float64" / f"{i}.pt", weights_only=True)
        assert set(one) == set(two) and one["conv1.weight"].dtype == torch.float64
        assert relative_difference(one, two) <= i * FLOAT64_ORDERS, i


def test_twa_on_two_processes_matches_one(runs):
    one = torch.load(runs / "twa1" / "twa.pt", weights_only=True)
    two = torch.load(runs / "twa2" / "twa.pt", weights_only=True)
    params = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
    assert relative_difference(params, {k: two[k] for k in params}) <= TWA_ORDERS
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
               "--params_end", "5", "--bits", "8", "--extract", "PCA", "--n_components", "3",
               "--output-dir", runs / f"pca{n}", "--log-dir", runs / f"pca{n}")
    one = torch.load(runs / "pca1" / "twa.pt", weights_only=True)
    two = torch.load(runs / "pca2" / "twa.pt", weights_only=True)
    params = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
    assert relative_difference(params, {k: two[k] for k in params}) <= TWA_ORDERS


def test_layerwise_twa_v_on_two_processes_matches_one(runs, tiny_data):
    """Blocks that straddle the shard boundary, and coefficients trained on the held-out part."""
    for n in (1, 2):
        launch("train_twa.py", n, *flags(tiny_data, runs / "sgd1"), "--epochs", "2", "--lr", "0.1",
               "--params_end", "5", "--layer-size", "20000", "--val-split", "25",
               "--output-dir", runs / f"blocks{n}", "--log-dir", runs / f"blocks{n}")
    one = torch.load(runs / "blocks1" / "twa.pt", weights_only=True)
    two = torch.load(runs / "blocks2" / "twa.pt", weights_only=True)
    params = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
    assert relative_difference(params, {k: two[k] for k in params}) <= TWA_ORDERS
    blocks = [json.load(open(runs / f"blocks{n}" / "coefficients.json"))["blocks"] for n in (1, 2)]
    assert len(blocks[0]) == len(blocks[1]) > 1
    assert json.load(open(runs / "blocks2" / "twa_results.json"))["mode"] == "TWA-v"
