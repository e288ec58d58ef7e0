"""Hugging Face: checkpoints read as they are (safetensors files, Trainer and save_pretrained folders,
sharded), a tensor at a time; the span recorded during Trainer.train(); the TWA phase through the
same Trainer. Tiny ViTs built from a config (no downloads) on synthetic images."""
import copy
import glob
import json
import os
import re
import subprocess
import sys
import weakref

import pytest
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import Trainer, TrainingArguments

import twa
import twa.hf
from conftest import ROOT

VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=64, num_labels=3)


def vit(seed=0):
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VIT))


def resnet(seed=0):
    """A model with BatchNorm."""
    torch.manual_seed(seed)
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))


def images(n=48, seed=0):
    """Examples whose class shifts the pixels (learnable), as the Trainer's dataset takes them."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    pixels = torch.randn(n, 3, 32, 32, generator=gen) + labels[:, None, None, None].float()
    return [{"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(n)]


def arguments(out, **overrides):
    """Batches of 8 in the dataset's order (6 optimizer steps an epoch), nothing saved unless asked."""
    settings = dict(use_cpu=True, report_to="none", per_device_train_batch_size=8,
                    num_train_epochs=2, learning_rate=1e-3, train_sampling_strategy="sequential",
                    logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=0)
    return TrainingArguments(str(out), **{**settings, **overrides})


def batches(data, size=8):
    return [transformers.default_data_collator(data[i:i + size]) for i in range(0, len(data), size)]


