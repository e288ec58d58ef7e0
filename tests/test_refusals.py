"""What the scripts refuse, in one line, rather than harm a file that is not theirs, leave a torn
one, or change a run's numerics on the quiet: outputs that are not regular files, file names that
are no file names, failed sharded saves, a split that leaves nothing to train on, and resumes under
other flags or another number of processes."""
import json
import os
import resource
import socket
import stat
import subprocess
import sys

import pytest
import torch

import cli
import runfiles
import train_sgd
import train_twa
from conftest import ROOT
from test_cli import common, run


@pytest.fixture
def odd_paths(tmp_path):
    """name -> a path that exists and is no regular file: a named pipe, a folder, a socket, and a
    symbolic link to the machine's /dev/null (a character device; mknod needs privileges)."""
    paths = {"pipe": tmp_path / "pipe", "folder": tmp_path / "folder", "socket": tmp_path / "sock",
             "device": tmp_path / "null"}
    os.mkfifo(paths["pipe"])
    os.mkdir(paths["folder"])
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(paths["socket"]))
    os.symlink("/dev/null", paths["device"])
    yield paths
    server.close()


def test_an_atomic_write_refuses_what_is_no_regular_file_and_leaves_it(odd_paths, tmp_path):
    kinds = {"pipe": "a named pipe", "folder": "a folder", "socket": "a socket",
             "device": "a character device"}
    for name, path in odd_paths.items():
        before = os.lstat(path)
        with pytest.raises(runfiles.WriteFailed, match=f"it is {kinds[name]}, not a regular file"):
            runfiles.save_json({"a": 1}, path)
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode), name
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # several outputs together: the refusal comes before any of them is written
    with pytest.raises(runfiles.WriteFailed):
        runfiles.atomic_write_all([(tmp_path / "first.json", runfiles.json_writer(1)),
                                   (odd_paths["pipe"], runfiles.json_writer(2))])
    assert not (tmp_path / "first.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_an_atomic_write_through_a_link_replaces_the_file_it_names(tmp_path):
    target = tmp_path / "elsewhere" / "results.json"
    os.makedirs(target.parent)
    target.write_text("old")
    os.symlink(target, tmp_path / "link.json")
    runfiles.save_json({"new": 1}, tmp_path / "link.json")
    assert os.path.islink(tmp_path / "link.json") and json.loads(target.read_text()) == {"new": 1}


def test_a_folder_checkpoint_replaces_only_a_folder(odd_paths, tmp_path):
    for path in (odd_paths["pipe"], odd_paths["device"], tmp_path / "file"):
        path.touch()
        (tmp_path / "new.tmp").mkdir(exist_ok=True)
        with pytest.raises(runfiles.WriteFailed, match="not a folder"):
            runfiles.replace_folder(str(tmp_path / "new.tmp"), str(path))
        assert not os.path.isdir(path)
    assert os.path.islink(odd_paths["device"])


def test_plot_refuses_an_output_that_is_no_regular_file(odd_paths, tmp_path):
    rows = tmp_path / "metrics.jsonl"
    rows.write_text(json.dumps({"stage": "sgd", "epoch": 1, "train_loss": 1.0, "test_loss": 1.0,
                                "train_acc": 50.0, "test_acc": 50.0}) + "\n")
    for path in odd_paths.values():
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), "curves", str(rows),
                               "-o", str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr[-500:]
        assert proc.stderr.count("\n") == 1, proc.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("name,message", [("a/b", "must be a file name"), ("", "must be a file name"),
                                          (".", "must be a file name"), ("..", "must be a file name"),
                                          ("x" * 300, "--log-name is too long")])
