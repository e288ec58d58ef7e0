"""The library's own inputs, as a hostile user gives them: every wrong argument is a ValueError or
TypeError naming it (raised before any state changes), a model changed after TWA(...) is caught
at the next step, whichever parameter changed, and checkpoints or states as they come (a duplicate,
entries beside the weights, a state without its recorded rounding) give the basis they hold."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import test_twa
import twa
from test_twa import random_walk


def mlp(seed=0, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def walk(model, n=3, step=0.05, seed=0):
    return random_walk(model, n, step, seed)


def trained(model=None, **options):
    model = model or mlp()
    states = walk(model)
    model.load_state_dict(states[-1])
    trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, states), **options)
    return model, trainer


def backward(model, dtype=torch.float32):
    model(torch.randn(4, 6, dtype=dtype)).sum().backward()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


# --- A model changed after TWA(...) is refused at the next step, whichever parameter changed ------

def change_last_data(model):
    model[2].bias.data = model[2].bias.data.clone()


def cast_with_empty_first(model):
    model.to(torch.float64)


def replace_parameter(model):
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())


def freeze_one(model):
    model[2].bias.requires_grad_(False)


@pytest.mark.parametrize("change,named", [(change_last_data, "2.bias"),
                                          (replace_parameter, "2.weight"),
                                          (freeze_one, "2.bias")])
def test_a_step_refuses_any_parameter_changed_after_binding(change, named):
    model, trainer = trained()
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
    change(model)
    backward(model)
    before = trainer.trained.detach().clone()
    with pytest.raises(RuntimeError, match=f"parameter '{named}'"):
        trainer.step(opt)
    assert torch.equal(trainer.trained.detach(), before)


def test_a_cast_is_caught_when_the_first_parameter_is_empty():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 3))  # the first weight has no entries
    states = walk(model)
    trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, states))
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
    model[1].to(torch.float64)
    with pytest.raises(RuntimeError, match="'1.weight' has new storage"):
        trainer.step(opt)


def test_a_memory_format_change_of_a_later_parameter_is_caught():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    trainer = twa.TWA(model, twa.Subspace.from_checkpoints(model, walk(model)))
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
    model[1].to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="'1.weight' has new storage"):
        trainer.step(opt)


def test_a_frozen_parameter_made_trainable_after_binding_is_caught():
    model = mlp()
    model[0].requires_grad_(False)
    model, trainer = trained(model)
    model[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="'0.weight' had requires_grad=False"):
        trainer.step(torch.optim.SGD(trainer.parameters(), lr=0.1))


def test_a_second_twa_on_the_same_model_cuts_off_the_first():
    model, first = trained()
    twa.TWA(model, twa.Subspace.from_checkpoints(model, walk(model)))
    with pytest.raises(RuntimeError, match="new storage"):
        first.step(torch.optim.SGD(first.parameters(), lr=0.1))


def test_an_unchanged_model_trains_and_the_checks_read_no_values(monkeypatch):
    model, trainer = trained()
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5)
    before = weights(model)
    with monkeypatch.context() as traps:  # on a GPU each would be a copy to the host
        for name in ("item", "tolist", "cpu", "__bool__"):
            traps.setattr(torch.Tensor, name, lambda *args: pytest.fail("a value read"))
        trainer.check(opt)
    backward(model)
    trainer.step(opt)
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(model)))


# --- The optimizer must hold the coordinates and step without a closure ---------------------------

def test_an_optimizer_of_the_model_parameters_is_refused_before_anything_moves():
    model, trainer = trained()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the usual mistake: not trainer.parameters()
    backward(model)
    with pytest.raises(ValueError, match="does not hold the TWA coordinates"):
        trainer.step(opt)


def test_an_optimizer_that_needs_a_closure_is_refused():
    model, trainer = trained()
    backward(model)
    with pytest.raises(ValueError, match="LBFGS.step needs a closure"):
        trainer.step(torch.optim.LBFGS(trainer.parameters()))


def test_something_that_is_no_optimizer_is_a_type_error():
    model, trainer = trained()
    backward(model)
    for wrong in (None, trainer.parameters()):
        with pytest.raises(TypeError, match="optimizer must be a torch optimizer"):
            trainer.step(wrong)


def test_an_optimizer_with_other_groups_besides_the_coordinates_is_accepted():
    model, trainer = trained()
    extra = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [extra]}, {"params": trainer.parameters()}], lr=0.5)
    before = trainer.trained.detach().clone()
    backward(model)
    trainer.step(opt)
    assert not torch.equal(before, trainer.trained.detach())


# --- start: "mean", a checkpoint number in [0, n), or a tensor of the trained size ----------------

@pytest.mark.parametrize("train", ["coordinates", "alpha"])
@pytest.mark.parametrize("start,error,message", [
    (-1, ValueError, "numbered 0 to 2 .the mean is start='mean'"), (3, ValueError, "numbered 0 to 2"),
    ("last", ValueError, "start must be 'mean' or a checkpoint number"),
    ("1", ValueError, "start must be 'mean'"), (True, TypeError, "not bool"),
    (1.0, TypeError, "not float"), (None, TypeError, "not NoneType")])
def test_a_wrong_start_is_refused_before_the_model_is_touched(train, start, error, message):
    model = mlp()
    states = walk(model)
    space = twa.Subspace.from_checkpoints(model, states)
    storage = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(error, match=message):
        twa.TWA(model, space, start=start, train=train)
    assert storage == [p.data_ptr() for p in model.parameters()]  # not bound to a failed TWA
    trainer = twa.TWA(model, space, train=train)
    after = weights(model)
    with pytest.raises(error, match=message):
        trainer.move_to(start)
    assert all(torch.equal(a, b) for a, b in zip(after, weights(model)))


@pytest.mark.parametrize("shape", [(), (1,), (2,), (3, 1)])
def test_a_start_tensor_of_another_shape_is_refused_not_broadcast(shape):
    model, trainer = trained()
    with pytest.raises(ValueError, match=r"start must be a floating-point tensor of shape \(3,\)"):
        trainer.move_to(torch.ones(shape, dtype=torch.float64))


def test_a_non_finite_or_integer_start_tensor_is_refused():
    model, trainer = trained()
    with pytest.raises(ValueError, match="NaN or Inf"):
        trainer.move_to(torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="floating-point"):
        trainer.move_to(torch.tensor([1, 0, 0]))


def test_a_numpy_integer_start_is_a_checkpoint_number():
    model, trainer = trained()
    trainer.move_to(np.int64(1))
    assert torch.allclose(trainer.coordinates, trainer.space.start_coordinates(1))


def test_start_coordinates_refuses_negative_numbers_too():
    model, trainer = trained()
    with pytest.raises(ValueError, match="numbered 0 to 2"):
        trainer.space.start_coordinates(-1)


# --- Vectors of the wrong length are refused, not broadcast --------------------------------------

@pytest.mark.parametrize("shape", [(), (1,), (4,), (3, 1)])
def test_checkpoint_coefficients_refuses_a_vector_of_another_length(shape):
    model, trainer = trained()
    with pytest.raises(ValueError, match=r"c must hold the subspace's 3 coordinates"):
        trainer.space.checkpoint_coefficients(torch.zeros(shape))


def test_weight_space_vectors_of_another_length_are_refused():
    model, trainer = trained()
    space, dim = trainer.space, sum(p.numel() for p in model.parameters())
    for call in (space.nearest_coordinates, space.relative_residual, space.project_):
        with pytest.raises(ValueError, match=f"vector of the model's {dim} trainable weights"):
            call(torch.ones(1))
    alpha = space.checkpoint_coefficients(trainer.coordinates)
    with pytest.raises(ValueError, match="alpha must be 1 x 3"):
        twa.combination_residual(space, model, walk(model), alpha[:, :2])


# --- A subspace or recorder is used only with the model it was built for ---------------------------

def reshaped():
    """mlp() with its first weight transposed: as many trainable entries, laid out otherwise."""
    other = mlp()
    other[0].weight = nn.Parameter(torch.zeros(6, 8))
    return other


def test_a_subspace_refuses_a_model_of_the_same_size_and_other_shapes():
    model = mlp()
    space = twa.Subspace.from_checkpoints(model, walk(model))
    other = reshaped()
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(6, 8\), where the subspace was "
                                         r"built for '0.weight' of shape \(8, 6\)"):
        twa.TWA(other, space)
    with pytest.raises(ValueError, match="has shape"):
        twa.combination_residual(space, other, walk(model), torch.ones(1, 3) / 3)


def test_a_subspace_accepts_the_same_layout_under_other_names():
    model = mlp()
    space = twa.Subspace.from_checkpoints(model, walk(model))
    renamed = nn.Module()
    renamed.body = copy.deepcopy(model)
    twa.TWA(renamed, space)


def test_a_recorder_refuses_a_model_of_the_same_size_and_other_shapes():
    model = mlp()
    recorder = twa.SubspaceRecorder(model, capacity=3)
    recorder.add(model)
    other = reshaped()
    with pytest.raises(ValueError, match="where the recorder was built for"):
        recorder.add(other)
    assert recorder.names == ["recorded #0"]
    assert recorder.subspace().layout == twa.checkpoints.layout(twa.trainable_parameters(model))


def test_something_that_is_no_model_or_subspace_is_a_type_error():
    model = mlp()
    with pytest.raises(TypeError, match="model must be an nn.Module, not OrderedDict"):
        twa.SubspaceRecorder(model.state_dict(), capacity=2)
    with pytest.raises(TypeError, match="space must be a twa.Subspace, not list"):
        twa.TWA(model, walk(model))


# --- The recorder's arguments and states ----------------------------------------------------------

@pytest.mark.parametrize("capacity,error,message", [
    (-1, ValueError, "capacity must be at least 1"), (0, ValueError, "capacity must be at least 1"),
    (2.5, TypeError, "capacity must be an int, not float"),
    (True, TypeError, "capacity must be an int, not bool"),
    ("4", TypeError, "capacity must be an int, not str"),
    (10 ** 12, ValueError, "capacity 1000000000000 needs at least .* GiB on cpu")])
def test_a_recorder_capacity_that_is_no_sane_count_is_refused_before_allocating(capacity, error,
                                                                                 message):
    with pytest.raises(error, match=message):
        twa.SubspaceRecorder(mlp(), capacity=capacity)


def test_a_recorder_state_of_another_model_is_refused_before_anything_changes():
    model, bigger = mlp(), mlp(hidden=12)
    recorder = twa.SubspaceRecorder(model, capacity=3)
    recorder.add(model)
    before = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
              for k, v in recorder.state_dict().items() if k != "builders"}
    other = twa.SubspaceRecorder(bigger, capacity=3)
    other.add(bigger)
    other.add(mlp(seed=2, hidden=12))
    for state in (other.state_dict(), {"names": []}, None):
        with pytest.raises(ValueError, match="the recorded state"):
            recorder.load_state_dict(state)
    assert recorder.names == before["names"]
    assert torch.equal(recorder.total, before["total"]) and torch.equal(recorder.anchor,
                                                                        before["anchor"])


def test_a_recorder_state_of_another_capacity_or_format_is_refused_before_anything_changes():
    model = mlp()
    recorder = twa.SubspaceRecorder(model, capacity=3)
    recorder.add(model)
    for other in (twa.SubspaceRecorder(model, capacity=4), twa.SubspaceRecorder(model, 3, bits=8)):
        other.add(mlp(seed=3))
        other.add(mlp(seed=4))
        with pytest.raises(ValueError, match="capacity|bits"):
            recorder.load_state_dict(other.state_dict())
        assert recorder.names == ["recorded #0"]


def test_a_recorder_state_round_trips():
    model = mlp()
    recorder = twa.SubspaceRecorder(model, capacity=3)
    recorder.add(model)
    recorder.add(mlp(seed=5))
    resumed = twa.SubspaceRecorder(model, capacity=3)
    resumed.load_state_dict(recorder.state_dict())
    assert torch.equal(resumed.subspace().mean, recorder.subspace().mean)


@pytest.mark.parametrize("option,value,error", [
    ("tol", "1e-5", TypeError), ("tol", float("nan"), ValueError), ("layer_size", "3", TypeError),
    ("layer_size", 2.5, TypeError), ("bits", 3, ValueError)])
def test_wrong_recorder_options_name_themselves(option, value, error):
    with pytest.raises(error, match=option if option != "bits" else "bits must be"):
        twa.SubspaceRecorder(mlp(), capacity=2, **{option: value})


@pytest.mark.parametrize("n,error", [(2.5, TypeError), (True, TypeError), (0, ValueError)])
def test_a_wrong_number_of_principal_components_is_refused(n, error):
    model, trainer = trained()
    with pytest.raises(error, match="n_components"):
        trainer.space.to_principal_components(n)


def test_a_recorder_state_whose_names_are_a_string_is_refused():
    model = mlp()
    recorder = twa.SubspaceRecorder(model, capacity=3)
    recorder.add(model)
    state = recorder.state_dict()
    state["names"] = "abc"  # list() of it would be three names
    with pytest.raises(ValueError, match="names are not a list of strings"):
        twa.SubspaceRecorder(model, capacity=3).load_state_dict(state)


def test_a_format_given_as_a_string_is_named_as_one():
    model = mlp()
    with pytest.raises(ValueError, match="bits must be 32, 16, 8 or 4, not '8'"):
        twa.Subspace.from_checkpoints(model, walk(model), bits="8")


# --- The subspace a TWA trains in is not rotated under it -----------------------------------------

@pytest.mark.parametrize("components", [1, 3])  # fewer directions, or the same ones rotated
def test_a_subspace_rotated_after_twa_is_refused_at_the_next_step(components):
    model, trainer = trained()
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
    trainer.space.to_principal_components(components)
    backward(model)
    with pytest.raises(RuntimeError, match="rotated .to_principal_components. after TWA"):
        trainer.step(opt)


# --- Gradients as loops leave them ----------------------------------------------------------------

def test_sparse_and_accumulated_gradients_train_as_dense_summed_ones():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    dense = copy.deepcopy(net)
    dense[0].sparse = False
    states, x = walk(net), torch.randint(0, 10, (6, 2))
    space = twa.Subspace.from_checkpoints(net, states)
    results = []
    for model, halves in ((net, True), (dense, False)):
        trainer = twa.TWA(model, space)
        opt = torch.optim.SGD(trainer.parameters(), lr=0.5)
        for batch in (x[:3], x[3:]) if halves else (x,):
            model(batch).sum().backward()  # accumulated over two backward passes, or one
        trainer.step(opt)
        results.append(trainer.trained.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)


# --- Where a basis is kept ------------------------------------------------------------------------

@pytest.mark.parametrize("device,message", [("gpu", "device 'gpu' is no device"),
                                            ("meta", "not 'meta'"), (3.5, "device 3.5 is no device")])
def test_a_device_that_holds_no_basis_is_named(device, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        twa.Subspace.from_checkpoints(model, walk(model), device=device)
    with pytest.raises(ValueError, match=message):
        twa.SubspaceRecorder(model, capacity=2, device=device)


def test_a_model_on_the_meta_device_is_named():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="parameters are on the meta device"):
        twa.SubspaceRecorder(model, capacity=2)


# --- Checkpoints and states as they come: duplicates, extra entries, older formats --------------

@pytest.mark.parametrize("bits, within", [(32, 1e-5), (16, 1e-2), (8, 3e-2)])
def test_a_duplicated_checkpoint_adds_no_direction_at_any_precision(bits, within):
    model = test_twa.mlp()
    states = random_walk(model, 8, step=0.01)
    states.insert(4, dict(states[2]))
    space = twa.Subspace.from_checkpoints(model, states, bits=bits)
    assert space.rank == 8  # 8 distinct checkpoints, one of them twice
    step = torch.randn(space.rank, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coordinates = space.mean_coords + 0.5 * step
    trainer = twa.TWA(model, space)
    trainer.move_to(coordinates)
    alpha = space.checkpoint_coefficients(trainer.coordinates)
    residual = twa.combination_residual(space, model, states, alpha)
    assert residual["relative"] < within, residual


def test_entries_beside_the_weights_are_left_alone(tmp_path):
    """A checkpoint that also holds an epoch counter or an optimizer's state gives the same basis
    as the weights alone."""
    model = mlp()
    states = walk(model, n=4)
    for i, state in enumerate(states):
        extra = {"epoch": torch.tensor(i), "optimizer": {"lr": torch.tensor(0.1)}} if i == 2 else {}
        torch.save({**state, **extra}, tmp_path / f"{i}.pt")
    files = twa.Subspace.from_checkpoints(model, [tmp_path / f"{i}.pt" for i in range(4)])
    plain = twa.Subspace.from_checkpoints(model, states)
    assert files.rank == plain.rank == 4
    start = plain.start_coordinates(2)
    assert torch.allclose(files.checkpoint_coefficients(start), plain.checkpoint_coefficients(start))


def test_project_refuses_a_sharded_basis_and_gradient_takes_any_dtype():
    model = test_twa.mlp()
    space = twa.Subspace.from_checkpoints(model, random_walk(model, 4))
    g = torch.randn(space.shard.dim)
    expected = space.gradient(g)
    assert torch.allclose(space.gradient(g.double()), expected)  # moved to the basis' dtype and device
    space.shard.world = 2  # as under torchrun: each process holds a part of every row
    with pytest.raises(RuntimeError, match="project_ needs the whole basis"):
        space.project_(g)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_a_recorder_state_without_its_rounding_still_resumes(bits):
    """A state that holds no per-row rounding (and, at 16 bits, rows in bfloat16) loads, with the
    rounding expected for its format (within 10% of the measured one at 8 and 4 bits)."""
    model = test_twa.mlp()
    recorder = twa.SubspaceRecorder(model, 8, bits=bits)
    for state in random_walk(model, 6, step=0.05):
        model.load_state_dict(state)
        recorder.add(model)
    saved = recorder.state_dict()
    measured = saved["builders"][0].pop("rounding")[:6].sqrt()
    if bits == 16:
        gain = recorder.builders[0].basis.gain
        saved["builders"][0]["data"] = (saved["builders"][0]["data"].float() / gain).bfloat16()
    again = twa.SubspaceRecorder(model, 8, bits=bits)
    again.load_state_dict(saved)
    expected = again.builders[0].basis.rounding[:6].sqrt()
    if bits == 16:  # bfloat16 rounds about 8 times more than the float16 it was converted to
        assert torch.all((expected > 5 * measured) & (expected < 12 * measured))
    else:
        assert torch.allclose(expected, measured, rtol=0.1)
    assert again.subspace().rank == recorder.subspace().rank