def folders(out):
    """The Trainer's checkpoint folders, in the order of their steps."""
    return sorted(glob.glob(os.path.join(out, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))


def loaded_state(folder):
    """A checkpoint as transformers itself reads it back: the model's state_dict in memory."""
    return transformers.ViTForImageClassification.from_pretrained(folder).state_dict()


def assert_same_subspace(a, b):
    assert a.rank == b.rank == len(a.names) and len(a.names) == len(b.names)
    assert torch.equal(a.mean, b.mean)
    assert torch.equal(a.blocks[0].basis.as_float32(0, a.rank), b.blocks[0].basis.as_float32(0, b.rank))
    assert torch.equal(a.blocks[0].checkpoint_coords, b.blocks[0].checkpoint_coords)


def trained(model, space, data, steps=4):
    """Weights and alphas after SubspaceOptimizer steps on the first batches of `data`."""
    model = copy.deepcopy(model)
    opt = twa.SubspaceOptimizer(model, space, torch.optim.SGD, lr=0.05, momentum=0.9,
                                weight_decay=1e-4)
    for batch in batches(data)[:steps]:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    weights = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return weights, space.checkpoint_coefficients(opt.coordinates)


class CountingReader:
    """safetensors.safe_open, counting the tensors that get_tensor handed out and that are still
    alive: their peak is what a build held of a checkpoint at once."""

    def __init__(self, real):
        self.real, self.reads, self.alive, self.peak = real, 0, 0, 0

    def __call__(self, *args, **kwargs):
        reader, handle = self, self.real(*args, **kwargs)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                tensor = handle.get_tensor(name)
                reader.reads += 1
                reader.alive += 1
                reader.peak = max(reader.peak, reader.alive)
                weakref.finalize(tensor, reader.died)
                return tensor
        return Handle()

    def died(self):
        self.alive -= 1


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """A Trainer run that saved checkpoint-3 ... checkpoint-12 (model.safetensors, optimizer.pt,
    trainer_state.json...)."""
    out = tmp_path_factory.mktemp("hf-sgd")
    Trainer(model=vit(), args=arguments(out, save_strategy="steps", save_steps=3),
            train_dataset=images()).train()
    return str(out)


def test_trainer_checkpoints_give_the_subspace_of_their_state_dicts(sgd_run, tmp_path):
    paths = folders(sgd_run)
    assert len(paths) == 4 and {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= \
        set(os.listdir(paths[0]))
    model, data = vit(), images()
    from_folders = twa.Subspace.from_checkpoints(model, twa.hf.checkpoints(model, paths))
    in_memory = twa.Subspace.from_checkpoints(model, [loaded_state(p) for p in paths])
    assert_same_subspace(from_folders, in_memory)
    (w_files, a_files), (w_memory, a_memory) = (trained(model, s, data) for s in (from_folders,
                                                                                  in_memory))
    assert (w_files - w_memory).abs().max() <= 1e-6 and (a_files - a_memory).abs().max() <= 1e-6
    assert (w_files - from_folders.mean).norm() > 1e-3  # the steps moved the weights
    # the same weights as save_pretrained shards them (model.safetensors.index.json + shards)
    sharded = []
    for i, path in enumerate(paths):
        transformers.ViTForImageClassification.from_pretrained(path).save_pretrained(
            tmp_path / f"sharded{i}", max_shard_size="20KB")
        sharded.append(str(tmp_path / f"sharded{i}"))
    assert len(glob.glob(os.path.join(sharded[0], "model-*-of-*.safetensors"))) > 2
    assert os.path.isfile(os.path.join(sharded[0], "model.safetensors.index.json"))
    assert_same_subspace(twa.Subspace.from_checkpoints(model, twa.hf.checkpoints(model, sharded)),
                         in_memory)
    alpha = torch.full((1, 4), 0.25, dtype=torch.float64)  # the mean, streamed once more
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(in_memory.mean, model.parameters())
    residual = twa.combination_residual(in_memory, model, twa.hf.checkpoints(model, sharded), alpha)
    assert residual["miss"] <= 1e-5


def test_safetensors_files_read_as_state_dicts_do(tmp_path, monkeypatch):
    """A model whose names are its saved names (no renaming) reads plain .safetensors files:
    prefixes stripped without reading a tensor, bf16 converted to float32; wrong files give
    today's errors."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    states = []
    for i in range(3):
        torch.manual_seed(i + 1)
        states.append({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        safetensors.torch.save_file({f"module.{k}": v for k, v in states[-1].items()},
                                    tmp_path / f"{i}.safetensors")
    files = [str(tmp_path / f"{i}.safetensors") for i in range(3)]
    counter = CountingReader(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", counter)
    assert_same_subspace(twa.Subspace.from_checkpoints(model, files),
                         twa.Subspace.from_checkpoints(model, states))
    assert counter.reads == 2 * 3 * 4 and counter.peak == 1  # each tensor once a pass, no more
    halves = [{k: v.bfloat16() for k, v in s.items()} for s in states]
    for i, state in enumerate(halves):
        safetensors.torch.save_file(state, tmp_path / f"bf16-{i}.safetensors")
    got = twa.Subspace.from_checkpoints(model, [str(tmp_path / f"bf16-{i}.safetensors")
                                                for i in range(3)])
    assert torch.equal(got.mean, twa.Subspace.from_checkpoints(model, halves).mean)
    bad = {"ints": {**states[0], "0.weight": torch.ones(5, 6, dtype=torch.int64)},
           "nan": {**states[0], "2.bias": torch.tensor([0.0, float("nan"), 0.0])},
           "shape": {**states[0], "2.bias": torch.zeros(4)},
           "missing": {k: v for k, v in states[0].items() if k != "2.bias"}}
    expected = {"ints": "'0.weight' holds torch.int64 values, not floating-point",
                "nan": "'2.bias' holds NaN or Inf", "shape": "'2.bias' has shape \\(4,\\)",
                "missing": "has no '2.bias'"}
    for name, state in bad.items():
        safetensors.torch.save_file(state, tmp_path / f"{name}.safetensors")
        with pytest.raises(twa.CheckpointError, match=f"{name}.safetensors.*{expected[name]}"):
            twa.Subspace.from_checkpoints(model, [files[0], str(tmp_path / f"{name}.safetensors")])


def test_a_build_holds_one_tensor_of_a_checkpoint_at_a_time(sgd_run, monkeypatch):
    counter = CountingReader(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", counter)
    model = vit()
    sources = twa.hf.checkpoints(model, folders(sgd_run))
    tensors = len(sources[0])
    space = twa.Subspace.from_checkpoints(model, sources)
    assert space.rank == 4
    assert counter.reads == 2 * 4 * tensors  # every tensor of every checkpoint, in each pass
    assert counter.peak == 1 and counter.alive == 0
    held = dict(sources[0])  # the counter would see a whole checkpoint held at once
    assert counter.peak == tensors == len(held)


def corrupt_copies(source_file, tmp_path):
    """(file, what its error says) for damaged copies of a safetensors file."""
    raw = open(source_file, "rb").read()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] -= 4  # no longer the tensor's size: safetensors' own check
    text = json.dumps(header, separators=(",", ":")).encode()
    shifted = raw[:8] + text + b" " * (length - len(text)) + raw[8 + length:]
    cases = {"cut": (raw[:-10], "truncated \\('.*' ends at byte"),
             "tiny": (raw[:5], "truncated or corrupt \\(5 bytes: no safetensors header"),
             "header": (raw[:40], "truncated or corrupt \\(a header of"),
             "garbage": (raw[:8] + b"\xff" * length + raw[8 + length:], "header is no JSON"),
             "offsets": (shifted, "truncated or corrupt \\(SafetensorError")}
    made = []
    for case, (data, message) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(data)
        made.append((str(path), message))
    return made


def test_damaged_files_and_shard_indexes_are_one_line_errors_before_any_read(sgd_run, tmp_path,
                                                                              monkeypatch):
    counter = CountingReader(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", counter)
    model, good = vit(), folders(sgd_run)
    damaged = corrupt_copies(os.path.join(good[0], "model.safetensors"), tmp_path)
    sharded = tmp_path / "sharded"
    transformers.ViTForImageClassification.from_pretrained(good[0]).save_pretrained(
        sharded, max_shard_size="20KB")
    shards = sorted(glob.glob(str(sharded / "model-*.safetensors")))
    index = sharded / "model.safetensors.index.json"
    saved_index = index.read_text()
    os.rename(shards[1], shards[1] + ".away")
    damaged.append((str(sharded), f"lacks its shard file {os.path.basename(shards[1])}"))
    for path, message in damaged:
        for call in (lambda: twa.checkpoints.check_readable(path),
                     lambda: twa.Subspace.from_checkpoints(model, [good[0], good[1], path]),
                     lambda: twa.hf.checkpoints(model, [path])):
            with pytest.raises(twa.CheckpointError, match=message) as err:
                call()
            assert path in str(err.value) and "\n" not in str(err.value)
    assert counter.reads == 0  # refused before the first tensor of the good ones was read
    os.rename(shards[1] + ".away", shards[1])
    whole = open(shards[1], "rb").read()
    open(shards[1], "wb").write(whole[:-8])
    with pytest.raises(twa.CheckpointError, match=f"{shards[1]} is truncated"):
        twa.checkpoints.check_readable(str(sharded))
    open(shards[1], "wb").write(whole)
    index.write_text(saved_index[:-20])
    with pytest.raises(twa.CheckpointError, match="unreadable model.safetensors.index.json"):
        twa.checkpoints.check_readable(str(sharded))
    weight_map = json.loads(saved_index)
    moved = next(iter(weight_map["weight_map"]))
    weight_map["weight_map"][moved] = os.path.basename(shards[-1]) if \
        weight_map["weight_map"][moved] != os.path.basename(shards[-1]) else os.path.basename(shards[0])
    index.write_text(json.dumps(weight_map))
    with pytest.raises(twa.CheckpointError, match=f"places '{moved}' in .*, which does not hold it"):
        twa.checkpoints.check_readable(str(sharded))


def test_the_recorded_span_is_the_span_of_the_saved_checkpoints(tmp_path):
    recorder = twa.hf.SpanRecorder(every_steps=3, start_step=3)
    Trainer(model=vit(), args=arguments(tmp_path, save_strategy="steps", save_steps=3),
            train_dataset=images(), callbacks=[recorder]).train()
    assert recorder.steps == [3, 6, 9, 12]  # epoch ends (6, 12) among them, recorded once
    model = vit()
    files = twa.Subspace.from_checkpoints(model, twa.hf.checkpoints(model, folders(tmp_path)))
    assert_same_subspace(recorder.subspace(), files)


def test_recording_resumes_with_the_trainer(tmp_path):
    """Stopped after checkpoint-6 and resumed from it, the recorded span is the whole run's. (A
    ResNet: transformers 5.25's Trainer resumes a ViT without the layers it saved under older
    names, warning of missing keys.)"""
    class StopAt6(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    whole = twa.hf.SpanRecorder(every_steps=3)
    Trainer(model=resnet(), args=arguments(tmp_path / "whole"), train_dataset=images(),
            callbacks=[whole]).train()
    out = tmp_path / "resumed"
    first = twa.hf.SpanRecorder(every_steps=3)
    Trainer(model=resnet(), args=arguments(out, save_strategy="steps", save_steps=3),
            train_dataset=images(), callbacks=[first, StopAt6()]).train()
    assert first.steps == [0, 3, 6] and os.path.isfile(out / "checkpoint-6" / "twa_span.pt")
    resumed = twa.hf.SpanRecorder(every_steps=3)
    Trainer(model=resnet(), args=arguments(out, save_strategy="steps", save_steps=3),
            train_dataset=images(), callbacks=[resumed]).train(resume_from_checkpoint=True)
    assert resumed.steps == whole.steps == [0, 3, 6, 9, 12]
    a, b = resumed.subspace(), whole.subspace()
    assert (a.mean - b.mean).abs().max() <= 1e-6
    assert (a.blocks[0].checkpoint_coords - b.blocks[0].checkpoint_coords).abs().max() <= 1e-5


def test_the_twa_phase_through_the_trainer_is_the_plain_loop(tmp_path):
    data, recorder = images(), twa.hf.SpanRecorder(every_steps=2, start_step=4)
    trainer = Trainer(model=vit(), args=arguments(tmp_path), train_dataset=data,
                      callbacks=[recorder])
    trainer.train()
    space = recorder.subspace()
    plain = copy.deepcopy(trainer.model)
    args = trainer.args
    result = twa.hf.train_twa(trainer, space, epochs=2, lr=0.3, weight_decay=1e-4)
    assert trainer.args is args and trainer.optimizer is None and result.output.global_step == 12
    # the same steps by hand: SubspaceOptimizer, clipping at max_grad_norm 1, linear decay
    opt = twa.SubspaceOptimizer(plain, space, torch.optim.SGD, lr=0.3, momentum=0.9,
                                weight_decay=1e-4)
    schedule = transformers.get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=12)
    plain.train()
    for batch in batches(data) * 2:
        plain(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        schedule.step()
        plain.zero_grad()
    weights = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach()
    expected = torch.nn.utils.parameters_to_vector(plain.parameters()).detach()
    assert (weights - expected).abs().max() <= 1e-6
    assert (result.alpha - space.checkpoint_coefficients(opt.coordinates)).abs().max() <= 1e-6
    assert (weights - space.mean).norm() > 1e-2  # the steps happened through accelerate's wrapper
    assert space.relative_residual(weights) <= 1e-5  # and the weights stayed in the span


def test_the_twa_phase_over_checkpoint_folders_recomputes_batch_norm(tmp_path):
    data = images()
    trainer = Trainer(model=resnet(), args=arguments(tmp_path, save_strategy="steps", save_steps=3),
                      train_dataset=data)
    trainer.train()
    result = twa.hf.train_twa(trainer, folders(tmp_path), epochs=1, lr=0.1)
    model = trainer.model
    assert result.alpha.shape == (1, 4) and twa.combination_residual(
        result.space, model, twa.hf.checkpoints(model, folders(tmp_path)),
        result.alpha)["relative"] <= 1e-4  # sum_i alpha_i w_i = the weights
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    got = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]

    class Images(torch.nn.Module):  # update_bn's model takes the input tensor alone
        def forward(self, x):
            return model(pixel_values=x)
    torch.optim.swa_utils.update_bn([b["pixel_values"] for b in batches(data)], Images())
    for (mean, var), m in zip(got, layers):
        assert torch.allclose(mean, m.running_mean, atol=1e-6) and \
            torch.allclose(var, m.running_var, atol=1e-6)


def test_bad_use_is_one_error_before_anything_changes(sgd_run, tmp_path):
    data = images()
    trainer = Trainer(model=vit(), args=arguments(tmp_path), train_dataset=data)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    paths = folders(sgd_run)
    with pytest.raises(ValueError, match="at least two checkpoints, not 1"):
        twa.hf.train_twa(trainer, paths[:1], epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="no checkpoints given|at least two"):
        twa.hf.train_twa(trainer, [], epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of"):
        twa.hf.train_twa(trainer, paths, epochs=1, lr=0.1, lr_scheduler_type="steps")
    with pytest.raises(ValueError, match="epochs must be a number > 0"):
        twa.hf.train_twa(trainer, paths, epochs=0, lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        twa.hf.train_twa(trainer, paths, epochs=1, lr=-1.0)
    with pytest.raises(ValueError, match="lr must be a finite number, not nan"):
        twa.hf.train_twa(trainer, paths, epochs=1, lr=float("nan"))
    with pytest.raises(ValueError, match="nothing recorded"):
        twa.hf.train_twa(trainer, twa.hf.SpanRecorder(), epochs=1, lr=0.1)
    one = twa.hf.SpanRecorder(every_steps=100, at_epoch_end=False)  # records step 0 alone
    Trainer(model=vit(), args=arguments(tmp_path / "one"), train_dataset=data,
            callbacks=[one]).train()
    with pytest.raises(ValueError, match="at least two snapshots, the subspace has 1"):
        twa.hf.train_twa(trainer, one, epochs=1, lr=0.1)
    fp16 = Trainer(model=vit(), args=arguments(tmp_path, fp16=True), train_dataset=data)
    with pytest.raises(ValueError, match="cannot run with fp16"):
        twa.hf.train_twa(fp16, paths, epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="without model_init"):
        twa.hf.train_twa(Trainer(model_init=lambda: vit(), args=arguments(tmp_path),
                                 train_dataset=data),
                         paths, epochs=1, lr=0.1)
    half = Trainer(model=vit().to(torch.bfloat16), args=arguments(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="float32 trainable parameters: 'vit.embeddings.cls_token' "
                                         "is torch.bfloat16"):
        twa.hf.train_twa(half, paths, epochs=1, lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    for options, message in (({"every_steps": 0}, "every_steps must be"),
                             ({"at_epoch_end": False}, "nothing would be recorded"),
                             ({"start_step": -1}, "start_step must be"),
                             ({"capacity": 0}, "capacity must be")):
        with pytest.raises(ValueError, match=message):
            twa.hf.SpanRecorder(**options)
    with pytest.raises(ValueError, match="capacity 2 is less than the 5 snapshots"):
        Trainer(model=vit(), args=arguments(tmp_path / "small"), train_dataset=data,
                callbacks=[twa.hf.SpanRecorder(every_steps=3, capacity=2)]).train()


def test_import_twa_needs_neither_safetensors_nor_transformers():
    code = ("import sys, twa; assert not {'safetensors', 'transformers', 'twa.hf'} & set(sys.modules)"
            ", sorted({'safetensors', 'transformers', 'twa.hf'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_the_vit_example_runs_at_a_tiny_size(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "hf_vit.py"),
                           "--subset", "300", "--epochs", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    swa, trained = (re.search(rf"^{label}.*test accuracy ([0-9.]+)%", proc.stdout, re.M)
                    for label in (r"SWA point \(mean of [2-9] checkpoints\)", r"TWA \(1 epochs\)"))
    assert 0 <= float(swa.group(1)) <= 100 and 0 <= float(trained.group(1)) <= 100
    assert len(glob.glob(str(tmp_path / "checkpoint-*" / "model.safetensors"))) >= 2


@pytest.mark.slow
def test_soup_mode_reads_trainer_checkpoint_folders(tiny_data, tmp_path):
    """train_twa.py --checkpoints 'out/checkpoint-*': the glob gives the folders, one of them
    sharded, read as they are; the saved alpha gives twa.pt's weights from them."""
    import models
    model = models.build_model("resnet20", 3)
    states = []
    for i, step in enumerate((100, 200, 300)):
        torch.manual_seed(i)
        states.append({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in model.state_dict().items()})
        folder = tmp_path / "out" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        torch.save({"state": {}}, folder / "optimizer.pt")  # what else a Trainer leaves there
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if step != 200:
            safetensors.torch.save_file(states[-1], folder / "model.safetensors")
            continue
        keys = list(states[-1])
        parts = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
                 "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, part in parts.items():
            safetensors.torch.save_file({k: states[-1][k] for k in part}, folder / name)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}))
    out = tmp_path / "twa"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_twa.py"), "--datasets",
                           "ImageFolder", "--data-dir", tiny_data, "--arch", "resnet20", "-b", "8",
                           "--device", "cpu", "--checkpoints", str(tmp_path / "out" / "checkpoint-*"),
                           "--val-split", "25", "--epochs", "1", "--save-dir", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    coefficients = json.load(open(out / "coefficients.json"))
    assert coefficients["checkpoints"] == [str(tmp_path / "out" / f"checkpoint-{s}")
                                           for s in (100, 200, 300)]
    final = torch.load(out / "twa.pt", weights_only=True)
    alpha = torch.tensor(coefficients["alpha"], dtype=torch.float64)
    for name, _ in model.named_parameters():
        mixed = sum(a * state[name].double() for a, state in zip(alpha, states))
        assert (mixed - final[name].double()).norm() <= 1e-5 * final[name].double().norm() + 1e-7
