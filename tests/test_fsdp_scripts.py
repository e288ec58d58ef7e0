"""The scripts with --fsdp under torchrun (2 and 4 CPU processes, Gloo) against 1 process: the model,
its optimizer state and TWA's basis sharded by FSDP2, the files the same as every other route's."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

import cli
import distributed
import models
import runfiles
import train_sgd
import train_twa
import twa
from conftest import ROOT
from test_distributed import FLOAT64_ORDERS, TWA_ORDERS, flags, launch, relative_difference

pytestmark = pytest.mark.slow  # the tests that launch processes run the scripts end to end


def parameters(path):
    state = torch.load(path, weights_only=True)
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def results(folder):
    with open(folder / "twa_results.json") as f:
        return json.load(f)


def alpha(folder):
    with open(folder / "coefficients.json") as f:
        return torch.tensor(json.load(f)["alpha"])


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """SGD on 1 process and on 2 with --fsdp; TWA over the first's checkpoints on 1, 2 and 4."""
    root = tmp_path_factory.mktemp("fsdp")
    for n in (1, 2):
        launch("train_sgd.py", n, *flags(tiny_data, root / f"sgd{n}"), "--epochs", "2",
               "--save-every", "2", "--lr", "0.02", *(["--fsdp"] if n > 1 else []))
        launch("train_sgd.py", n, *flags(tiny_data, root / f"sgd{n}-float64"), "--epochs", "2",
               "--save-every", "2", "--lr", "0.02", *(["--fsdp"] if n > 1 else []), float64=True)
    launch("train_sgd.py", 2, *flags(tiny_data, root / "sgd2-dcp"), "--epochs", "2", "--save-every",
           "2", "--lr", "0.02", "--fsdp", "--sharded-checkpoints")
    for n in (1, 2, 4):
        launch("train_twa.py", n, *flags(tiny_data, root / "sgd1"), "--epochs", "2", "--lr", "0.1",
               "--params_end", "5", "--output-dir", root / f"twa{n}", "--log-dir", root / f"twa{n}",
               *(["--fsdp"] if n > 1 else []))
    return root


def test_sgd_sharded_matches_one_process_and_writes_whole_files(runs):
    for i in range(5):  # the initial weights, then after 1 to 4 steps
        one = torch.load(runs / "sgd1" / f"{i}.pt", weights_only=True)
        two = torch.load(runs / "sgd2" / f"{i}.pt", weights_only=True)
        assert set(one) == set(two)
        assert all(type(v) is torch.Tensor and v.shape == one[k].shape for k, v in two.items())
        one, two = (torch.load(runs / f"sgd{n}-float64" / f"{i}.pt", weights_only=True) for n in (1, 2))
        assert relative_difference(one, two) <= i * FLOAT64_ORDERS, i  # see FLOAT64_ORDERS
    state = torch.load(runs / "sgd2" / "state.pt", weights_only=True)
    momentum = state["optimizer"]["state"]["conv1.weight"]["momentum_buffer"]  # whole, by name
    assert momentum.shape == state["model"]["conv1.weight"].shape


