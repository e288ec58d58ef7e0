"""The method's core: basis, projection, coefficients, storage precisions, safe loading."""
import copy
import logging
import os

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

import twa


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


def wide_mlp(seed=0):
    """mlp's inputs and outputs, with a first layer of 5,120 weights: a block that a layer-wise
    basis stores at 8 or 4 bits (smaller blocks of several stay in float32, build.SMALL_BLOCK)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 5))


def random_walk(model, n, step=0.01, seed=0):
    """n state_dicts along a random walk with small steps: neighbours have cosine >= 0.99."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    walk = []
    for _ in range(n):
        state = {k: v + step * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        walk.append(state)
    return walk


def flat(state, model):
    return twa.checkpoints.flatten_checkpoint(state, twa.trainable_parameters(model))


def test_walk_is_nearly_parallel():
    model = mlp()
    a, b = (flat(s, model) for s in random_walk(model, 2))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.99


@pytest.mark.parametrize("n", [2, 15])
def test_basis_is_orthonormal_and_spans_every_checkpoint(n):
    model = mlp()
    walk = random_walk(model, n)
    space = twa.Subspace.from_checkpoints(model, walk)
    assert space.rank == n
    assert space.orthogonality_error() <= 1e-5  # P P^T computed in float64
    for state in walk:
        assert space.relative_residual(flat(state, model)) <= 1e-5
    outside = torch.randn(space.blocks[0].basis.dim)
    assert space.relative_residual(outside) > 0.5  # the residual check can fail


def test_naive_gram_schmidt_is_worse_on_nearly_parallel_vectors():
    """The reason for re-orthogonalisation: one classical pass loses orthogonality here."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(5000, generator=gen)
    rows = torch.stack([base + 1e-4 * torch.randn(5000, generator=gen) for _ in range(8)])
    naive = rows.clone()
    for i in range(len(naive)):
        naive[i] -= naive[:i].t() @ (naive[:i] @ naive[i])
        naive[i] /= naive[i].norm()
    naive_error = (naive.double() @ naive.double().t() - torch.eye(8, dtype=torch.float64)).abs().max()
    model = nn.Linear(5000, 1, bias=False)
    space = twa.Subspace.from_checkpoints(model, [{"weight": r.view(1, -1)} for r in rows])
    assert naive_error > 1e-3
    assert space.orthogonality_error() <= 1e-5


def test_checkpoint_adding_no_direction_is_dropped_with_a_warning(caplog):
    model = mlp()
    walk = random_walk(model, 4)
    with caplog.at_level(logging.WARNING, logger="twa"):
        space = twa.Subspace.from_checkpoints(model, walk[:3] + [walk[1]] + walk[3:])
    assert space.rank == 4
    assert "adds no new direction" in caplog.text
    assert space.orthogonality_error() <= 1e-5
    # the coefficients still reproduce any point, the duplicate simply gets a zero
    c = space.start_coordinates(4)
    out = torch.empty(space.blocks[0].basis.dim)
    space.weights(c, out)
    alpha = space.checkpoint_coefficients(c)
    stacked = torch.stack([flat(s, model) for s in walk[:3] + [walk[1]] + walk[3:]]).double()
    assert ((alpha @ stacked - out.double()).norm() / out.double().norm()) <= 1e-5


def train_steps(model, steps, step_fn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        step_fn()


def test_projected_sgd_equals_sgd_on_the_coefficients_and_stays_in_the_span():
    base = mlp()
    walk = random_walk(base, 6, step=0.05)
    hyper = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)

    coef_model = copy.deepcopy(base)
    space = twa.Subspace.from_checkpoints(coef_model, walk)
    trainer = twa.TWA(coef_model, space)
    opt = torch.optim.SGD(trainer.parameters(), **hyper)
    train_steps(coef_model, 25, lambda: trainer.step(opt))

    proj_model = copy.deepcopy(base)
    params = [p for _, p in twa.trainable_parameters(proj_model)]
    torch.nn.utils.vector_to_parameters(space.mean.clone(), params)
    proj_opt = torch.optim.SGD(params, **hyper)

    def projected_step():
        g = torch.nn.utils.parameters_to_vector([p.grad for p in params])
        space.project_(g)  # the paper's g -> P^T P g
        torch.nn.utils.vector_to_parameters(g, [p.grad for p in params])
        proj_opt.step()
        proj_opt.zero_grad()
    train_steps(proj_model, 25, projected_step)

    w_coef = torch.nn.utils.parameters_to_vector(coef_model.parameters()).double()
    w_proj = torch.nn.utils.parameters_to_vector(proj_model.parameters()).double()
    start = space.mean.double()
    assert (w_coef - start).norm() > 0.1 * start.norm() * 1e-2  # it moved
    assert (w_coef - w_proj).norm() / w_coef.norm() <= 1e-5
    assert space.relative_residual(w_coef.float()) <= 1e-5
    assert space.relative_residual(w_proj.float()) <= 1e-5


def test_alpha_reproduces_the_final_weights():
    model = mlp()
    walk = random_walk(model, 8, step=0.05)
    space = twa.Subspace.from_checkpoints(model, walk)
    trainer = twa.TWA(model, space)
    opt = torch.optim.SGD(trainer.parameters(), lr=1.0, momentum=0.9)
    train_steps(model, 10, lambda: trainer.step(opt))
    alpha = space.checkpoint_coefficients(trainer.coordinates)[0]  # one block: one alpha per checkpoint
    stacked = torch.stack([flat(s, model) for s in walk]).double()
    weights = torch.nn.utils.parameters_to_vector(model.parameters()).double()
    assert (alpha @ stacked - weights).norm() / weights.norm() <= 1e-5
    assert not torch.allclose(alpha, torch.full_like(alpha, 1 / 8))  # training changed them


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_swa_point_equals_averaged_model_with_update_bn():
    model = small_cnn()
    walk = random_walk(model, 5, step=0.1)
    gen = torch.Generator().manual_seed(3)
    loader = [(torch.randn(8, 3, 8, 8, generator=gen), torch.zeros(8, dtype=torch.long))
              for _ in range(4)]

    ours = small_cnn()
    twa.TWA(ours, twa.Subspace.from_checkpoints(ours, walk))
    update_bn(loader, ours)

    reference_model = small_cnn()
    averaged = AveragedModel(reference_model)
    for state in walk:
        reference_model.load_state_dict(state)
        averaged.update_parameters(reference_model)
    update_bn(loader, averaged)

    for (name, a), b in zip(ours.state_dict().items(), averaged.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
    x = torch.randn(4, 3, 8, 8, generator=gen)
    ours.eval(), averaged.eval()
    assert torch.allclose(ours(x), averaged(x), atol=1e-5)


def test_start_from_a_checkpoint():
    model = mlp()
    walk = random_walk(model, 5)
    space = twa.Subspace.from_checkpoints(model, walk)
    twa.TWA(model, space, start=2)
    weights = torch.nn.utils.parameters_to_vector(model.parameters())
    assert torch.allclose(weights, flat(walk[2], model), atol=1e-5)


def test_gradients_are_views_into_one_buffer():
    model = mlp()
    trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, random_walk(model, 3)))
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    train_steps(model, 2, lambda: trainer.step(opt))
    assert [p.grad.data_ptr() for p in model.parameters()] == pointers
    # a loop that sets gradients to None still works: they are copied back into the buffer
    model.zero_grad(set_to_none=True)
    train_steps(model, 1, lambda: trainer.step(opt))
    assert [p.grad.data_ptr() for p in model.parameters()] == pointers


@pytest.mark.parametrize("bits,orth_tol", [(16, 1e-3), (8, 1e-2), (4, 0.2)])
def test_low_precision_bases_keep_the_weights_in_their_span(bits, orth_tol):
    model = mlp()
    walk = random_walk(model, 6, step=0.05)
    full = twa.Subspace.from_checkpoints(model, walk)
    space = twa.Subspace.from_checkpoints(model, walk, bits=bits)
    assert space.nbytes() < full.nbytes() * (bits / 32) * 1.2
    assert space.orthogonality_error() <= orth_tol
    trainer = twa.TWA(model, space)
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5, momentum=0.9)
    train_steps(model, 5, lambda: trainer.step(opt))
    # the weights are exactly mean + Q^T (c - c0) for the stored (dequantised) basis Q
    q = space.blocks[0].basis.as_float32(0, space.blocks[0].basis.dim).double()
    expected = space.mean.double() + q.t() @ (trainer.coordinates.detach() - space.mean_coords)
    weights = torch.nn.utils.parameters_to_vector(model.parameters()).double()
    assert (weights - expected).norm() / weights.norm() <= 1e-6
    # and the mean is kept exactly: quantisation only touches deviations from it
    trainer.move_to("mean")
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), space.mean)


def test_quantised_block_round_trip_on_ragged_dimensions():
    row = torch.randn(1000)
    for bits, tol in ((8, 0.02), (4, 0.3)):
        basis = twa.storage.empty_basis(1, 1000, bits=bits)
        basis.append(row)
        back = basis.as_float32(0, 1000)[0]
        assert (back - row).abs().max() <= tol * row.abs().max()


def test_pca_keeps_the_top_directions():
    model = mlp()
    walk = random_walk(model, 10, step=0.05)
    space = twa.Subspace.from_checkpoints(model, walk)
    explained = space.to_principal_components(3)
    assert space.rank == 3 and 0 < explained < 1
    assert space.orthogonality_error() <= 1e-5
    c = space.start_coordinates(4)
    out = torch.empty(space.blocks[0].basis.dim)
    space.weights(c, out)
    stacked = torch.stack([flat(s, model) for s in walk]).double()
    alpha = space.checkpoint_coefficients(c)
    assert (alpha @ stacked - out.double()).norm() / out.double().norm() <= 1e-5
    centred = stacked - stacked.mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[:3]
    q = space.blocks[0].basis.as_float32(0, space.blocks[0].basis.dim).double()
    assert torch.linalg.matrix_norm(top @ q.t() @ q - top) <= 1e-4  # same 3-dim space


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = mlp()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "0.pt")
    loaded = twa.checkpoints.load_state_dict(tmp_path / "0.pt")
    assert set(loaded) == set(model.state_dict())


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_carrying_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(twa.CheckpointError, match="refusing to load"):
        twa.checkpoints.load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_mismatched_checkpoint_names_the_file(tmp_path):
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    model = mlp()
    with pytest.raises(twa.CheckpointError, match="other.pt does not match the model"):
        twa.Subspace.from_checkpoints(model, [tmp_path / "other.pt"])


def test_truncated_checkpoint_is_caught_before_loading(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "0.pt")
    data = (tmp_path / "0.pt").read_bytes()
    (tmp_path / "1.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(twa.CheckpointError, match="1.pt is truncated or corrupt"):
        twa.Subspace.from_checkpoints(mlp(), [tmp_path / "0.pt", tmp_path / "1.pt"])
    assert os.path.getsize(tmp_path / "1.pt") < len(data)


def test_training_checkpoint_loads_its_model_or_says_what_it_holds(tmp_path):
    model = mlp()
    torch.save({"model": model.state_dict(), "optimizer": {"lr": 0.1}}, tmp_path / "train.pt")
    loaded = twa.checkpoints.load_state_dict(tmp_path / "train.pt")
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "other.pt")
    with pytest.raises(twa.CheckpointError, match=r"no tensors.*'epoch', 'optimizer'"):
        twa.checkpoints.load_state_dict(tmp_path / "other.pt")


@pytest.mark.parametrize("train,bits,layer_size", [("coordinates", 32, None), ("alpha", 8, 0)])
def test_a_training_step_copies_nothing_to_the_host(monkeypatch, train, bits, layer_size):
    """On a GPU each of these would be a device-to-host sync; on the CPU they are traps, bool(),
    float() and int() of a tensor among them. The 8-bit case stores its first block rounded, so
    the low-bit products run inside the trap."""
    model = wide_mlp()
    space = twa.Subspace.from_checkpoints(model, random_walk(model, 6, step=0.05), bits=bits,
                                          layer_size=layer_size)
    assert space.blocks[0].basis.bits == bits
    trainer = twa.TWA(model, space, train=train)
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    calls = []

    def trap(name):
        original = getattr(torch.Tensor, name)

        def recorded(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return recorded
    train_steps(model, 1, lambda: trainer.step(opt))  # the optimizer's lazy state, outside the trap
    for name in ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    train_steps(model, 3, lambda: trainer.step(opt))
    assert calls == []


def test_every_checkpoint_is_streamed_the_last_one_too():
    """101 slowly moving checkpoints: each one's coordinates give back its weights to the same
    relative accuracy, the last included (it was once set to minus the sum of the others, off by n
    times the float32 rounding of the mean: 5.7e-4 of its deviation against 4e-6)."""
    model = nn.Linear(3000, 10)
    walk = random_walk(model, 101, step=2e-4, seed=3)
    space = twa.Subspace.from_checkpoints(model, walk)
    out = torch.empty(space.shard.dim)
    mean = space.mean.double()
    errors = []
    for i, state in enumerate(walk):
        w = flat(state, model).double()
        back = space.weights(space.start_coordinates(i), out).double()
        errors.append(((back - w).norm() / (w - mean).norm()).item())
    assert max(errors[:-1]) <= 1e-4
    assert errors[-1] <= 2 * max(errors[:-1]) + 1e-6


@pytest.mark.parametrize("tol", [0.0, -1e-3, 1.0, 2.0])
def test_a_tolerance_outside_zero_one_is_refused(tol):
    model = mlp()
    with pytest.raises(ValueError, match="tol"):
        twa.Subspace.from_checkpoints(model, random_walk(model, 3), tol=tol)


def test_nothing_to_train_is_an_error_not_a_silent_no_op():
    model = mlp()
    same = random_walk(model, 1) * 3  # one checkpoint three times: every deviation is zero
    space = twa.Subspace.from_checkpoints(model, same)
    with pytest.raises(ValueError, match="nothing to train"):
        twa.TWA(copy.deepcopy(model), space, train="alpha")
    twa.TWA(copy.deepcopy(model), space)  # the coordinates can still scale the mean


def test_channels_last_parameters_keep_their_layout_and_train_as_contiguous_ones():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    walk = random_walk(net, 4, step=0.05)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    results = []
    for channels_last in (False, True):
        model = copy.deepcopy(net)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, walk))
        opt = torch.optim.SGD(trainer.parameters(), lr=0.5, momentum=0.9)
        for _ in range(3):
            nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)
                                              if channels_last else x), y).backward()
            trainer.step(opt)
        conv = model[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        results.append(flat(model.state_dict(), model))
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_a_tensor_that_is_zero_in_one_checkpoint_adds_no_noise_direction():
    """Layer-wise blocks: a bias that is all zero in one checkpoint adds nothing to its block (the
    drop rule's floor is the block's largest checkpoint norm, not that checkpoint's zero norm)."""
    model = mlp()
    walk = random_walk(model, 4, step=0.05)
    walk[2]["2.bias"] = torch.zeros_like(walk[2]["2.bias"])
    space = twa.Subspace.from_checkpoints(model, walk, layer_size=0)
    bias = next(i for i, block in enumerate(space.blocks) if block.names == ["2.bias"])
    assert space.blocks[bias].rank == 3
    alpha = space.checkpoint_coefficients(space.start_coordinates(3))
    assert alpha.abs().max() < 10  # a noise direction gave alphas of about 1e7
    for state in walk:
        assert space.relative_residual(flat(state, model)) <= 1e-5


def test_ambiguous_or_non_float_checkpoints_are_refused():
    model = mlp()
    state = random_walk(model, 1)[0]
    with pytest.raises(twa.CheckpointError, match="ambiguous"):
        twa.Subspace.from_checkpoints(model, [{**state, "module.0.weight": state["0.weight"]}])
    with pytest.raises(twa.CheckpointError, match="int64"):
        twa.Subspace.from_checkpoints(model, [{**state, "2.bias": state["2.bias"].long()}])
    with pytest.raises(twa.CheckpointError, match="meta"):
        twa.checkpoints.load_state_dict({**state, "2.bias": torch.empty(5, device="meta")})
    wrapped = {f"module.{k}": v for k, v in state.items()}  # DDP's checkpoints: every key prefixed
    assert twa.Subspace.from_checkpoints(model, [wrapped, state]).rank == 1


def test_a_model_with_its_own_submodule_called_module_keeps_its_names():
    model = nn.Sequential()
    model.add_module("module", nn.Linear(4, 3))
    model.add_module("head", nn.Linear(3, 2))
    walk = random_walk(model, 3)
    assert twa.Subspace.from_checkpoints(model, walk).rank == 3
    # every key then starts with "module.": still the model's own names, in memory and from files
    alone = nn.Sequential()
    alone.add_module("module", nn.Linear(4, 3))
    walk = random_walk(alone, 3)
    assert all(key.startswith("module.") for key in walk[0])
    assert twa.Subspace.from_checkpoints(alone, walk).rank == 3
    wrapped = [{f"module.{k}": v for k, v in state.items()} for state in walk]  # and under DDP
    assert twa.Subspace.from_checkpoints(alone, wrapped).rank == 3
    with pytest.raises(ValueError, match="no trainable parameters"):
        twa.Subspace.from_checkpoints(nn.ReLU(), [{}])


def test_a_recorder_refuses_to_change_the_span_it_handed_out():
    model = mlp()
    recorder = twa.SubspaceRecorder(model, capacity=4)
    recorder.add()
    space = recorder.subspace()
    with pytest.raises(ValueError, match="handed out"):
        recorder.add()
    assert space.rank == 1


def test_frozen_parameters_and_buffers_must_be_the_checkpoints():
    """TWA writes only the trainable parameters: a model built afresh whose frozen layer or buffer
    differs from the checkpoints' is refused, not trained with its random frozen weights."""
    def net():
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        model[0].requires_grad_(False)  # a frozen backbone
        model.register_buffer("scale", torch.ones(3))
        return model
    trained = net()
    walk = [{k: v + 0.01 * i * v.is_floating_point() if k.startswith("2.") else v.clone()
             for k, v in trained.state_dict().items()} for i in range(3)]
    for state in walk:
        state["scale"] = torch.full((3,), 2.0)
        state["1.running_mean"] = torch.randn(8)  # statistics may differ: update_bn recomputes them
    fresh = net()
    fresh.scale.fill_(2.0)
    with pytest.raises(ValueError, match="frozen parameter '0.weight' differs from every checkpoint's"):
        twa.Subspace.from_checkpoints(fresh, walk)
    fresh.load_state_dict(trained.state_dict())  # the frozen layer now, but scale 1
    with pytest.raises(ValueError, match="buffer 'scale' differs"):
        twa.Subspace.from_checkpoints(fresh, walk)
    walk[0]["scale"] = torch.ones(3)  # a buffer that changed during training: one match suffices
    assert twa.Subspace.from_checkpoints(fresh, walk).rank == 2  # the frozen layer is no direction
    fresh.load_state_dict(walk[-1])
    assert twa.Subspace.from_checkpoints(fresh, walk).rank == 2
    shared = nn.Sequential(fresh, fresh[1])  # the norm layer under a second name too
    with torch.no_grad():
        shared[1].running_mean.add_(1.0)
    walk = [{**state, **{f"0.{k}": v for k, v in state.items()}} for state in walk]
    for state in walk:
        state.update({f"1.{k[2:]}": v for k, v in state.items() if k.startswith("1.")})
    assert twa.Subspace.from_checkpoints(shared, walk).rank == 2


def test_tied_weights_are_trained_once_and_not_taken_for_frozen_ones():
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    model[1].weight = model[0].weight  # tied: one parameter under two names
    walk = random_walk(model, 3)
    for state in walk:
        state["1.weight"] = state["0.weight"]
    space = twa.Subspace.from_checkpoints(model, walk)
    assert space.rank == 3 and model[1].weight is model[0].weight


def test_a_model_moved_after_twa_is_an_error_not_a_silent_no_op():
    model = mlp()
    trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, random_walk(model, 3)))
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
    model.to(torch.float64)  # new storage for every parameter: the trainer's views are cut off
    model(torch.randn(4, 20, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="parameter .0.weight. has new storage .moved"):
        trainer.step(opt)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_not_in_float32_is_refused_in_one_line(dtype):
    model = mlp()
    space = twa.Subspace.from_checkpoints(model, random_walk(model, 3))
    with pytest.raises(ValueError, match=f"float32 trainable parameters, not {dtype}"):
        twa.TWA(model.to(dtype), space)


def test_checkpoints_given_as_one_path_or_in_memory_training_states(tmp_path):
    model = mlp()
    walk = random_walk(model, 3)
    torch.save(walk[0], tmp_path / "0.pt")
    for one in (str(tmp_path / "0.pt"), tmp_path / "0.pt", walk[0]):
        with pytest.raises(ValueError, match="a list of files or state_dicts, not one"):
            twa.Subspace.from_checkpoints(model, one)
    states = [{"model": state, "optimizer": {"lr": 0.1}, "epoch": i} for i, state in enumerate(walk)]
    assert twa.Subspace.from_checkpoints(model, states).rank == 3  # unwrapped as files are
    with pytest.raises(twa.CheckpointError) as refused:
        twa.Subspace.from_checkpoints(model, [{"net": walk[0], "epoch": 1}])
    message = str(refused.value)  # names the state_dict, not its whole contents
    assert message.startswith("checkpoint state_dict #0 holds no tensors") and len(message) < 300
    with pytest.raises(ValueError, match="layer_size must be None or >= 0"):
        twa.Subspace.from_checkpoints(model, walk, layer_size=-1)


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_a_float64_default_dtype_changes_nothing(bits):
    """Every tensor TWA makes names its dtype: under torch.set_default_dtype(torch.float64) a
    float32 model builds the same basis (from state_dicts and recorded) and trains to the same
    weights (a buffer made in the default dtype would stop the basis build with a dtype mismatch)."""
    walk = random_walk(wide_mlp(), 5, step=0.05)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen))
               for _ in range(3)]

    def run(default):
        model = wide_mlp()
        torch.set_default_dtype(default)
        try:
            space = twa.Subspace.from_checkpoints(model, walk, bits=bits, layer_size=0)
            recorder = twa.SubspaceRecorder(model, 5, bits=bits)
            for state in walk:
                model.load_state_dict(state)
                recorder.add()
            opt = twa.SubspaceOptimizer(model, space, torch.optim.SGD, lr=0.1, momentum=0.9)
            for x, y in batches:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            return flat(model.state_dict(), model), recorder.subspace().rank
        finally:
            torch.set_default_dtype(torch.float32)
    (weights, rank), (weights64, rank64) = run(torch.float32), run(torch.float64)
    assert rank64 == rank and torch.equal(weights64, weights)
