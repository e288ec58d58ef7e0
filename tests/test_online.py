"""TWA in one command: the subspace recorded while SGD trains, against the files route."""
import copy
import json
import os
import signal

import pytest
import torch
from torch import nn

import twa
from test_cli import common, final_weights, run, start, wait_for
from test_distributed import TWA_ORDERS, launch, relative_difference
from test_distributed import flags as dist_flags
from test_twa import random_walk


def wide_mlp():
    """Blocks of a few hundred entries, so that layer-wise alphas are unique with 7 checkpoints."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 60))


def recorded(model, walk, capacity=None, **build):
    recorder = twa.SubspaceRecorder(model, capacity or len(walk) + 3, **build)  # room to spare
    for state in walk:
        model.load_state_dict(state)
        recorder.add(model)
    return recorder


def trained(model, space, steps=10):
    """Weights and alphas after SGD steps on fixed batches."""
    model = copy.deepcopy(model)
    trainer = twa.TWA(model, space)
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 100, generator=gen), torch.randint(0, 60, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        trainer.step(opt)
    weights = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double()
    return weights, space.checkpoint_coefficients(trainer.coordinates)


@pytest.mark.parametrize("layer_size", [None, 200])
def test_recorder_gives_the_files_subspace(layer_size):
    model = wide_mlp()
    walk = random_walk(model, 7, step=0.05)
    files = twa.Subspace.from_checkpoints(model, walk, layer_size=layer_size)
    online = recorded(model, walk, layer_size=layer_size).subspace()
    assert online.rank == files.rank and len(online.blocks) == len(files.blocks) > 0
    assert online.orthogonality_error() <= 1e-5
    assert torch.equal(online.mean, files.mean)  # both from a float64 sum
    (w_files, a_files), (w_online, a_online) = trained(model, files), trained(model, online)
    assert (w_online - w_files).norm() <= 1e-5 * w_files.norm()
    assert (a_online - a_files).abs().max() <= 1e-5


def test_recorder_at_8_bits_is_as_close_as_the_files_at_8_bits():
    model = wide_mlp()
    walk = random_walk(model, 7, step=0.05)
    exact, _ = trained(model, twa.Subspace.from_checkpoints(model, walk))
    start_point = twa.Subspace.from_checkpoints(model, walk).mean.double()
    files, _ = trained(model, twa.Subspace.from_checkpoints(model, walk, bits=8))
    online, _ = trained(model, recorded(model, walk, bits=8).subspace())
    move = (exact - start_point).norm()
    assert (files - exact).norm() > 0  # 8 bits does round
    assert (online - exact).norm() <= 2 * (files - exact).norm() + 1e-7 * move


def test_recorder_state_round_trip_mid_recording():
    model = wide_mlp()
    walk = random_walk(model, 6, step=0.05)
    first = recorded(model, walk[:3], capacity=6, bits=8)
    second = twa.SubspaceRecorder(model, 6, bits=8)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for recorder in (first, second):
        for state in walk[3:]:
            model.load_state_dict(state)
            recorder.add(model)
    a, b = first.subspace(), second.subspace()
    assert torch.equal(a.blocks[0].basis.data, b.blocks[0].basis.data)
    assert torch.equal(a.mean_coords, b.mean_coords) and a.names == b.names


def test_recorder_refuses_non_finite_weights_and_overflow():
    model = wide_mlp()
    recorder = twa.SubspaceRecorder(model, 1)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="recorded as #0: .0.weight. holds NaN or Inf"):
        recorder.add(model)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    recorder.add(model)
    with pytest.raises(ValueError, match="full"):
        recorder.add(model)


ONLINE = ["--epochs", 4, "--twa-at", 2, "--record-every", 2, "--twa-epochs", 2, "--twa-lr", 0.3]


@pytest.mark.slow
def test_one_command_equals_train_sgd_then_train_twa(tiny_data, tmp_path):
    run("train_sgd.py", *common(tiny_data, tmp_path / "one", *ONLINE))
    assert not [n for n in os.listdir(tmp_path / "one") if n[0].isdigit()]  # no checkpoint files
    run("train_sgd.py", *common(tiny_data, tmp_path / "two", "--epochs", 4, "--save-every", 2))
    run("train_twa.py", *common(tiny_data, tmp_path / "two", "--params_end", 5, "--epochs", 2,
                                "--lr", 0.3))
    one, two = final_weights(tmp_path / "one" / "twa.pt"), final_weights(tmp_path / "two" / "twa.pt")
    assert relative_difference(two, one) <= TWA_ORDERS  # the recorder's sums and the files'
    results = [json.load(open(tmp_path / d / "twa_results.json")) for d in ("one", "two")]
    assert results[0]["swa"]["loss"] == pytest.approx(results[1]["swa"]["loss"], rel=1e-5)
    alphas = [json.load(open(tmp_path / d / "coefficients.json"))["alpha"] for d in ("one", "two")]
    assert alphas[0] == pytest.approx(alphas[1], abs=1e-5)
    stages = [json.loads(line)["stage"] for line in open(tmp_path / "one" / "metrics.jsonl")]
    assert stages == ["sgd", "sgd", "twa", "twa"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["recording", "twa"])
def test_one_command_resumed_in_either_phase_equals_uninterrupted(tiny_data, tmp_path, phase):
    flags = ["--epochs", 6, "--twa-at", 4, "--record-every", 3, "--twa-epochs", 6, "--twa-lr", 0.3,
             "--deterministic"]
    run("train_sgd.py", *common(tiny_data, tmp_path / "full", *flags))
    proc = start("train_sgd.py", *common(tiny_data, tmp_path / "cut", *flags))
    wait_for(tmp_path / "cut" / ("state.pt" if phase == "recording" else "twa_state.pt"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    assert not (tmp_path / "cut" / "twa.pt").exists()
    run("train_sgd.py", *common(tiny_data, tmp_path / "cut", *flags, "--resume"))
    a, b = final_weights(tmp_path / "full" / "twa.pt"), final_weights(tmp_path / "cut" / "twa.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_one_command_on_two_processes_matches_one(tiny_data, tmp_path):
    """Two SGD steps recorded (they agree to rounding across process counts, see test_distributed),
    then one TWA epoch over the sharded recorded basis: float32 sums in other orders (TWA_ORDERS)."""
    online = ["--epochs", 2, "--twa-at", 1, "--record-every", 2, "--twa-epochs", 1, "--twa-lr", 0.1,
              "--lr", 0.02]
    for n in (1, 2):
        launch("train_sgd.py", n, *dist_flags(tiny_data, tmp_path / f"p{n}"), *online)
    one, two = (final_weights(tmp_path / f"p{n}" / "twa.pt") for n in (1, 2))
    params = {k: v for k, v in one.items() if "running" not in k and "num_batches" not in k}
    assert relative_difference(params, {k: two[k] for k in params}) <= TWA_ORDERS
