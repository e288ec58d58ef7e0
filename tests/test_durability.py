"""Nothing half-written survives a crash, damage on disk is caught, and a resume continues: files
are written whole (flushed, renamed, the folder flushed) or not at all, a full disk and kill -9
leave no torn file and the next run removes the temp files, a checkpoint that changed on disk is
refused by its manifest, signals at any moment stop the run with a resumable state, and resuming a
finished run rewrites nothing but what it wrote."""
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import distributed
import runfiles
import twa
import utils
from conftest import ROOT, write_image_folder
from test_cli import common, run
from test_distributed import relative_difference
from test_twa import mlp


def whole_and_finite(folder, temp_files_allowed=False):
    """Every .pt file in `folder` loads and holds only finite floats; no temp file is left (unless
    allowed: after kill -9, which the next run in the folder removes)."""
    names = os.listdir(folder)
    assert temp_files_allowed or not [n for n in names if n.endswith(".tmp")], names
    for name in names:
        if name.endswith(".pt"):
            state = torch.load(os.path.join(folder, name), weights_only=True)
            tensors = state.get("model", state)
            assert all(torch.isfinite(t).all() for t in tensors.values()
                       if torch.is_tensor(t) and t.is_floating_point()), name


def twa_flags(data_dir, checkpoints, out, *extra):
    return common(data_dir, checkpoints, "--params_end", 5, "--output-dir", out, "--log-dir", out,
                  *extra)


# --- crashes and resumes -------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_of_a_folder_killed_after_its_first_checkpoint_starts_afresh(sgd_checkpoints, tiny_data,
                                                                            tmp_path):
    stuck = tmp_path / "stuck"
    os.makedirs(stuck)
    shutil.copy(sgd_checkpoints / "0.pt", stuck / "0.pt")
    run("train_sgd.py", *common(tiny_data, stuck, "--epochs", "2", "--save-every", "2", "--resume"))
    for i in range(5):  # a fresh run's checkpoints, up to the float order of another thread count
        fresh, restarted = (torch.load(folder / f"{i}.pt", weights_only=True)
                            for folder in (sgd_checkpoints, stuck))
        assert relative_difference(restarted, fresh) < 1e-5


@pytest.mark.slow
def test_twa_resume_without_a_state_starts_and_of_a_finished_run_rewrites_the_same_weights(
        sgd_checkpoints, tiny_data, tmp_path):
    flags = twa_flags(tiny_data, sgd_checkpoints, tmp_path, "--epochs", 1, "--resume")
    run("train_twa.py", *flags)  # no twa_state.pt yet: --resume starts the run
    first = torch.load(tmp_path / "twa.pt", weights_only=True)
    run("train_twa.py", *flags)
    again = torch.load(tmp_path / "twa.pt", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)  # BatchNorm buffers included
    reconstruction = json.loads((tmp_path / "coefficients.json").read_text())["reconstruction"]
    assert reconstruction["relative"] < 1e-4, reconstruction


@pytest.mark.slow
def test_resuming_a_finished_sgd_run_writes_no_new_checkpoint(sgd_checkpoints, tiny_data, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(sgd_checkpoints, folder, ignore=shutil.ignore_patterns(".twa-lock"))
    before = {n: os.path.getmtime(folder / n) for n in os.listdir(folder) if n.endswith(".pt")}
    run("train_sgd.py", *common(tiny_data, folder, "--epochs", 2, "--save-every", 2, "--resume"))
    after = {n: os.path.getmtime(folder / n) for n in os.listdir(folder) if n.endswith(".pt")}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != "state.pt")


@pytest.mark.slow
def test_twa_killed_at_any_moment_leaves_whole_files_and_resumes_to_the_end(sgd_checkpoints,
                                                                             tiny_data, tmp_path):
    flags = twa_flags(tiny_data, sgd_checkpoints, tmp_path, "--epochs", 4)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_twa.py"), *map(str, flags),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "twa_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    whole_and_finite(tmp_path, temp_files_allowed=True)
    run("train_twa.py", *flags, "--resume")
    assert (tmp_path / "twa.pt").exists()
    whole_and_finite(tmp_path)
    rows = runfiles.read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["epoch"] for row in rows if row["stage"] == "twa"][-1] == 4