def test_sharded_checkpoint_folders_hold_the_same_weights_as_whole_files(runs):
    folder = runs / "sgd2-dcp"
    for i in range(5):
        whole = torch.load(runs / "sgd2" / f"{i}.pt", weights_only=True)
        sharded = twa.checkpoints.load_state_dict(str(folder / f"{i}.dcp"))
        assert set(sharded) == set(whole)
        assert all(torch.equal(sharded[k], whole[k]) for k in whole), i
        assert sorted(os.listdir(folder / f"{i}.dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [p.name for p in folder.glob("*.pt")] == ["state.pt"]  # the resume state's small rest
    assert len(list(folder.glob("state-*.dcp"))) == 1  # and its shards; earlier states' are gone
    assert set(runfiles.read_manifest(folder / "checkpoints.json")) == {f"{i}.dcp" for i in range(5)}


def test_twa_reads_sharded_folders_shard_by_shard_or_whole(runs, tiny_data):
    """2 processes reading each its rows of the folders, 1 process reading them whole: the same as
    over the whole files."""
    for source, n in (("sgd2", 2), ("sgd2-dcp", 2), ("sgd2-dcp", 1)):
        out = runs / f"twa-{source}-{n}"
        launch("train_twa.py", n, *flags(tiny_data, runs / source), "--epochs", "2", "--lr", "0.1",
               "--params_end", "5", "--output-dir", out, "--log-dir", out,
               *(["--fsdp"] if n > 1 else []))
    files = parameters(runs / "twa-sgd2-2" / "twa.pt")
    shards = parameters(runs / "twa-sgd2-dcp-2" / "twa.pt")
    assert all(torch.equal(files[k], shards[k]) for k in files)
    whole = parameters(runs / "twa-sgd2-dcp-1" / "twa.pt")
    assert relative_difference(files, whole) <= TWA_ORDERS
    assert results(runs / "twa-sgd2-dcp-2")["basis"]["processes"] == 2


def test_keeping_the_gathered_weights_changes_only_the_collectives(runs, tiny_data):
    out = runs / "twa2-keep"
    launch("train_twa.py", 2, *flags(tiny_data, runs / "sgd1"), "--epochs", "2", "--lr", "0.1",
           "--params_end", "5", "--output-dir", out, "--log-dir", out, "--fsdp",
           "--fsdp-keep-gathered")
    resharded, kept = parameters(runs / "twa2" / "twa.pt"), parameters(out / "twa.pt")
    assert all(torch.equal(resharded[k], kept[k]) for k in resharded)


@pytest.mark.parametrize("n", [2, 4])
def test_twa_sharded_matches_one_process(runs, n):
    one, many = parameters(runs / "twa1" / "twa.pt"), parameters(runs / f"twa{n}" / "twa.pt")
    assert relative_difference(one, {k: many[k] for k in one}) <= TWA_ORDERS
    assert torch.allclose(alpha(runs / "twa1"), alpha(runs / f"twa{n}"), rtol=1e-3, atol=1e-3)
    swa = [results(runs / f"twa{k}")["swa"]["loss"] for k in (1, n)]
    assert swa[1] == pytest.approx(swa[0], rel=1e-5)


@pytest.mark.parametrize("n", [2, 4])
def test_each_process_holds_its_shards_of_the_basis(runs, n):
    one, many = results(runs / "twa1")["basis"], results(runs / f"twa{n}")["basis"]
    assert many["processes"] == n
    # FSDP splits every parameter by rows: each process's share is within a few rows of D / n
    assert abs(many["columns_per_process"] / one["columns_per_process"] - 1 / n) <= 0.05 / n
    assert abs(many["basis_bytes_per_process"] / one["basis_bytes_per_process"] - 1 / n) <= 0.05 / n


def test_layerwise_low_precision_sharded_basis(runs, tiny_data):
    """8-bit layer-wise blocks, whose shards split quantisation groups between the processes, store
    one process's codes: the weights agree to float32 rounding (TWA_ORDERS) as at 32 bits."""
    for n in (1, 2):
        launch("train_twa.py", n, *flags(tiny_data, runs / "sgd1"), "--epochs", "2", "--lr", "0.1",
               "--params_end", "5", "--bits", "8", "--layer-size", "20000", "--output-dir",
               runs / f"q{n}", "--log-dir", runs / f"q{n}", *(["--fsdp"] if n > 1 else []))
    one, two = parameters(runs / "q1" / "twa.pt"), parameters(runs / "q2" / "twa.pt")
    assert relative_difference(one, two) <= TWA_ORDERS
    assert results(runs / "q2")["basis"]["blocks"] > 1


def test_weights_recorded_on_shards_match_their_files(runs, tiny_data):
    """--twa-at records each process's shards (no gather); TWA over them equals TWA over the
    checkpoint files of the same run on one process."""
    online = runs / "online"
    launch("train_sgd.py", 2, *flags(tiny_data, online), "--epochs", "3", "--twa-at", "2",
           "--record-every", "2", "--save-every", "2", "--lr", "0.02", "--twa-lr", "0.1", "--fsdp")
    launch("train_twa.py", 1, *flags(tiny_data, online), "--epochs", "2", "--lr", "0.1",
           "--params_end", "5", "--output-dir", runs / "files", "--log-dir", runs / "files")
    recorded, files = parameters(online / "twa.pt"), parameters(runs / "files" / "twa.pt")
    assert relative_difference(files, recorded) <= TWA_ORDERS


def interrupt_and_resume(script, args, marker):
    """Start the script on 2 processes with --fsdp, SIGTERM torchrun once `marker` exists (every
    process saves the state and stops), then run it again with --resume."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, script), *map(str, args), "--quiet", "--fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    while not os.path.exists(marker) and proc.poll() is None:
        subprocess.run(["sleep", "0.1"])
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert "state saved, continue with --resume" in output, output[-3000:]
    launch(script, 2, *args, "--fsdp", "--resume")


@pytest.mark.parametrize("files", ["whole", "sharded"])
def test_sharded_sgd_interrupted_and_resumed_equals_uninterrupted(tiny_data, tmp_path, files):
    args = ["--epochs", "4", "--save-every", "2", "--lr", "0.02", "--deterministic",
            *(["--sharded-checkpoints"] if files == "sharded" else [])]
    suffix = ".dcp" if files == "sharded" else ".pt"
    launch("train_sgd.py", 2, *flags(tiny_data, tmp_path / "full"), *args, "--fsdp")
    interrupt_and_resume("train_sgd.py", [*flags(tiny_data, tmp_path / "cut"), *args],
                         tmp_path / "cut" / f"3{suffix}")
    for i in range(9):
        a, b = (twa.checkpoints.load_state_dict(str(tmp_path / run / f"{i}{suffix}")) for run in ("full", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{i}{suffix} differs"


def test_sharded_twa_interrupted_and_resumed_equals_uninterrupted(runs, tiny_data, tmp_path):
    args = [*flags(tiny_data, runs / "sgd1"), "--epochs", "6", "--lr", "0.1", "--params_end", "5",
            "--deterministic"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    launch("train_twa.py", 2, *args, "--output-dir", full, "--log-dir", full, "--fsdp")
    interrupt_and_resume("train_twa.py", [*args, "--output-dir", cut, "--log-dir", cut],
                         cut / "twa_state.pt")
    a, b = torch.load(full / "twa.pt", weights_only=True), torch.load(cut / "twa.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch, first_units", [
    ("resnet20", ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]),
    ("VGG16BN", ["features.0", "features.1", "features.3", "features.4"]),
    ("resnet18", ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]),  # torchvision's
])
def test_each_block_is_a_unit_of_its_own(arch, first_units):
    model = models.build_model(arch, 10) if arch in models.ARCHS else \
        torchvision.models.get_model(arch, num_classes=10)
    names = {module: name for name, module in model.named_modules()}
    units = [names[m] for m in distributed.fsdp_units(model)]
    assert units[:4] == first_units
    assert all(any(True for _ in model.get_submodule(u).parameters()) for u in units)


@pytest.mark.parametrize("main, argv, message", [
    (train_twa.parse_args, ["--checkpoints", "a.pt", "b.pt", "--fsdp"], "soup mode"),
    (train_sgd.parse_args, ["--fsdp", "--compile"], "--compile"),
])
def test_combinations_that_fsdp_does_not_take_are_refused(main, argv, message):
    with pytest.raises(cli.UsageError, match=message):
        main(argv)
