"""The reference's choices, side by side with ours: the SWA schedule, the one-pass basis and its
weight-space update, training alpha instead of coordinates, and the input normalisation."""
import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import data
import loaders
import twa
import loop
import runfiles
import schedules
from test_cli import common, run
from test_twa import flat, mlp, random_walk, train_steps


def test_swa_schedule_matches_the_reference_formula():
    # VGG16BN on CIFAR-100 in the reference: 300 epochs, swa_start 161, lr 0.1 -> swa_lr 0.05
    lrs = [schedules.lr_at("swa", 0.1, e, 300, e / 300, swa_start=161, swa_lr=0.05) for e in range(300)]
    assert lrs[:81] == [0.1] * 81  # t = epoch / 161 <= 0.5
    assert lrs[145:] == [pytest.approx(0.05)] * 155  # t > 0.9
    t = 100 / 161
    assert lrs[100] == pytest.approx(0.1 * (1 - 0.5 * (t - 0.5) / 0.4))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.slow
def test_sgd_script_trains_with_the_swa_schedule(tiny_data, tmp_path):
    save = tmp_path / "swa"
    run("train_sgd.py", *common(tiny_data, save, "--epochs", 5, "--schedule", "swa", "--swa-start", 3,
                                "--swa-lr", 0.02))
    rows = runfiles.read_jsonl(save / "metrics.jsonl")
    expected = [0.1, 0.1, 0.1 * (1 - 0.8 * (2 / 3 - 0.5) / 0.4), 0.02, 0.02]
    assert [r["lr"] for r in rows] == pytest.approx(expected)
    bad = run("train_sgd.py", *common(tiny_data, tmp_path / "bad", "--schedule", "swa"), check=False)
    assert bad.returncode == 2 and "--swa-start" in bad.stderr


def one_pass_gram_schmidt(rows):
    """The reference's basis written out plainly: one classical pass in float32, raw checkpoints."""
    basis = rows.clone().float()
    for i in range(len(basis)):
        basis[i] -= basis[:i].t() @ (basis[:i] @ basis[i])
        basis[i] /= basis[i].norm()
    return basis


def nearly_parallel_walk(model, n):
    """Checkpoints whose one-pass basis is visibly not orthonormal (as in a low-lr tail)."""
    return random_walk(model, n, step=2e-4)


def test_reference_basis_is_the_one_pass_basis():
    """Checked where one pass is well conditioned: on nearly parallel checkpoints its departure from
    orthonormality is float32 rounding amplified, and two correct implementations that round in
    another order disagree by as much as that departure (both about 0.1 at the walk below)."""
    model = mlp()
    walk = random_walk(model, 8, step=1e-2)
    rows = torch.stack([flat(s, model) for s in walk])
    expected = one_pass_gram_schmidt(rows)
    ours = twa.Subspace.reference_from_checkpoints(model, walk).blocks[0].basis.as_float32(0, rows.shape[1])
    assert (ours - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_reference_basis_is_not_orthonormal_on_nearly_parallel_checkpoints():
    model = mlp()
    walk = nearly_parallel_walk(model, 8)
    rows = torch.stack([flat(s, model) for s in walk])
    space = twa.Subspace.reference_from_checkpoints(model, walk)
    quality = space.basis_quality()
    low, high = quality["gram_eigenvalues"]
    assert quality["orthogonality_error"] > 1e-2 and high - low > 1e-2  # the ablation is real
    exact = twa.Subspace.from_checkpoints(model, walk).basis_quality()
    assert exact["orthogonality_error"] <= 1e-5
    assert exact["gram_eigenvalues"] == pytest.approx([1.0, 1.0], abs=1e-5)
    for j in (0, 4, 7):  # every checkpoint is a point of the coordinates' parametrisation
        weights = space.weights(space.start_coordinates(j), torch.empty(rows.shape[1]))
        assert (weights - rows[j]).norm() <= 1e-5 * rows[j].norm()


@pytest.mark.parametrize("start", ["mean", 7])
def test_reference_basis_trains_as_the_reference_weight_space_update(start):
    """SGD on c with gradient P g is the reference's SGD on w with g -> P^T P g, momentum and weight
    decay in weight space, even though P is not orthonormal."""
    base = mlp()
    walk = nearly_parallel_walk(base, 8)
    rows = torch.stack([flat(s, base) for s in walk])
    hyper = dict(lr=2.0, momentum=0.9, weight_decay=5e-5)

    ours = copy.deepcopy(base)
    space = twa.Subspace.reference_from_checkpoints(ours, walk)
    basis = space.blocks[0].basis.as_float32(0, rows.shape[1]).clone()  # P, far from orthonormal here
    assert space.orthogonality_error() > 1e-2
    trainer = twa.TWA(ours, space, start=start)
    opt = torch.optim.SGD(trainer.parameters(), **hyper)
    train_steps(ours, 20, lambda: trainer.step(opt))

    reference = copy.deepcopy(base)
    params = list(reference.parameters())
    w0 = (rows.mean(0) if start == "mean" else rows[start]).clone()
    torch.nn.utils.vector_to_parameters(w0.clone(), params)  # params become views of their vector
    ref_opt = torch.optim.SGD(params, **hyper)

    def weight_space_step():
        g = torch.nn.utils.parameters_to_vector([p.grad for p in params])
        torch.nn.utils.vector_to_parameters(basis.t() @ (basis @ g), [p.grad for p in params])
        ref_opt.step()
        ref_opt.zero_grad()
    train_steps(reference, 20, weight_space_step)

    w_ours = torch.nn.utils.parameters_to_vector(ours.parameters()).double()
    w_ref = torch.nn.utils.parameters_to_vector(reference.parameters()).double()
    assert (w_ours - w0.double()).norm() > 1e-3 * w0.norm()  # it moved
    assert (w_ours - w_ref).norm() <= 1e-5 * w_ref.norm()
    alpha = space.checkpoint_coefficients(trainer.coordinates)[0]
    assert (rows.double().t() @ alpha - w_ours).norm() <= 1e-4 * w_ours.norm()


def test_nan_checkpoint_is_refused_naming_it_and_a_nan_basis_reports_nan_quality():
    model = mlp()
    walk = random_walk(model, 3)
    bad = [dict(w) for w in walk]
    bad[1]["2.bias"] = bad[1]["2.bias"].clone().fill_(float("inf"))
    with pytest.raises(twa.CheckpointError, match=r"state_dict #1: '2.bias' holds NaN or Inf"):
        twa.Subspace.from_checkpoints(model, bad)
    space = twa.Subspace.from_checkpoints(model, walk)
    space.blocks[0].basis.data[1, 0] = float("nan")
    quality = space.basis_quality()
    assert quality["orthogonality_error"] != quality["orthogonality_error"]  # NaN, not max([0, nan])


def train_alpha_and_coordinates(walk, optimizer, steps, order=None, **hyper):
    """Final weights after training alpha and coordinates on the same batches."""
    out = {}
    for train in ("alpha", "coordinates"):
        model = mlp()
        states = walk if order is None else [walk[i] for i in order]
        trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, states), train=train)
        opt = optimizer(trainer.parameters(), **hyper)
        train_steps(model, steps, lambda: trainer.step(opt))
        out[train] = (torch.nn.utils.parameters_to_vector(model.parameters()).double(), trainer)
    return out