def test_a_second_signal_while_the_first_is_being_handled_stops_at_once():
    """The first SIGTERM asks the epochs to save a state and stop; a second one, as from an
    impatient user or a scheduler, stops at once (the state saved last is whole either way)."""
    import loop
    with loop.StopRequest() as stop:
        assert not stop
        signal.raise_signal(signal.SIGTERM)
        assert stop and stop.signal == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)


@pytest.mark.slow
def test_sigint_before_training_is_one_line_and_exit_143(tiny_data, tmp_path):
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
    # e.g. a KeyboardInterrupt that lands in an import's module-lock cleanup: the handler keeps the
    # signal, so that the epochs stop at their first step instead of training to the end
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
    utils.restore_rng(states[0]["cpu"], ctx)  # a state of one process: one CPU state
    assert torch.equal(torch.rand(3), expected)


# --- writes that fail, and what they leave -------------------------------------------------------

def test_an_atomic_write_flushes_the_file_and_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    runfiles.save_json({"a": 1}, tmp_path / "x.json")
    assert synced == [False, True]


def test_the_next_run_in_a_folder_removes_the_temp_files_of_a_killed_one(tmp_path):
    (tmp_path / ".3.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what kill -9 leaves
    (tmp_path / "notes.tmp").write_text("not ours")
    runfiles.FolderLock([tmp_path])
    assert sorted(os.listdir(tmp_path)) == [".twa-lock", "notes.tmp"]


@pytest.mark.slow
def test_a_full_disk_under_train_twa_is_one_line_and_leaves_no_torn_file(sgd_checkpoints, tiny_data,
                                                                        tmp_path):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the log fits, a state does not
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_twa.py"),
                           *map(str, twa_flags(tiny_data, sgd_checkpoints, tmp_path, "--epochs", 1)),
                           "--quiet"], capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot write"), proc.stderr[-500:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".pt", ".tmp"))]


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


# --- damage on disk is caught --------------------------------------------------------------------

@pytest.mark.slow
def test_a_flipped_byte_in_a_checkpoint_is_caught_by_its_manifest(sgd_checkpoints, tiny_data,
                                                                  tmp_path):
    manifest = json.loads((sgd_checkpoints / "checkpoints.json").read_text())
    assert sorted(manifest, key=lambda n: int(n[:-3])) == [f"{i}.pt" for i in range(5)]
    assert [manifest[f"{i}.pt"]["step"] for i in range(5)] == [0, 3, 6, 9, 12]  # 6 per epoch
    assert manifest["3.pt"]["epochs"] == 1.5
    assert manifest["2.pt"]["sha256"] == runfiles.sha256_of(sgd_checkpoints / "2.pt")
    rotted = tmp_path / "rotted"
    shutil.copytree(sgd_checkpoints, rotted, ignore=shutil.ignore_patterns(".twa-lock"))
    raw = bytearray((rotted / "2.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside a tensor's bytes: the zip directory is still whole
    (rotted / "2.pt").write_bytes(bytes(raw))
    twa.checkpoints.check_readable(rotted / "2.pt")
    out = tmp_path / "out"
    proc = run("train_twa.py", *twa_flags(tiny_data, rotted, out, "--epochs", 1), check=False)
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


def test_a_checkpoint_folder_with_a_subfolder_is_hashed_whole(tmp_path):
    """A folder's digest covers the files of its subfolders too (a changed file there changes it),
    and a flat folder's digest is its files' names and digests (the manifests of flat folders keep
    their entries)."""
    folder = tmp_path / "7.dcp"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.distcp").write_bytes(b"weights")
    (folder / "nested" / "b.bin").write_bytes(b"more")
    digest = runfiles.sha256_of(folder)
    assert runfiles.size_of(folder) == len(b"weights") + len(b"more")
    (folder / "nested" / "b.bin").write_bytes(b"mere")
    assert runfiles.sha256_of(folder) != digest
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.distcp").write_bytes(b"weights")
    expected = hashlib.sha256(f"a.distcp\0{hashlib.sha256(b'weights').hexdigest()}\n".encode())
    assert runfiles.sha256_of(flat) == expected.hexdigest()
