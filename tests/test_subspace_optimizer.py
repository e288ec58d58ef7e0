"""twa.SubspaceOptimizer: TWA in the shape of a torch optimizer, for loops, trainers, schedulers."""
import io

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import twa
from test_twa import mlp, random_walk

HYPER = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)


def space_of(model, n=6):
    return twa.Subspace.from_checkpoints(model, random_walk(model, n, step=0.05))


def batches(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen))
            for _ in range(steps)]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def run(model, opt, data, sched=None, closure=False):
    """A plain loop, as a trainer writes it: zero_grad, backward, step, then the scheduler."""
    for batch in data:
        if closure:
            def evaluate(batch=batch):
                opt.zero_grad()
                loss = loss_of(model, batch)
                loss.backward()
                return loss
            opt.step(evaluate)
        else:
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
        if sched is not None:
            sched.step()


def weights(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def twa_route(steps, scheduler=None, train="coordinates"):
    """twa.TWA + trainer.step, the library's loop, for the same data and seeds."""
    model = mlp()
    trainer = twa.TWA(model, space_of(model), train=train)
    opt = torch.optim.SGD(trainer.parameters(), **HYPER)
    sched = scheduler(opt) if scheduler else None
    for batch in batches(steps):
        loss_of(model, batch).backward()
        trainer.step(opt)
        if sched is not None:
            sched.step()
    return weights(model), trainer.coordinates.detach().clone()


def optimizer_route(steps, scheduler=None, closure=False, train="coordinates"):
    model = mlp()
    opt = twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, train=train, **HYPER)
    run(model, opt, batches(steps), scheduler(opt) if scheduler else None, closure)
    return weights(model), opt.coordinates.detach().clone()


@pytest.mark.parametrize("train", ["coordinates", "alpha"])
@pytest.mark.parametrize("closure", [False, True])
def test_the_optimizer_in_a_plain_loop_takes_the_steps_of_twa_and_trainer_step(train, closure):
    w_ref, c_ref = twa_route(12, train=train)
    w, c = optimizer_route(12, closure=closure, train=train)
    assert not torch.equal(w_ref, weights(mlp()))  # it trained
    assert torch.equal(w, w_ref) and torch.equal(c, c_ref)  # the same code path: the same floats


def test_it_is_a_torch_optimizer_whose_groups_are_the_inner_optimizers():
    model = mlp()
    opt = twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, **HYPER)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    assert opt.defaults is opt.inner.defaults
    assert opt.param_groups[0]["params"] == opt.twa.parameters()
    assert all(callable(getattr(opt, name)) for name in ("step", "zero_grad", "state_dict",
                                                         "load_state_dict"))


@pytest.mark.parametrize("scheduler", [
    lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.1),
    lambda o: lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)),
    lambda o: lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=12),
    lambda o: lr_scheduler.SequentialLR(o, [lr_scheduler.LinearLR(o, 0.1, total_iters=4),
                                            lr_scheduler.CosineAnnealingLR(o, 8)], milestones=[4])],
    ids=["StepLR", "LambdaLR", "OneCycleLR", "SequentialLR"])
def test_an_lr_scheduler_on_it_sets_the_lr_its_steps_use(scheduler):
    w_ref, c_ref = twa_route(12, scheduler)  # the same scheduler on the inner optimizer
    w, c = optimizer_route(12, scheduler)
    assert torch.equal(w, w_ref) and torch.equal(c, c_ref)
    assert not torch.equal(w, optimizer_route(12)[0])  # the schedule changed the steps


def test_a_wrapper_that_imitates_its_class_as_lightning_does_reads_its_groups_and_state():
    """LightningOptimizer makes itself an instance of a subclass of the optimizer's class and
    forwards the attributes it lacks; the properties must work through such a wrapper."""
    class Wrapper:
        def __init__(self, optimizer):
            self._optimizer = optimizer
            self.__class__ = type("Wrapped", (Wrapper, type(optimizer)), {})

        def __getattr__(self, name):
            return getattr(self._optimizer, name)

    model = mlp()
    opt = twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, **HYPER)
    wrapped = Wrapper(opt)
    assert isinstance(wrapped, torch.optim.Optimizer) and wrapped.param_groups is opt.param_groups
    loss_of(model, batches(1)[0]).backward()
    wrapped.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("closure", [False, True])