def test_a_log_name_that_is_no_file_name_is_a_usage_error(name, message, tmp_path, capsys):
    for main in (train_sgd.main, train_twa.main):
        with pytest.raises(SystemExit) as stopped:
            cli.run_main(main, ["--save-dir", str(tmp_path), "--log-name", name, "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(err) == 1 and message in err[0], err


def test_a_log_file_that_is_a_named_pipe_is_refused_not_waited_on(tiny_data, tmp_path):
    os.makedirs(tmp_path / "run")
    os.mkfifo(tmp_path / "run" / "log.log")
    proc = run("train_sgd.py", *common(tiny_data, tmp_path / "run", "--epochs", 1), check=False)
    assert proc.returncode == 1 and "log.log: it is a named pipe" in proc.stderr, proc.stderr[-500:]


@pytest.mark.slow
def test_a_failed_sharded_save_is_one_line_and_leaves_no_torn_folder(tiny_data, tmp_path):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sgd.py"),
                           *map(str, common(tiny_data, tmp_path / "full", "--epochs", 1,
                                            "--sharded-checkpoints")), "--quiet"],
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: cannot write {tmp_path / 'full' / '0.dcp'} (")
    assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert not [n for n in os.listdir(tmp_path / "full") if n.endswith((".dcp", ".tmp"))]


@pytest.fixture(scope="module")
def sgd_run(tiny_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("refusals-sgd")
    run("train_sgd.py", *common(tiny_data, save, "--epochs", 1, "--save-every", 1))
    return save


def test_an_input_that_is_no_regular_file_is_refused_not_waited_on(odd_paths):
    for read in (runfiles.read_jsonl, runfiles.read_manifest, runfiles.load_torch):
        for name in ("pipe", "folder", "socket"):
            with pytest.raises(cli.UsageError, match="not a regular file"):
                read(str(odd_paths[name]))


@pytest.mark.slow
def test_a_checkpoint_that_is_a_named_pipe_is_refused_not_waited_on(sgd_run, tiny_data, tmp_path):
    os.symlink(sgd_run / "0.pt", tmp_path / "0.pt")
    os.mkfifo(tmp_path / "1.pt")
    proc = run("train_twa.py", *common(tiny_data, tmp_path, "--params_end", 2), check=False)
    assert proc.returncode == 2 and "1.pt is a named pipe, not a file or folder" in proc.stderr


@pytest.mark.slow
def test_an_output_no_file_can_replace_is_refused_before_the_training(sgd_run, tiny_data, tmp_path):
    os.makedirs(tmp_path / "out" / "twa.pt")
    proc = run("train_twa.py", *common(tiny_data, sgd_run, "--params_end", 2, "--overwrite",
                                       "--output-dir", tmp_path / "out", "--log-dir", tmp_path / "out"),
               check=False)
    assert proc.returncode == 2 and "twa.pt: it is a folder, not a regular file" in proc.stderr
    assert "subspace:" not in (tmp_path / "out" / "log.log").read_text()  # before the basis


def test_a_lock_file_that_is_no_regular_file_is_one_line(odd_paths, tmp_path):
    os.mkfifo(tmp_path / ".twa-lock")
    with pytest.raises(cli.UsageError, match=r"\.twa-lock: it is a named pipe"):
        runfiles.FolderLock([tmp_path])


@pytest.mark.slow
def test_a_recorded_split_that_holds_out_every_image_is_refused(sgd_run, tiny_data, tmp_path):
    (tmp_path / "split.json").write_text(json.dumps({"examples": 48, "percent": 100, "seed": 0,
                                                     "held_out": list(range(48))}))
    proc = run("train_twa.py", *common(tiny_data, sgd_run, "--params_end", 2, "--split",
                                       tmp_path / "split.json", "--output-dir", tmp_path / "out"),
               check=False)
    assert proc.returncode == 2 and "holds out all 48 training images" in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "twa.pt").exists()


def resume_state(args, world=1):
    return {"args": vars(args), "progress": {"epoch": 0, "batch": 0},
            "rng": [{"cpu": torch.get_rng_state(), "cuda": None}] * world}


@pytest.mark.parametrize("script,flag,value,saved,now", [
    (train_sgd, "--amp", [], "False", "True"),
    (train_sgd, "--fsdp", [], "False", "True"),
    (train_sgd, "--channels-last", [], "False", "True"),
    (train_sgd, "--loader", ["torchvision"], "memory", "torchvision"),
    (train_sgd, "--train-subset", ["40"], "0", "40"),
    (train_twa, "--amp", [], "False", "True"),
    (train_twa, "--fsdp", [], "False", "True"),
    (train_twa, "--bn", ["running", "recompute"], "recompute", "running recompute"),
])
def test_a_resume_names_a_flag_that_changes_the_numerics(script, flag, value, saved, now):
    base = ["--params_end", "3"] if script is train_twa else []
    old, new = script.parse_args(base), script.parse_args([*base, flag, *value])
    with pytest.raises(cli.UsageError, match=f"was saved with {flag} {saved}, not {now}") as err:
        cli.check_resume(resume_state(old), new, script.SHAPING, "state.pt", new.epochs, 1)
    assert len(str(err.value).splitlines()) == 1


def test_a_resume_names_another_number_of_processes():
    args = train_sgd.parse_args([])
    cli.check_resume(resume_state(args, world=2), args, train_sgd.SHAPING, "state.pt", 1, 2)
    for saved, now in ((2, 1), (1, 4)):
        with pytest.raises(cli.UsageError, match=f"saved by {saved} processes, not {now}"):
            cli.check_resume(resume_state(args, saved), args, train_sgd.SHAPING, "state.pt", 1, now)
    legacy = {**resume_state(args), "rng": torch.get_rng_state()}  # one CPU state: one process
    cli.check_resume(legacy, args, train_sgd.SHAPING, "state.pt", 1, 1)
