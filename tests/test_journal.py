"""The journal version's extensions: layer-wise coefficients, model soups, the held-out split."""
import argparse
import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import data
import loaders
import models
import soup
import train_twa
import twa
from conftest import ROOT
from test_twa import flat, mlp, random_walk, train_steps, wide_mlp


def block_ranges(params, min_size=None):
    return [(start, stop) for start, stop, _ in twa.build.parameter_blocks(params, min_size)]


def test_parameter_blocks_group_consecutive_tensors():
    params = twa.trainable_parameters(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))  # 12, 3, 6, 2
    assert block_ranges(params) == [(0, 23)]
    assert block_ranges(params, 0) == [(0, 12), (12, 15), (15, 21), (21, 23)]
    assert block_ranges(params, 10) == [(0, 12), (12, 23)]  # 3 + 6 <= 10: the 2 joins them
    assert block_ranges(params, 20) == [(0, 21), (21, 23)]  # 21 > 20 closes; the remainder stays alone
    assert twa.build.parameter_blocks(params, 0)[1][2] == ["0.bias"]


def journal_block_sizes(model, layer_size):
    """The journal code's grouping loop (train_twa.py of its branch), written out: a tensor opens a
    new block once the current one holds more than layer_size entries."""
    sizes = [0]
    for p in model.parameters():
        if sizes[-1] > layer_size:
            sizes.append(p.numel())
        else:
            sizes[-1] += p.numel()
    return sizes


@pytest.mark.parametrize("layer_size", [0, 1000, 5000, 20000, 100000])
def test_layer_wise_blocks_are_the_journal_codes_on_resnet20(layer_size):
    model = models.build_model("resnet20", 10)
    blocks = twa.build.parameter_blocks(twa.trainable_parameters(model), layer_size)
    assert [stop - start for start, stop, _ in blocks] == journal_block_sizes(model, layer_size)


def run_twa(model, walk, steps, **build):
    space = twa.Subspace.from_checkpoints(model, walk, **build)
    trainer = twa.TWA(model, space)
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    history = []

    def step():
        trainer.step(opt)
        history.append(trainer.coordinates.detach().clone())
    train_steps(model, steps, step)
    return space, trainer, history


def test_one_block_is_the_iclr_method_step_for_step():
    base = mlp()
    walk = random_walk(base, 6, step=0.05)
    _, _, iclr = run_twa(copy.deepcopy(base), walk, 10)
    space, _, block = run_twa(copy.deepcopy(base), walk, 10, layer_size=10 ** 9)
    assert len(space.blocks) == 1
    for a, b in zip(iclr, block):
        assert torch.equal(a, b)


def test_layerwise_twa_is_block_diagonal_projected_sgd():
    """Against an independent reference: per block, a float64 QR basis of the checkpoints restricted
    to the block, and plain SGD on the weights with the gradient projected block by block."""
    base = mlp()
    walk = random_walk(base, 5, step=0.05)
    model = copy.deepcopy(base)
    space, trainer, _ = run_twa(model, walk, 15, layer_size=0)
    assert len(space.blocks) == 4 and space.rank == 4 * 5
    assert space.orthogonality_error() <= 1e-5

    ref = copy.deepcopy(base)
    params = [p for _, p in twa.trainable_parameters(ref)]
    stacked = torch.stack([flat(s, ref) for s in walk]).double()  # n x D
    projectors = []
    for start, stop, _ in twa.build.parameter_blocks(twa.trainable_parameters(ref), 0):
        q, _ = torch.linalg.qr(stacked[:, start:stop].t())
        projectors.append((start, stop, q))
    torch.nn.utils.vector_to_parameters(stacked.mean(0).float(), params)
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-3)

    def projected_step():
        g = torch.nn.utils.parameters_to_vector([p.grad for p in params]).double()
        for start, stop, q in projectors:
            g[start:stop] = q @ (q.t() @ g[start:stop])
        torch.nn.utils.vector_to_parameters(g.float(), [p.grad for p in params])
        opt.step()
        opt.zero_grad()
    train_steps(ref, 15, projected_step)

    ours = torch.nn.utils.parameters_to_vector(model.parameters()).double()
    theirs = torch.nn.utils.parameters_to_vector(ref.parameters()).double()
    assert (ours - stacked.mean(0)).norm() > 1e-3 * ours.norm()  # it moved
    assert (ours - theirs).norm() / ours.norm() <= 1e-5
    # one alpha per block and checkpoint reproduces each block of the weights
    alpha = space.checkpoint_coefficients(trainer.coordinates)
    assert alpha.shape == (4, 5)
    for (start, stop, _), a in zip(projectors, alpha):
        block = ours[start:stop]
        assert (a @ stacked[:, start:stop] - block).norm() / block.norm() <= 1e-5
    assert not torch.allclose(alpha[0], alpha[1])  # the blocks learned different averages


