"""Hostile input and faults: runs on several nodes that disagree or lack a file, uneven batches,
corrupt images and checkpoints, folders killed half-way, durability and low-bit bases. Each test
names the case of the reliability list in README.md that it keeps closed."""
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import distributed
import runfiles
import twa
import utils
from conftest import ROOT, write_image_folder
from test_cli import common, run
from test_distributed import launch, relative_difference
from test_fidelity import mlp
from test_twa import random_walk


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(script, per_rank_args, timeout=180, cwds=None):
    """Start one process per rank as separate launches (two nodes of one process each), with its
    own flags (and working folder); returns [(returncode, stderr, seconds)] by rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(len(per_rank_args)),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    started = time.time()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args), "--quiet"],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=cwds and cwds[rank])
             for rank, args in enumerate(per_rank_args)]
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        out.append((proc.returncode, err, time.time() - started))
    return out


@pytest.fixture(scope="module")
def sgd_run(tiny_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("hostile-sgd")
    run("train_sgd.py", *common(tiny_data, save, "--epochs", "2", "--save-every", "2"))
    return save


# -- 4: a folder killed between 0.pt and its first state -------------------------------------------

@pytest.mark.slow
def test_resume_of_a_folder_killed_after_its_first_checkpoint_starts_afresh(sgd_run, tiny_data,
                                                                            tmp_path):
    stuck = tmp_path / "stuck"
    os.makedirs(stuck)
    shutil.copy(sgd_run / "0.pt", stuck / "0.pt")
    run("train_sgd.py", *common(tiny_data, stuck, "--epochs", "2", "--save-every", "2", "--resume"))
    for i in range(5):  # a fresh run's checkpoints, up to the float order of another thread count
        fresh, restarted = (torch.load(folder / f"{i}.pt", weights_only=True) for folder in (sgd_run, stuck))
        assert relative_difference(restarted, fresh) < 1e-5


# -- 6 and 7: nodes that lack a file or disagree stop together, promptly ---------------------------

@pytest.mark.slow
def test_a_node_missing_a_checkpoint_stops_every_node_promptly(sgd_run, tiny_data, tmp_path):
    other_node = tmp_path / "node1"
    shutil.copytree(sgd_run, other_node)
    os.remove(other_node / "3.pt")
    flags = ["--params_end", 5, "--epochs", 1, "--device", "cpu", "--dist-timeout", 120,
             "--output-dir", tmp_path / "out", "--log-dir", tmp_path / "out"]
    results = launch_nodes("train_twa.py", [common(tiny_data, sgd_run, *flags),
                                            common(tiny_data, other_node, *flags)])
    (rc0, err0, seconds0), (rc1, err1, seconds1) = results
    assert rc1 == 2 and f"checkpoint not found: {other_node / '3.pt'}" in err1, err1[-500:]
    assert rc0 == 2 and "process 1 of 2 stopped on bad input" in err0, err0[-500:]
    assert len(err0.strip().splitlines()) == 1 and max(seconds0, seconds1) < 100


@pytest.mark.slow
def test_nodes_that_disagree_on_the_data_stop_naming_the_flag(tiny_data, tmp_path):
    flags = ["--epochs", 1, "--device", "cpu", "--save-dir", tmp_path / "run"]
    results = launch_nodes("train_sgd.py", [common(tiny_data, tmp_path / "run", *flags),
                                            common(tiny_data, tmp_path / "run", *flags,
                                                   "--train-subset", 40)])
    for rc, err, _ in results:
        assert rc == 2 and "the 2 processes disagree on --train-subset" in err, err[-500:]
    assert not (tmp_path / "run" / "0.pt").exists()  # stopped before the first file


def rewrite(path, shift=1.0):
    """The file saved again under its name, one weight moved by `shift` (another run's, a stale
    copy); the same size for any shift."""
    state = torch.load(path, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + shift
    torch.save(state, path)


@pytest.mark.slow
def test_nodes_holding_other_files_under_the_same_names_stop_naming_them(sgd_run, tiny_data,
                                                                          tmp_path):
    """Checkpoints of the same names and sizes, another content on one node (no manifest to catch
    it): compared by SHA-256, hashed once per node, refused before a patchwork basis is built."""
    for node in ("a", "b"):
        shutil.copytree(sgd_run, tmp_path / node / "ck")
        os.remove(tmp_path / node / "ck" / runfiles.Manifest.FILE)
    rewrite(tmp_path / "a" / "ck" / "2.pt", shift=0.0)
    rewrite(tmp_path / "b" / "ck" / "2.pt")
    assert os.path.getsize(tmp_path / "a" / "ck" / "2.pt") == os.path.getsize(tmp_path / "b" / "ck" / "2.pt")
    flags = common(tiny_data, "ck", "--params_end", 5, "--epochs", 1, "--device", "cpu",
                   "--output-dir", "out", "--log-dir", "out")
    results = launch_nodes("train_twa.py", [flags, flags], cwds=[tmp_path / "a", tmp_path / "b"])
    for rc, err, _ in results:
        assert rc == 2 and "the 2 processes disagree on checkpoint files" in err, err[-500:]
    assert not (tmp_path / "a" / "out" / "twa.pt").exists()


def test_twa_resume_refuses_checkpoints_replaced_under_the_same_names(sgd_run, tiny_data, tmp_path):
    shutil.copytree(sgd_run, tmp_path / "ck")
    flags = ["--params_end", 5, "--epochs", 1, "--output-dir", tmp_path / "out"]
    run("train_twa.py", *common(tiny_data, tmp_path / "ck", *flags))
    os.remove(tmp_path / "ck" / runfiles.Manifest.FILE)  # replaced with their manifest: as good
    rewrite(tmp_path / "ck" / "2.pt")
    proc = run("train_twa.py", *common(tiny_data, tmp_path / "ck", *flags, "--resume"), check=False)
    assert proc.returncode == 2 and "saved for other checkpoint contents" in proc.stderr, proc.stderr


PEER_STOPS = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import cli

def main(argv):
    dist.init_process_group("gloo")
    for step in range(10 ** 6):
        if dist.get_rank() == 1 and step == 20:
            os._exit(9)  # as if killed: no goodbye to the group
        dist.all_reduce(torch.zeros(10))

cli.run_main(main)
"""


