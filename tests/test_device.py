"""The training steps on the device the scripts would pick: a GPU when there is one (bench/gpu.sh
selects these with -m cuda), else the CPU. On a GPU, torch's sync debug mode reports every
device-to-host synchronisation; on the CPU, the calls that would synchronise (.cpu, .item, .tolist,
.numpy; not bool() or float() of a tensor) are trapped instead."""
import contextlib
import types
import warnings

import pytest
import torch
from torch import nn

import loaders
import loop
import twa
import utils
from test_twa import random_walk

pytestmark = pytest.mark.cuda
DEVICE = utils.pick_device("auto")


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Raise on a device-to-host synchronisation (GPU), or record the calls that would cause one
    (CPU); yields the list of recorded calls."""
    if DEVICE.type == "cuda":  # each synchronisation is a warning, recorded
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield caught
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    calls = []
    with monkeypatch.context() as patch:
        for name in ("cpu", "item", "tolist", "numpy"):
            original = getattr(torch.Tensor, name)

            def recorded(self, *args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(self, *args, **kwargs)
            patch.setattr(torch.Tensor, name, recorded)
        yield calls


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(8, 4)).to(DEVICE)


def batches(n=6, size=16, batch_size=None):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n * size, 3, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 4, (n * size,), generator=gen)
    return loaders.TensorLoader(images.to(DEVICE), labels.to(DEVICE), batch_size or size, (0.5,) * 3,
                                (0.25,) * 3, augment=True, shuffle=True)


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_sgd_and_twa_epochs_read_nothing_back_between_log_points(monkeypatch, bits):
    """Six steps with the log (and its one read of the summed loss) at the sixth only: the steps
    themselves, SGD or TWA at any storage precision, never wait for the device."""
    model = small_cnn()
    space = twa.Subspace.from_checkpoints(model, random_walk(model, 5, step=0.05), bits=bits,
                                          device=DEVICE)
    trainer = twa.TWA(model, space)
    twa_opt = torch.optim.SGD(trainer.parameters(), lr=0.1, momentum=0.9)
    sgd_model = small_cnn()
    sgd_opt = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)

    def sgd_update(lr):
        loop.set_lr(sgd_opt, lr)
        sgd_opt.step()
        sgd_opt.zero_grad(set_to_none=True)

    def twa_update(lr):
        loop.set_lr(twa_opt, lr)
        trainer.step(twa_opt)
    loader = batches()
    args = loop.LoopSettings(epochs=2, lr=0.05, print_freq=100)
    ctx = types.SimpleNamespace(world=1, rank=0, device=DEVICE, is_main=True)
    for net, update in ((sgd_model, sgd_update), (model, twa_update)):
        step = loop.make_step(net, update, args, ctx)
        # one epoch first: the optimizers' lazy state; then every step but the log's read is traced
        loop.train_epoch(net, step, loader, 0, lambda b: 0.05, args, ctx)
        reads = []
        with no_host_sync(monkeypatch) as calls:
            loop.train_epoch(net, step, loader, 1, lambda b: 0.05, args, ctx,
                             after_step=lambda batch, totals: reads.append(len(calls)) and False)
        assert reads[:-1] == [0] * (len(loader) - 1), reads  # the last step logs, and reads


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_a_low_bit_basis_projects_as_its_values_in_float64(bits, monkeypatch):
    """The blocked low-bit products (small blocks here, so that several are walked) against the
    stored values multiplied in float64, on the device."""
    monkeypatch.setattr(twa.storage, "CHUNK", 512)
    monkeypatch.setattr(twa.storage, "DEVICE_CHUNK", 512)
    basis = twa.storage.empty_basis(7, 3000, bits, DEVICE)
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(7, 3000, generator=gen) / 3000 ** 0.5).to(DEVICE)
    for row in rows:
        basis.append(row)
    values = basis.as_float32(0, 3000).double()
    # what reading back gives differs from what was stored by the rounding that storing measured
    assert torch.allclose((values - rows.double()).square().sum(1), basis.rounding, rtol=1e-3)
    g = torch.randn(3000, generator=gen).to(DEVICE)
    assert torch.allclose(basis.matvec(g), values @ g.double(), rtol=1e-5, atol=1e-6)
    c = torch.randn(7, generator=gen, dtype=torch.float64).to(DEVICE)
    out = basis.rmatvec(c, torch.empty(3000, device=DEVICE))
    assert torch.allclose(out.double(), values.t() @ c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_the_compiled_low_bit_products_equal_the_blocked_ones(bits):
    """The fused kernels (torch.compile; used from FUSED_MIN_COLUMNS columns on) against the blocked
    products and the stored values in float64, on a width that is no whole number of quantisation
    groups, both forms of rmatvec, and a second row count (a second shape for the kernels)."""
    gen = torch.Generator().manual_seed(0)
    basis = twa.storage.empty_basis(7, 3001, bits, DEVICE)
    for row in (torch.randn(7, 3001, generator=gen) / 3001 ** 0.5).to(DEVICE):
        basis.append(row)
    g = torch.randn(3001, generator=gen).to(DEVICE)
    c = torch.randn(7, generator=gen, dtype=torch.float64).to(DEVICE)
    start = torch.randn(3001, generator=gen).to(DEVICE)
    for rows in (7, 4):
        basis.rows = rows
        values = basis.as_float32(0, 3001).double()
        products = {}
        for fused in (True, False):
            basis.fused = fused
            products[fused] = (basis.matvec(g), basis.rmatvec(c[:rows], start.clone()),
                               basis.rmatvec(c[:rows], start.clone(), accumulate=True, alpha=-0.5))
        assert basis.fused is False  # not switched off by a failure: the kernels did run
        expected = (values @ g.double(), values.t() @ c[:rows],
                    start.double() - 0.5 * values.t() @ c[:rows])
        for got_fused, got_blocked, want in zip(products[True], products[False], expected):
            assert torch.allclose(got_fused.double(), want, rtol=1e-5, atol=1e-6)
            assert torch.allclose(got_fused.double(), got_blocked.double(), rtol=1e-5, atol=1e-6)


def test_a_basis_falls_back_to_blocked_products_where_compiling_fails(monkeypatch, caplog):
    """No C++ compiler (or no Triton): one warning, then the blocked products, with the same result."""
    def fail(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(fail, RuntimeError("no compiler"), None)
    monkeypatch.setattr(twa.kernels, "compiled", lambda kernel: fail)
    basis = twa.storage.empty_basis(3, 3000, 8, DEVICE)
    for row in torch.randn(3, 3000).to(DEVICE):
        basis.append(row)
    basis.fused = True
    g = torch.randn(3000).to(DEVICE)
    product = basis.matvec(g)
    assert basis.fused is False and "using blocked ones" in caplog.text
    values = basis.as_float32(0, 3000).double()  # the stored values, their product in float64
    # a float32 sum of 3,000 terms rounds by at most 3,000 u times the sum of their magnitudes
    bound = 3000 * 2.0 ** -24 * (values.abs() @ g.double().abs())
    assert ((product.double() - values @ g.double()).abs() <= bound).all()


def test_a_resumed_optimizer_keeps_the_rate_as_a_tensor_on_the_device():
    """A state saved without --compile (a float rate) resumed with it: the rate stays a tensor on
    the device (a float would retrace the compiled step at every new value), and the other way."""
    param = nn.Parameter(torch.zeros(3, device=DEVICE))
    for saved_compile, resumed_compile in ((False, True), (True, False)):
        saved = loop.LoopSettings(epochs=1, lr=0.1, compile=saved_compile)
        state = torch.optim.SGD([param], lr=loop.learning_rate(saved, DEVICE), momentum=0.9).state_dict()
        resumed = loop.LoopSettings(epochs=1, lr=0.1, compile=resumed_compile)
        optimizer = torch.optim.SGD([param], lr=loop.learning_rate(resumed, DEVICE), momentum=0.9)
        loop.load_optimizer(optimizer, state, resumed, DEVICE)
        lr = optimizer.param_groups[0]["lr"]
        assert torch.is_tensor(lr) == resumed_compile
        assert not resumed_compile or lr.device == param.device
        loop.set_lr(optimizer, 0.05)
        assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.05)


def test_dropout_resumes_exactly_from_the_saved_random_state():
    """What --resume restores (utils.rng_state: the CPU generator and, on a GPU, its own) gives the
    same dropout masks as a run that never stopped."""
    model = small_cnn().train()
    x = torch.randn(16, 3, 8, 8, device=DEVICE)
    ctx = types.SimpleNamespace(world=1, rank=0, device=DEVICE)
    utils.seed_everything(5)
    model(x)
    saved = utils.all_rng_states(ctx)
    expected = model(x)
    model(x)  # the run goes on, then resumes from the saved state
    utils.restore_rng(saved, ctx)
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("subspace,graphs", [(False, False), (True, False), (True, True)])
def test_a_compiled_step_trains_as_the_eager_one(subspace, graphs, monkeypatch):
    """--compile: forward, backward, the projection and the optimizer compiled as one step, the rate
    changing every step (a tensor, so no retrace): the same weights as eager to 1e-5 after two
    epochs. With --cuda-graphs (captured on a GPU; on the CPU the same compiled path without the
    capture) the buffers are marked static and the shapes kept: the last batch is smaller here.
    (No dropout: compiled code draws its masks from its own generator.) The subspace with graphs
    is stored in 8 bits and multiplies through the fused kernels, traced into the step."""
    monkeypatch.setattr(twa.storage, "FUSED_MIN_COLUMNS", 0)
    weights = []
    for compiled in (False, True):
        model = small_cnn()
        model[5].p = 0.0
        args = loop.LoopSettings(epochs=2, lr=0.1, print_freq=100, compile=compiled,
                                 cuda_graphs=compiled and graphs)
        ctx = types.SimpleNamespace(world=1, rank=0, device=DEVICE, is_main=True)
        if subspace:
            trainer = twa.TWA(model, twa.Subspace.from_checkpoints(
                model, random_walk(model, 5, 0.05), bits=8 if graphs else 32, device=DEVICE))
            for tensor in trainer.tensors() if args.cuda_graphs else ():
                torch._dynamo.mark_static_address(tensor)
            optimizer = torch.optim.SGD(trainer.parameters(), lr=loop.learning_rate(args, DEVICE),
                                        momentum=0.9)

            def update(lr):
                loop.set_lr(optimizer, lr)
                trainer.step(optimizer)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=loop.learning_rate(args, DEVICE),
                                        momentum=0.9)

            def update(lr):
                loop.set_lr(optimizer, lr)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        step = loop.make_step(model, update, args, ctx)
        loader = batches(batch_size=20 if graphs else None)  # 96 images: 4 x 20, then 16
        for epoch in range(2):
            loader.set_epoch(epoch)
            loop.train_epoch(model, step, loader, epoch, lambda b: 0.1 / (1 + b), args, ctx)
        weights.append(torch.nn.utils.parameters_to_vector(model.parameters()).double())
    assert (weights[0] - weights[1]).norm() <= 1e-5 * weights[0].norm()