# what a basis stored at `bits` may lose: max |PP^T - I| and the checkpoints' residual
LOW_BIT_BOUNDS = {32: 1e-5, 8: 2e-2, 4: 0.3}


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_layerwise_basis_at_low_precision(bits):
    """The first block (5,120 weights) is stored at `bits`, the smaller ones in float32."""
    model = wide_mlp()
    walk = random_walk(model, 6, step=0.05)
    space = twa.Subspace.from_checkpoints(model, walk, bits=bits, layer_size=300)
    assert [block.entries for block in space.blocks] == [5120, 256 + 1280, 5]  # 1536 > 300 closes
    assert [block.basis.bits for block in space.blocks] == [bits, 32, 32]
    assert space.orthogonality_error() <= LOW_BIT_BOUNDS[bits]
    for state in walk:
        assert space.relative_residual(flat(state, model)) <= LOW_BIT_BOUNDS[bits]


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_blocks_smaller_than_the_checkpoint_count(bits):
    """Per-tensor blocks with fewer entries (5, the last bias) than checkpoints (8): the block's
    rank stops at its size, and small blocks stay exact whatever the storage precision (the first,
    of 5,120 weights, is stored at `bits`)."""
    model = wide_mlp()
    walk = random_walk(model, 8, step=0.05)
    space = twa.Subspace.from_checkpoints(model, walk, bits=bits, layer_size=0)
    assert [block.rank for block in space.blocks] == [8, 8, 8, 5]
    assert [block.basis.bits for block in space.blocks] == [bits, 32, 32, 32]
    assert space.orthogonality_error() <= LOW_BIT_BOUNDS[bits]
    for state in walk:
        assert space.relative_residual(flat(state, model)) <= LOW_BIT_BOUNDS[bits]


def test_greedy_soup_keeps_an_ingredient_only_when_held_out_accuracy_does_not_drop():
    # held-out accuracy of each soup, by its members: model 2 hurts, 3 ties, 1 helps
    table = {(0,): 70.0, (0, 2): 65.0, (0, 3): 70.0, (0, 3, 1): 72.0}
    tried = []

    def score(members):
        tried.append(tuple(members))
        return table[tuple(members)]
    members, best = soup.greedy_soup([0, 2, 3, 1], score)
    assert members == [0, 3, 1] and best == 72.0
    assert tried == [(0,), (0, 2), (0, 3), (0, 3, 1)]  # best first, each candidate tried once


def test_average_state_dicts_is_the_entrywise_mean(tmp_path):
    states = [{"w": torch.full((2,), float(i)), "n": torch.tensor(i)} for i in (1, 2, 6)]
    torch.save(states[0], tmp_path / "a.pt")
    mean = soup.average_state_dicts([tmp_path / "a.pt", *states[1:]])
    assert torch.equal(mean["w"], torch.full((2,), 3.0)) and mean["n"] == 1


def test_held_out_split_is_seeded_and_disjoint_from_training(tiny_data):
    first, again = data.held_out_split(48, 25, 0), data.held_out_split(48, 25, 0)
    assert torch.equal(first, again) and len(first) == 12
    assert not torch.equal(first, data.held_out_split(48, 25, 1))
    args = SimpleNamespace(datasets="ImageFolder", data_dir=tiny_data, batch_size=8, workers=0,
                           randomseed=0, channels_last=False, train_subset=0, loader="memory")
    split = loaders.build_loaders(args, torch.device("cpu"), split=lambda n: first)
    whole = loaders.build_loaders(args, torch.device("cpu"))
    assert split.held_out is not None and whole.held_out is None
    assert torch.equal(split.held_out_eval.images, whole.train.images[first])
    assert torch.equal(split.held_out.labels, whole.train.labels[first])
    train = split.train.images.flatten(1)
    held = split.held_out_eval.images.flatten(1)
    assert len(train) + len(held) == 48
    assert not (train[:, None] == held[None]).all(-1).any()  # no held-out image is trained on