def test_alpha_starts_at_each_checkpoint_and_rebuilds_the_weights():
    model = mlp()
    walk = random_walk(model, 5, step=0.05)
    space = twa.Subspace.from_checkpoints(model, walk)
    trainer = twa.TWA(model, space, train="alpha")
    for j in range(5):
        trainer.move_to(j)
        w = torch.nn.utils.parameters_to_vector(model.parameters())
        assert (w - flat(walk[j], model)).norm() <= 1e-5 * w.norm()
    opt = torch.optim.AdamW(trainer.parameters(), lr=0.05)
    train_steps(model, 10, lambda: trainer.step(opt))
    alpha = space.checkpoint_coefficients(trainer.coordinates)[0]
    rows = torch.stack([flat(s, model) for s in walk]).double()
    w = torch.nn.utils.parameters_to_vector(model.parameters()).double()
    assert (rows.t() @ alpha - w).norm() <= 1e-5 * w.norm()


def test_sgd_on_alpha_is_sgd_on_coordinates_preconditioned_by_d_t_d():
    walk = random_walk(mlp(), 5, step=0.05)
    lr = 0.1
    out = train_alpha_and_coordinates(walk, torch.optim.SGD, 1, lr=lr)
    (_, t_alpha), (_, t_coord) = out["alpha"], out["coordinates"]
    space, (unit, _) = t_coord.space, t_alpha.directions[0]
    step_coord = t_coord.coordinates.detach() - space.mean_coords  # -lr P g
    step_alpha = t_alpha.coordinates - space.mean_coords  # -lr D^T D P g
    assert torch.allclose(step_alpha, unit.t() @ unit @ step_coord, rtol=1e-6, atol=1e-12)
    assert (step_alpha - step_coord).norm() > 1e-3 * step_coord.norm()  # they do differ