def test_a_run_stopped_and_resumed_from_its_state_dicts_equals_an_uninterrupted_one(closure):
    def scheduler(o):
        return lr_scheduler.StepLR(o, step_size=4, gamma=0.5)
    data = batches(12)
    model = mlp()
    space = space_of(model)
    opt = twa.SubspaceOptimizer(model, space, torch.optim.SGD, **HYPER)
    run(model, opt, data, scheduler(opt), closure)

    first = mlp()
    opt = twa.SubspaceOptimizer(first, space, torch.optim.SGD, **HYPER)
    sched = scheduler(opt)
    run(first, opt, data[:5], sched, closure)
    saved = io.BytesIO()  # through a file, as trainers save it, loadable with weights_only
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, saved)
    saved.seek(0)
    saved = torch.load(saved, weights_only=True)

    resumed = mlp(seed=1)  # other weights: the optimizer's state writes the trained ones
    opt = twa.SubspaceOptimizer(resumed, space, torch.optim.SGD, **HYPER)
    sched = scheduler(opt)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    run(resumed, opt, data[5:], sched, closure)
    assert torch.equal(weights(resumed), weights(model))


def test_a_closure_is_evaluated_at_the_weights_of_the_coordinates_lbfgs_tries():
    model = mlp()
    space = space_of(model)
    opt = twa.SubspaceOptimizer(model, space, torch.optim.LBFGS, lr=0.5, max_iter=5,
                                line_search_fn="strong_wolfe")
    batch, losses = batches(1)[0], []

    def evaluate():
        expected = space.weights(opt.coordinates, torch.empty_like(space.mean))
        assert torch.equal(weights(model), expected)  # where the inner optimizer stands now
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        losses.append(loss.item())
        return loss
    opt.step(evaluate)
    assert len(losses) > 2 and min(losses) < losses[0]


def test_an_optimizer_that_needs_a_closure_is_refused_without_one():
    model = mlp()
    opt = twa.SubspaceOptimizer(model, space_of(model), torch.optim.LBFGS)
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(ValueError, match="LBFGS.step needs a closure"):
        opt.step()


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD(mlp().parameters(), lr=1), "SGD",
                                             nn.Linear, None])
def test_an_inner_class_that_is_no_optimizer_is_refused_before_the_model_changes(optimizer_class):
    model = mlp()
    before = weights(model)
    with pytest.raises(TypeError, match="optimizer_class must be a torch.optim.Optimizer class"):
        twa.SubspaceOptimizer(model, space_of(model), optimizer_class, lr=1)
    assert torch.equal(weights(model), before)


def test_wrong_options_are_the_inner_optimizers_error_before_the_model_changes():
    model = mlp()
    before = weights(model)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, lr=-1)
    with pytest.raises(TypeError, match="betas"):
        twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, lr=1, betas=(0.9, 0.99))
    # torch's SGD takes these, and every weight would become NaN
    for options in ({"lr": float("nan")}, {"lr": 1, "momentum": float("inf")},
                    {"lr": 1, "weight_decay": float("nan")}):
        with pytest.raises(ValueError, match="must be a finite number"):
            twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, **options)
    assert torch.equal(weights(model), before)


def test_a_model_that_is_not_the_subspaces_is_refused_by_twa_checks():
    with pytest.raises(ValueError, match="trainable parameters, the subspace"):
        twa.SubspaceOptimizer(nn.Linear(3, 2), space_of(mlp()), torch.optim.SGD, lr=1)
    with pytest.raises(TypeError, match="space must be a twa.Subspace"):
        twa.SubspaceOptimizer(mlp(), "space", torch.optim.SGD, lr=1)


def test_a_state_dict_of_another_kind_is_refused_before_anything_changes():
    model = mlp()
    space = space_of(model)
    opt = twa.SubspaceOptimizer(model, space, torch.optim.SGD, **HYPER)
    run(model, opt, batches(2))
    alpha_state = twa.SubspaceOptimizer(mlp(), space, torch.optim.SGD, train="alpha",
                                        **HYPER).state_dict()
    before, lr = weights(model), opt.param_groups[0]["lr"]
    plain = torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict()
    for wrong, message in ((plain, "not a SubspaceOptimizer state_dict"),
                           (alpha_state, "the state_dict trained 'alpha'")):
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(wrong)
    shorter = {**opt.state_dict(), "twa": {"train": "coordinates", "trained": torch.zeros(2)}}
    shorter["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match="of shape"):
        opt.load_state_dict(shorter)
    assert torch.equal(weights(model), before) and opt.param_groups[0]["lr"] == lr


def test_other_parameters_cannot_join_it_and_it_cannot_be_copied():
    model = mlp()
    opt = twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, **HYPER)
    with pytest.raises(ValueError, match="trains the subspace's coordinates as one group"):
        opt.add_param_group({"params": list(model.parameters())})
    with pytest.raises(TypeError, match="save its state_dict"):
        torch.save(opt, io.BytesIO())


def test_zero_grad_without_set_to_none_zeroes_the_models_gradients_in_place():
    model = mlp()
    opt = twa.SubspaceOptimizer(model, space_of(model), torch.optim.SGD, **HYPER)
    run(model, opt, batches(1))  # the gradients are now views of TWA's flat buffer
    loss_of(model, batches(1, seed=1)[0]).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