def test_the_survivor_of_a_killed_process_says_one_line_naming_it(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(PEER_STOPS.format(root=ROOT))
    (rc0, err0, _), (rc1, _, _) = launch_nodes(script, [[], []], timeout=120)
    assert rc1 == 9
    assert rc0 == 1 and err0.strip().splitlines() == [
        "error: process 0 of 2 lost contact with process 1, which stopped or stalled past "
        "--dist-timeout (its own output says why); the last saved state is kept"], err0


def test_a_finished_twa_folder_is_replaced_only_with_overwrite(sgd_run, tiny_data, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    flags = common(tiny_data, sgd_run, "--params_end", 5, "--epochs", 1, "--output-dir", out,
                   "--log-dir", logs)
    os.makedirs(logs)
    (logs / "twa_results.json").write_text("{}")  # an earlier run's results, its twa.pt elsewhere
    proc = run("train_twa.py", *flags, check=False)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: {logs / 'twa_results.json'} is an earlier TWA run's; --resume continues it, "
        "--overwrite replaces it, or choose another --output-dir\n")
    assert not out.exists() or not (out / "twa.pt").exists()
    run("train_twa.py", *flags, "--overwrite")
    assert json.loads((logs / "twa_results.json").read_text())["twa"]["accuracy"] >= 0


def test_a_save_path_that_is_not_utf8_is_written_escaped_in_the_lock_and_log(tiny_data, tmp_path):
    save = os.path.join(tmp_path, b"run-\xfe".decode("utf-8", "surrogateescape"))
    args = [sys.executable, os.path.join(ROOT, "train_sgd.py"),
            *map(str, common(tiny_data, save, "--epochs", 1, "--train-subset", 16)), "--quiet"]
    proc = subprocess.run([os.fsencode(a) for a in args], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"Logging error" not in proc.stderr
    assert "run-\\udcfe" in open(os.path.join(save, "log.log"), encoding="utf-8").read()


def test_an_empty_resume_state_is_one_line(sgd_run, tiny_data, tmp_path):
    flags = common(tiny_data, sgd_run, "--params_end", 3, "--epochs", 1, "--output-dir", tmp_path)
    open(tmp_path / "twa_state.pt", "w").close()
    proc = run("train_twa.py", *flags, "--resume", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot load {tmp_path / 'twa_state.pt'}")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_sgd_resume_refuses_data_that_changed_since(tmp_path):
    """Images added to the tree: --train-subset would draw another subset, and the run go on
    on images its first epochs never saw."""
    write_image_folder(tmp_path / "data", per_class=12)
    flags = ["--epochs", 1, "--train-subset", 24, "--save-every", 1]
    run("train_sgd.py", *common(tmp_path / "data", tmp_path / "run", *flags))
    write_image_folder(tmp_path / "more", per_class=2, seed=5)
    for image in (tmp_path / "more" / "train").rglob("*.png"):
        shutil.copy(image, tmp_path / "data" / "train" / image.parent.name / f"new-{image.name}")
    proc = run("train_sgd.py", *common(tmp_path / "data", tmp_path / "run", *flags, "--resume"),
               check=False)
    assert proc.returncode == 2 and "was saved on other data" in proc.stderr, proc.stderr


# -- 9: data that cannot be decoded ---------------------------------------------------------------

def truncated_image_tree(root, size):
    tree = write_image_folder(str(root), per_class=4, size=size)
    bad = os.path.join(tree, "train", "square", "0001.jpg")
    Image.fromarray(np.zeros((size, size, 3), np.uint8) + 99).save(bad, quality=90)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    return tree, bad


@pytest.mark.slow
def test_a_truncated_image_is_one_line_naming_it_on_both_loader_paths(tmp_path):
    small, bad = truncated_image_tree(tmp_path / "small", 32)
    proc = run("train_sgd.py", *common(small, tmp_path / "a", "--epochs", 1), check=False)
    assert proc.returncode == 2 and proc.stderr == f"error: cannot decode image {bad} (" + \
        proc.stderr.split(" (", 1)[1] and proc.stderr.count("\n") == 1, proc.stderr[-800:]
    # large images go through DataLoader workers: the run stops in its first epoch, exit 1
    large, bad = truncated_image_tree(tmp_path / "large", 72)
    proc = run("train_sgd.py", "--datasets", "ImageFolder", "--data-dir", large, "--arch",
               "resnet18", "-b", 4, "-j", 1, "--epochs", 1, "--save-dir", tmp_path / "b", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: cannot decode image {bad}") \
        and proc.stderr.count("\n") == 1, proc.stderr[-800:]


def test_the_decode_cache_is_written_whole_by_one_process(tmp_path, monkeypatch):
    root = write_image_folder(str(tmp_path / "data"), per_class=2)
    cache = tmp_path / "cache"
    data.decoded_image_folder(os.path.join(root, "train"), str(cache), write_cache=False)
    assert not cache.exists() or not os.listdir(cache)  # the other ranks write nothing

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    images, _, _ = data.decoded_image_folder(os.path.join(root, "train"), str(cache))
    assert len(images) == 6 and not os.listdir(cache)  # no cache and no *.tmp left, the run goes on


# -- 12: a checkpoint that changed on disk --------------------------------------------------------

@pytest.mark.slow
def test_a_flipped_byte_in_a_checkpoint_is_caught_by_its_manifest(sgd_run, tiny_data, tmp_path):
    manifest = json.loads((sgd_run / "checkpoints.json").read_text())
    assert sorted(manifest, key=lambda n: int(n[:-3])) == [f"{i}.pt" for i in range(5)]
    assert [manifest[f"{i}.pt"]["step"] for i in range(5)] == [0, 3, 6, 9, 12]  # 6 per epoch
    assert manifest["3.pt"]["epochs"] == 1.5
    assert manifest["2.pt"]["sha256"] == runfiles.sha256_of(sgd_run / "2.pt")
    rotted = tmp_path / "rotted"
    shutil.copytree(sgd_run, rotted)
    raw = bytearray((rotted / "2.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside a tensor's bytes: the zip directory is still whole
    (rotted / "2.pt").write_bytes(bytes(raw))
    twa.checkpoints.check_readable(rotted / "2.pt")
    out = tmp_path / "out"
    proc = run("train_twa.py", *common(tiny_data, rotted, "--params_end", 5, "--epochs", 1,
                                       "--output-dir", out, "--log-dir", out), check=False)
    assert proc.returncode == 2 and f"{rotted / '2.pt'} is not the file train_sgd.py saved" in \
        proc.stderr, proc.stderr[-500:]


def sharded_checkpoint(folder, name="1.dcp"):
    """A sharded checkpoint folder (as train_sgd.py --sharded-checkpoints writes, here by one
    process) of a small model, with its manifest entry; returns (its path, the model's state)."""
    model = mlp()
    ctx = distributed.Context(rank=0, world=1, device=torch.device("cpu"))
    distributed.save_sharded(model, str(folder / name), ctx)
    runfiles.Manifest(str(folder)).record(name, step=1)
    return folder / name, model.state_dict()


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_sharded_checkpoint_reads_whole_and_its_damage_is_one_line(tmp_path, monkeypatch):
    path, state = sharded_checkpoint(tmp_path)
    assert not os.path.exists(f"{path}.tmp") and not os.path.exists(f"{path}.old")
    twa.checkpoints.check_readable(path)
    loaded = twa.checkpoints.load_state_dict(str(path))
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert runfiles.hash_checkpoints([str(path)])[1] == 1  # verified against checkpoints.json
    shard = path / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(runfiles.UsageError, match="is not the file train_sgd.py saved"):
        runfiles.hash_checkpoints([str(path)])
    shard.write_bytes(bytes(raw[:100]))
    with pytest.raises(twa.CheckpointError, match="shard file __0_0.distcp is truncated"):
        twa.checkpoints.check_readable(path)
    shard.unlink()
    with pytest.raises(twa.CheckpointError, match="lacks its shard file __0_0.distcp"):
        twa.checkpoints.check_readable(path)
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(twa.CheckpointError, match="unreadable .metadata"):
        twa.checkpoints.load_state_dict(str(path))
    monkeypatch.chdir(tmp_path)  # the payload would create ./pwned
    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(twa.CheckpointError, match="refusing to load .*posix.system"):
        twa.checkpoints.check_readable(path)
    assert not (tmp_path / "pwned").exists()
    (path / ".metadata").unlink()
    with pytest.raises(twa.CheckpointError, match="a folder without .metadata"):
        twa.checkpoints.load_state_dict(str(path))


# -- 13: durability, random states per process ----------------------------------------------------

def test_an_atomic_write_flushes_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    runfiles.save_json({"a": 1}, tmp_path / "x.json")
    assert synced == [False, True]


def test_processes_draw_their_own_dropout_and_save_each_random_state():
    utils.seed_everything(3, rank=0)
    zero = torch.rand(4)
    utils.seed_everything(3, rank=1)
    one = torch.rand(4)
    utils.seed_everything(3)
    assert torch.equal(torch.rand(4), zero) and not torch.equal(zero, one)
    ctx = type("Ctx", (), {"world": 1, "rank": 0, "device": torch.device("cpu")})()
    states = utils.all_rng_states(ctx)
    expected = torch.rand(3)
    utils.restore_rng(states, ctx)
    assert torch.equal(torch.rand(3), expected)
    utils.restore_rng(states[0]["cpu"], ctx)  # a state saved before: one CPU state
    assert torch.equal(torch.rand(3), expected)


# -- 14: uneven last batches under torchrun -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("loader, within", [("memory", 1e-5), ("torchvision", 0.1)])
def test_an_empty_share_of_the_last_batch_trains_as_one_process(tiny_data, tmp_path, loader, within):
    """48 images at -b 47 on 2 processes: the last global batch holds one image, rank 1 none. The
    in-memory loader crops by (seed, epoch, image), so N processes equal one to rounding; the
    torchvision path draws crops from each process's generator, so only the images agree."""
    for n in (1, 2):
        launch("train_sgd.py", n, "--datasets", "ImageFolder", "--data-dir", tiny_data, "--arch",
               "resnet20", "-b", 47, "--save-dir", tmp_path / f"p{n}", "--device", "cpu",
               "--epochs", 1, "--lr", 0.02, "--loader", loader, "-j", 0)
    one, two = (torch.load(tmp_path / f"p{n}" / "1.pt", weights_only=True) for n in (1, 2))
    assert relative_difference(one, two) < within
    rows = [runfiles.read_jsonl(tmp_path / f"p{n}" / "metrics.jsonl")[0] for n in (1, 2)]
    assert abs(rows[0]["train_loss"] - rows[1]["train_loss"]) < 10 * within * rows[0]["train_loss"]
    states = torch.load(tmp_path / "p2" / "state.pt", weights_only=True)["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["cpu"], states[1]["cpu"])


# -- 15: low-bit bases and what alpha rebuilds ----------------------------------------------------

@pytest.mark.parametrize("bits, within", [(32, 1e-5), (16, 1e-2), (8, 3e-2)])
def test_a_duplicated_checkpoint_adds_no_direction_at_any_precision(bits, within):
    model = mlp()
    walk = random_walk(model, 8)
    walk.insert(4, dict(walk[2]))
    space = twa.Subspace.from_checkpoints(model, walk, bits=bits)
    assert space.rank == 8  # 8 distinct checkpoints, one of them twice
    step = torch.randn(space.rank, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coordinates = space.mean_coords + 0.5 * step
    trainer = twa.TWA(model, space)
    trainer.move_to(coordinates)
    alpha = space.checkpoint_coefficients(trainer.coordinates)
    residual = twa.combination_residual(space, model, walk, alpha)
    assert residual["relative"] < within, residual


# -- 5: resuming a finished TWA run ---------------------------------------------------------------

@pytest.mark.slow
def test_resuming_a_finished_twa_run_rewrites_the_same_weights(sgd_run, tiny_data, tmp_path):
    flags = ["--params_end", 5, "--epochs", 1, "--output-dir", tmp_path, "--log-dir", tmp_path]
    run("train_twa.py", *common(tiny_data, sgd_run, *flags))
    first = torch.load(tmp_path / "twa.pt", weights_only=True)
    run("train_twa.py", *common(tiny_data, sgd_run, *flags, "--resume"))
    again = torch.load(tmp_path / "twa.pt", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)  # BatchNorm buffers included
    reconstruction = json.loads((tmp_path / "coefficients.json").read_text())["reconstruction"]
    assert reconstruction["relative"] < 1e-4, reconstruction


# -- 8, 10, 11: bad files and folders are one line and exit 2, before any long work ----------------

@pytest.mark.slow
def test_bad_files_and_folders_are_one_line_before_the_basis(sgd_run, tiny_data, tmp_path):
    def twa_on(folder, *extra):
        proc = run("train_twa.py", *common(tiny_data, folder, "--params_end", 3, "--epochs", 1,
                                           "--output-dir", tmp_path / "out", *extra), check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-800:]
        log = tmp_path / "out" / "log.log"
        assert not log.exists() or "subspace:" not in log.read_text()  # stopped before the basis
        return proc.stderr
    bad = tmp_path / "bad"
    os.makedirs(bad)
    for i in range(3):
        shutil.copy(sgd_run / f"{i}.pt", bad / f"{i}.pt")
    state = torch.load(bad / "1.pt", weights_only=True)
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, bad / "1.pt")
    assert f"{bad / '1.pt'}: 'conv1.weight' holds NaN or Inf values" in twa_on(bad)
    state["conv1.weight"] = "not a tensor"
    torch.save(state, bad / "1.pt")
    assert f"{bad / '1.pt'}: 'conv1.weight' is a str, not a tensor" in twa_on(bad)
    (tmp_path / "a-file").write_text("")
    assert "cannot write to" in twa_on(sgd_run, "--log-dir", tmp_path / "a-file" / "logs")
    for split in ({"examples": 48, "percent": 10, "seed": 0, "held_out": []},
                  {"examples": 48, "percent": 10, "seed": 0, "held_out": "0,1,2"},
                  {"examples": "48", "percent": 10, "seed": 0, "held_out": [1, 2]},
                  {"examples": 48, "percent": 10, "seed": 0, "held_out": [1, 1]}):
        (tmp_path / "split.json").write_text(json.dumps(split))
        assert "cannot read the split" in twa_on(sgd_run, "--split", tmp_path / "split.json",
                                                 "--val-split", 10)


@pytest.mark.slow
def test_sigint_before_training_is_one_line_and_exit_143(tiny_data, tmp_path):
    import signal
    # a default SIGINT in the child: a test run started in the background hands it an ignored one
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sgd.py"),
                             *map(str, common(tiny_data, tmp_path, "--epochs", 50)), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the first log line comes before the data and the model: interrupt there (on a loaded
    # machine the epochs may have begun, which save a state and say so in the log instead; 50 of
    # them, so that the run is still going when the signal lands)
    proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err == "error: interrupted; the last saved state is kept\n" or \
        (err == "" and "stopped by SIGINT" in out), err


def test_a_signal_that_python_drops_still_stops_the_epochs():
    # CPython drops (prints "Exception ignored in") an exception raised inside a weakref callback,
    # e.g. a KeyboardInterrupt that lands in an import's module-lock cleanup, as a SIGINT during
    # the imports once did in CI: the run then trained to the end and exited 0
    import signal
    import weakref

    import loop

    class Thing:
        pass

    interrupt, reported = loop.Interrupt(), []
    previous = signal.signal(signal.SIGINT, interrupt)
    previous_hook, sys.unraisablehook = sys.unraisablehook, interrupt.unraisable(reported.append)
    try:
        thing = Thing()
        ref = weakref.ref(thing, lambda ref: signal.raise_signal(signal.SIGINT))
        del thing  # the handler's KeyboardInterrupt is raised in the callback and dropped
        assert ref() is None and interrupt.signal == "SIGINT" and reported == []
        with loop.StopRequest() as stop:
            assert stop and stop.signal == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is interrupt  # StopRequest gave it back
        thing = Thing()
        ref = weakref.ref(thing, lambda ref: 1 / 0)
        del thing  # anything else still reaches the previous hook
        assert [r.exc_type for r in reported] == [ZeroDivisionError]
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous)


# -- 16: the library's guards --------------------------------------------------------------------

def test_project_refuses_a_sharded_basis_and_gradient_takes_any_dtype():
    model = mlp()
    space = twa.Subspace.from_checkpoints(model, random_walk(model, 4))
    g = torch.randn(space.shard.dim)
    expected = space.gradient(g)
    assert torch.allclose(space.gradient(g.double()), expected)  # moved to the basis' dtype and device
    space.shard.world = 2  # as under torchrun: each process holds a part of every row
    with pytest.raises(RuntimeError, match="project_ needs the whole basis"):
        space.project_(g)


def test_the_next_run_in_a_folder_removes_the_temp_files_of_a_killed_one(tmp_path):
    (tmp_path / ".3.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what kill -9 leaves
    (tmp_path / "notes.tmp").write_text("not ours")
    runfiles.FolderLock([tmp_path])
    assert sorted(os.listdir(tmp_path)) == [".twa-lock", "notes.tmp"]


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_a_recorder_state_saved_before_the_rounding_was_recorded_still_resumes(bits):
    """States of earlier versions hold no per-row rounding (and 16 bits in bfloat16): they load,
    with the rounding expected for their format (within 10% of the measured one at 8 and 4 bits)."""
    model = mlp()
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