def test_sgd_on_alpha_and_on_coordinates_reach_the_same_minimum():
    """On a convex loss, the preconditioner changes the path, not the minimiser. alpha moves in the
    checkpoints' affine hull (sum alpha = 1, the journal), coordinates in their linear span (the ICLR
    method: one more direction, the scale of the mean); 4 checkpoints in a 3-dimensional linear
    subspace make the two sets equal."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randn(256, 3)
    generators = torch.randn(3, 63)
    walk = [dict(zip(("weight", "bias"), (torch.randn(3) @ generators).split([60, 3])))
            for _ in range(4)]
    walk = [{"weight": s["weight"].view(3, 20), "bias": s["bias"]} for s in walk]
    finals = {}
    for train in ("alpha", "coordinates"):
        model = nn.Linear(20, 3)
        trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, walk), train=train)
        opt = torch.optim.SGD(trainer.parameters(), lr=0.05, momentum=0.9)
        for _ in range(600):
            nn.functional.mse_loss(model(x), y).backward()
            trainer.step(opt)
        finals[train] = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert torch.allclose(finals["alpha"], finals["coordinates"], atol=1e-4)


def test_adamw_on_alpha_does_not_depend_on_the_checkpoints_order():
    walk = random_walk(mlp(), 6, step=0.05)
    order = [3, 0, 5, 1, 4, 2]
    hyper = dict(lr=0.05, weight_decay=0.0)
    first = train_alpha_and_coordinates(walk, torch.optim.AdamW, 15, **hyper)
    shuffled = train_alpha_and_coordinates(walk, torch.optim.AdamW, 15, order=order, **hyper)
    alpha_gap = (first["alpha"][0] - shuffled["alpha"][0]).norm() / first["alpha"][0].norm()
    coord_gap = (first["coordinates"][0] - shuffled["coordinates"][0]).norm() / \
        first["coordinates"][0].norm()
    assert alpha_gap <= 1e-6
    assert coord_gap > 1e-4  # AdamW on the orthonormal coordinates does depend on it


def loaders_with(normalize, root):
    args = SimpleNamespace(datasets="ImageFolder", data_dir=root, batch_size=64, workers=0,
                           randomseed=0, channels_last=False, train_subset=0, loader="memory",
                           normalize=normalize)
    # half of the training images held out: held_out_eval serves them without augmentation, whose
    # zero padding would swamp a brightness feature
    return loaders.build_loaders(args, torch.device("cpu"), split=lambda n: torch.arange(0, n, 2))


def test_cifar_uses_the_reference_constants_by_default():
    assert data.default_normalization("CIFAR10") == data.default_normalization("CIFAR100") == "reference"
    assert data.default_normalization("ImageFolder") == "dataset"
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = data.input_normalization(SimpleNamespace(datasets="CIFAR100"), images)
    assert (mean, std) == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def brightness_images(root, per_class=40):
    """Classes that differ by brightness only: a classifier then depends on the normalisation."""
    gen = torch.Generator().manual_seed(0)
    from PIL import Image
    for split in ("train", "test"):
        for label, level in enumerate((150, 190)):  # both above the reference mean (0.49 x 255)
            folder = os.path.join(root, split, f"c{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = (level + torch.randint(-20, 21, (32, 32, 3), generator=gen)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(os.path.join(folder, f"{i}.png"))
    return root


def test_a_model_scored_on_the_other_normalisation_loses_accuracy(tmp_path):
    root = brightness_images(str(tmp_path / "bright"))
    by_dataset, by_reference = loaders_with("dataset", root), loaders_with("reference", root)
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):
        for images, labels in by_dataset.held_out_eval.batches():
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
            opt.zero_grad()
    matched = loop.evaluate(model, by_dataset.test)["accuracy"]
    mismatched = loop.evaluate(model, by_reference.test)["accuracy"]
    assert matched >= 95 and mismatched <= matched - 20


@pytest.mark.slow
def test_twa_cli_reports_both_bases_and_trains_alpha(tiny_data, tmp_path):
    save = tmp_path / "sgd"
    run("train_sgd.py", *common(tiny_data, save, "--epochs", 2, "--save-every", 2))
    reports = {}
    for name, extra in (("ref", ["--basis", "reference", "--train_start", 4]),
                        ("alpha", ["--train", "alpha", "--opt", "AdamW"])):
        out = tmp_path / name
        run("train_twa.py", *common(tiny_data, save, "--params_end", 5, "--epochs", 1,
                                    "--output-dir", out, "--log-dir", out, *extra))
        with open(out / "twa_results.json") as f:
            reports[name] = json.load(f)["basis"]
    assert reports["ref"]["basis"] == "reference" and reports["alpha"]["basis"] == "orthonormal"
    assert reports["alpha"]["gram_eigenvalues"] == pytest.approx([1, 1], abs=1e-4)
    assert reports["ref"]["gram_eigenvalues"][0] < 1 - 1e-3  # low-lr, nearly parallel checkpoints
    bad = run("train_twa.py", *common(tiny_data, save, "--params_end", 5, "--basis", "reference",
                                      "--layer-size", 0), check=False)
    assert bad.returncode == 2 and "--basis reference" in bad.stderr
    resumed = run("train_twa.py", *common(tiny_data, save, "--params_end", 5, "--epochs", 1,
                                          "--output-dir", tmp_path / "alpha", "--opt", "AdamW",
                                          "--resume"), check=False)
    assert resumed.returncode == 2 and "was saved with --train alpha, not coordinates" in resumed.stderr