def cli(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    return proc


def common_flags(data_dir):
    return ["--datasets", "ImageFolder", "--data-dir", data_dir, "--arch", "resnet20", "-b", "8",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def finetunes(tiny_data, tmp_path_factory):
    """A base run with 25% held out, then three fine-tunes of it with other lrs and seeds."""
    root = tmp_path_factory.mktemp("soups")
    flags = common_flags(tiny_data) + ["--val-split", 25]
    assert cli("train_sgd.py", *flags, "--epochs", 1, "--save-dir", root / "base").returncode == 0
    for i, lr in enumerate((0.01, 0.02, 0.05)):
        proc = cli("train_sgd.py", *flags, "--epochs", 1, "--lr", lr, "--randomseed", i,
                   "--init", root / "base" / "1.pt", "--save-dir", root / f"ft{i}")
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root


@pytest.mark.slow
def test_both_scripts_use_one_recorded_split(finetunes):
    base = json.load(open(finetunes / "base" / "split.json"))
    assert base["percent"] == 25 and base["examples"] == 48 and len(base["held_out"]) == 12
    for i in range(3):
        assert json.load(open(finetunes / f"ft{i}" / "split.json")) == base


@pytest.mark.slow
def test_soup_mode_reports_soups_and_twa_v(finetunes, tiny_data):
    out = finetunes / "twa-v"
    proc = cli("train_twa.py", *common_flags(tiny_data), "--checkpoints", str(finetunes / "ft*" / "1.pt"),
               "--split", finetunes / "base" / "split.json", "--val-split", 25, "--epochs", 1,
               "--opt", "AdamW", "--lr", 0.01, "--schedule", "cosine", "--warmup-epochs", 0.5,
               "--layer-size", 0, "--save-dir", out, "--pbits", 8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(out / "twa_results.json"))
    assert results["mode"] == "TWA-v"
    soups = results["soup"]
    assert len(soups["ingredients"]) == 3
    best = max(soups["ingredients"], key=lambda r: r["held_out"]["accuracy"])
    assert soups["best_single"]["held_out"]["accuracy"] == best["held_out"]["accuracy"]
    assert soups["greedy"]["members"][0] == best["checkpoint"]
    assert soups["uniform"] == results["swa"]
    assert 0 <= results["twa"]["held_out"]["accuracy"] <= 100
    # the TWA run records the split it used: the one train_sgd.py wrote
    assert json.load(open(out / "twa_split.json")) == json.load(open(finetunes / "base" / "split.json"))
    coefficients = json.load(open(out / "coefficients.json"))
    assert len(coefficients["blocks"]) > 1 and coefficients["alpha"] is None
    assert all(len(b["alpha"]) == 3 for b in coefficients["blocks"])


@pytest.mark.slow
def test_soup_mode_needs_held_out_images(finetunes, tiny_data):
    proc = cli("train_twa.py", *common_flags(tiny_data), "--checkpoints", finetunes / "ft0" / "1.pt",
               finetunes / "ft1" / "1.pt", "--save-dir", finetunes / "none")
    assert proc.returncode == 2 and "held-out" in proc.stderr


@pytest.mark.slow
def test_twa_refuses_a_split_of_another_size(finetunes, tiny_data):
    proc = cli("train_twa.py", *common_flags(tiny_data), "--save-dir", finetunes / "base",
               "--params_end", 2, "--val-split", 10, "--output-dir", finetunes / "other")
    assert proc.returncode == 2 and "differs" in proc.stderr


@pytest.mark.slow
def test_resume_refuses_other_settings(finetunes, tiny_data):
    flags = [*common_flags(tiny_data), "--save-dir", finetunes / "base", "--params_end", 2,
             "--epochs", 1, "--output-dir", finetunes / "resumed", "--log-dir", finetunes / "resumed"]
    assert cli("train_twa.py", *flags).returncode == 0
    proc = cli("train_twa.py", *flags, "--resume", "--layer-size", 0)
    assert proc.returncode == 2 and "was saved with --" in proc.stderr


def test_a_checkpoint_glob_lists_the_files_in_number_order(tmp_path):
    """--checkpoints 'dir/*.pt' takes 2.pt before 10.pt (text order would not: the first file
    anchors the basis and --train_start counts in this order), and skips the scripts' other outputs."""
    for name in ("0.pt", "1.pt", "2.pt", "10.pt", "state.pt", "twa.pt", "twa_state.pt"):
        (tmp_path / name).write_bytes(b"")
    args = argparse.Namespace(checkpoints=[str(tmp_path / "*.pt")])
    assert [os.path.basename(f) for f in train_twa.checkpoint_files(args)] == \
        ["0.pt", "1.pt", "2.pt", "10.pt"]
