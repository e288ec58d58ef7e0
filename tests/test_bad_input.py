"""Bad input is one line on stderr and exit code 2, before any long work (what is found only
mid-run, such as weights that turn non-finite, exit code 1): flags outside their range, files and
folders that are not what they claim to be, data trees the loader would misread, a folder another
run holds, and resumes of another script's state, under other flags or on other data. Input that is
odd but valid (a path that is not UTF-8, grayscale images among RGB ones) is accepted."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import models
import runfiles
import train_sgd
import train_twa
from conftest import ROOT, write_image_folder
from test_cli import common, run


def refused(main, argv, capsys, *phrases, code=2):
    """main(argv) stops with `code` and one line on stderr holding every phrase; returns it."""
    with pytest.raises(SystemExit) as stopped:
        cli.run_main(main, [*map(str, argv), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == code and len(err) == 1 and err[0].startswith("error: "), err
    assert all(phrase in err[0] for phrase in phrases), err
    return err[0]


def copy_run(folder, to, manifest=True):
    """A copy of a finished run's folder, without its lock (and, if asked, its manifest)."""
    shutil.copytree(folder, to, ignore=shutil.ignore_patterns(".twa-lock"))
    if not manifest:
        os.remove(os.path.join(to, runfiles.Manifest.FILE))
    return to


def edit_checkpoint(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


# --- flags outside their range -------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--epochs", 0], "--epochs must be positive"),
    (["-b", -1], "must be positive"),
    (["--eval-every", 0], "--eval-every must be positive"),
    (["--dist-timeout", 0], "--dist-timeout"),
    (["--label-smoothing", 1.5], "--label-smoothing"),
    (["--val-split", 100], "--val-split"),
    (["--val-split", 0.01], "--val-split"),  # of 48 images: none held out
    (["--train-subset", 10_000], "exceeds"),
    (["--randomseed", -5], "--randomseed"),
    (["--split-seed", 2 ** 70], "--split-seed"),
    (["--workers", -1], "--workers"),
    (["--threads", -1], "--threads"),
    (["--twa-at", 5], "--twa-at must lie in [1, --epochs]"),
])
def test_a_train_sgd_flag_outside_its_range_is_one_line(extra, message, tiny_data, tmp_path, capsys):
    refused(train_sgd.main, [*common(tiny_data, tmp_path / "run"), "--epochs", 1, *extra], capsys,
            message)
    assert not (tmp_path / "run" / "0.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--tol", "inf"], "finite"),
    (["--tol", -1], "--tol must lie in (0, 1)"),
    (["--warmup-epochs", "nan"], "finite"),
    (["--params_start", -2], "range"),
    (["--layer-size", -1], "--layer-size"),
    (["--extract", "PCA", "--n_components", 0], "--n_components"),
    (["--resume", "--overwrite"], "--overwrite"),
    (["--checkpoints", "/nowhere/*.pt", "--val-split", 10], "matches no file"),
])
def test_a_train_twa_flag_outside_its_range_is_one_line(extra, message, sgd_checkpoints, tiny_data,
                                                         tmp_path, capsys):
    out = tmp_path / "out"
    refused(train_twa.main, [*common(tiny_data, sgd_checkpoints, "--params_end", 5, "--epochs", 1,
                                     "--output-dir", out, "--log-dir", out), *extra], capsys, message)
    assert not (out / "twa.pt").exists()


def test_a_choice_that_is_not_offered_is_argparses_usage_error(sgd_checkpoints, tiny_data, tmp_path,
                                                               capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.run_main(train_twa.main, [*map(str, common(tiny_data, sgd_checkpoints, "--params_end", 5,
                                                       "--pbits", 3, "--output-dir", tmp_path))])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "--pbits" in err.strip().splitlines()[-1], err
    assert err.startswith("usage:") and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU")
def test_cuda_without_a_gpu_is_one_line(tiny_data, tmp_path, capsys):
    refused(train_sgd.main, [*common(tiny_data, tmp_path), "--epochs", 1, "--device", "cuda"], capsys,
            "cuda")


# --- folders and files that are not what they claim ----------------------------------------------

def test_folders_that_cannot_be_written_are_one_line_before_any_work(sgd_checkpoints, tiny_data,
                                                                      tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    sgd = [*common(tiny_data, tmp_path / "run"), "--epochs", 1]
    refused(train_sgd.main, [*sgd, "--log-dir", tmp_path / "a-file" / "logs"], capsys, "cannot write to")
    refused(train_sgd.main, [*sgd, "--log-dir", tmp_path / "a-file"], capsys, "cannot write")
    refused(train_sgd.main, [*common(tiny_data, tmp_path / ("x" * 300)), "--epochs", 1], capsys,
            "cannot write")
    refused(train_twa.main, [*common(tiny_data, sgd_checkpoints, "--params_end", 5, "--output-dir",
                                     tmp_path / "a-file" / "out")], capsys, "cannot write to")
    assert not (tmp_path / "run" / "0.pt").exists()


HOLD_LOCK = """
import fcntl, sys
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.write("pid 1 on elsewhere: train_twa.py\\n")
handle.flush()
print("held", flush=True)
sys.stdin.read()
"""


def test_an_output_folder_another_run_holds_is_one_line_naming_it(sgd_checkpoints, tiny_data,
                                                                   tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".twa-lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused(train_twa.main, [*common(tiny_data, sgd_checkpoints, "--params_end", 5,
                                         "--output-dir", out, "--log-dir", out)], capsys,
                "in use by another run (pid 1 on elsewhere")
    finally:
        holder.communicate("", timeout=60)
    assert not (out / "twa_args.json").exists()


def test_bad_checkpoint_files_are_one_line_naming_them(sgd_checkpoints, tiny_data, tmp_path, capsys):
    def twa_on(folder, *extra):
        return refused(train_twa.main, [*common(tiny_data, folder, "--params_end", 5, "--epochs", 1,
                                                "--output-dir", tmp_path / "out", *extra)], capsys)
    listed = copy_run(sgd_checkpoints, tmp_path / "listed")
    (listed / "checkpoints.json").write_text("{not json")
    assert "cannot read the checkpoint manifest" in twa_on(listed)
    empty = copy_run(sgd_checkpoints, tmp_path / "empty")
    (empty / "2.pt").write_bytes(b"")
    assert str(empty / "2.pt") in twa_on(empty)
    other = tmp_path / "resnet32.pt"
    torch.save(models.ARCHS["resnet32"](num_classes=3).state_dict(), other)
    assert str(other) in twa_on(sgd_checkpoints, "--checkpoints", sgd_checkpoints / "1.pt", other,
                                "--val-split", 20)
    assert not (tmp_path / "out" / "twa.pt").exists()


def test_an_init_that_is_no_checkpoint_of_the_model_is_one_line(sgd_checkpoints, tiny_data, tmp_path,
                                                                capsys):
    flags = [*common(tiny_data, tmp_path / "run"), "--epochs", 1]
    refused(train_sgd.main, [*flags, "--init", tmp_path], capsys, str(tmp_path), "not a checkpoint")
    refused(train_sgd.main, [*flags, "--init", sgd_checkpoints / "1.pt", "--arch", "resnet32"], capsys,
            "resnet32")


def test_an_init_holding_inf_stops_the_run_before_it_saves_anything(sgd_checkpoints, tiny_data,
                                                                     tmp_path, capsys):
    edit = copy_run(sgd_checkpoints, tmp_path / "ck")
    edit_checkpoint(edit / "1.pt", lambda s: s["fc.weight"].__setitem__((0, 0), float("inf")))
    refused(train_sgd.main, [*common(tiny_data, tmp_path / "run"), "--epochs", 1, "--init",
                             edit / "1.pt"], capsys, "non-finite", code=1)
    # nothing was saved: the folder takes a fresh run (it is not "holding checkpoints")
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith((".pt", ".tmp"))]


# --- data trees the loader would misread ---------------------------------------------------------

def test_data_trees_of_the_wrong_shape_are_one_line(tiny_data, tmp_path, capsys):
    def sgd_on(tree, *phrases):
        return refused(train_sgd.main, [*common(tree, tmp_path / "run"), "--epochs", 1], capsys,
                       *phrases)
    (tmp_path / "a-file").write_text("")
    sgd_on(tmp_path / "a-file", str(tmp_path / "a-file"))
    sizes = shutil.copytree(tiny_data, tmp_path / "sizes")
    Image.new("RGB", (28, 28)).save(sizes / "train" / "circle" / "odd.png")
    sgd_on(sizes, "differ in size")
    no_test = shutil.copytree(tiny_data, tmp_path / "no-test")
    shutil.rmtree(no_test / "test")
    sgd_on(no_test, "must hold train/")
    empty_class = shutil.copytree(tiny_data, tmp_path / "empty-class")
    os.makedirs(empty_class / "train" / "zebra")
    sgd_on(empty_class)
    unknown = shutil.copytree(tiny_data, tmp_path / "unknown")
    shutil.copytree(unknown / "test" / "circle", unknown / "test" / "zebra")
    sgd_on(unknown, "different class folders")
    first = shutil.copytree(tiny_data, tmp_path / "first")
    with open(first / "train" / "circle" / "0000.png", "r+b") as f:
        f.truncate(100)  # the first image, which the others' size is checked against
    sgd_on(first, "cannot decode image", str(first / "train" / "circle" / "0000.png"))
    assert not (tmp_path / "run" / "0.pt").exists()


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


def test_grayscale_and_rgba_images_among_rgb_ones_are_read_as_rgb(tmp_path):
    tree = write_image_folder(str(tmp_path / "tree"), per_class=2, size=8)
    Image.new("L", (8, 8), 90).save(os.path.join(tree, "train", "circle", "gray.png"))
    Image.new("RGBA", (8, 8), (10, 200, 30, 128)).save(os.path.join(tree, "train", "square", "rgba.png"))
    images, labels, _ = data.decoded_image_folder(os.path.join(tree, "train"),
                                                  cache_dir=str(tmp_path / "cache"))
    assert images.shape == (8, 3, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert (images[2] == 90).all()  # sorted by name: 0000, 0001, gray; 0000, 0001, rgba; ...
    assert images[5].tolist() == [[[10] * 8] * 8, [[200] * 8] * 8, [[30] * 8] * 8]  # alpha dropped


def test_a_save_path_that_is_not_utf8_is_written_escaped_in_the_lock_and_log(tiny_data, tmp_path):
    save = os.path.join(tmp_path, b"run-\xfe".decode("utf-8", "surrogateescape"))
    args = [sys.executable, os.path.join(ROOT, "train_sgd.py"),
            *map(str, common(tiny_data, save, "--epochs", 1, "--train-subset", 16)), "--quiet"]
    proc = subprocess.run([os.fsencode(a) for a in args], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"Logging error" not in proc.stderr
    assert "run-\\udcfe" in open(os.path.join(save, "log.log"), encoding="utf-8").read()


@pytest.mark.slow
def test_bad_files_and_folders_are_one_line_before_the_basis(sgd_checkpoints, tiny_data, tmp_path):
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
        shutil.copy(sgd_checkpoints / f"{i}.pt", bad / f"{i}.pt")
    state = torch.load(bad / "1.pt", weights_only=True)
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, bad / "1.pt")
    assert f"{bad / '1.pt'}: 'conv1.weight' holds NaN or Inf values" in twa_on(bad)
    state["conv1.weight"] = "not a tensor"
    torch.save(state, bad / "1.pt")
    assert f"{bad / '1.pt'}: 'conv1.weight' is a str, not a tensor" in twa_on(bad)
    (tmp_path / "a-file").write_text("")
    assert "cannot write to" in twa_on(sgd_checkpoints, "--log-dir", tmp_path / "a-file" / "logs")
    for split in ({"examples": 48, "percent": 10, "seed": 0, "held_out": []},
                  {"examples": 48, "percent": 10, "seed": 0, "held_out": "0,1,2"},
                  {"examples": "48", "percent": 10, "seed": 0, "held_out": [1, 2]},
                  {"examples": 48, "percent": 10, "seed": 0, "held_out": [1, 1]}):
        (tmp_path / "split.json").write_text(json.dumps(split))
        assert "cannot read the split" in twa_on(sgd_checkpoints, "--split", tmp_path / "split.json",
                                                 "--val-split", 10)


# --- resumes of something else ---------------------------------------------------------------------

def test_a_resume_state_that_is_not_this_scripts_is_one_line(sgd_checkpoints, tiny_data, tmp_path,
                                                             capsys):
    folder = copy_run(sgd_checkpoints, tmp_path / "run")
    flags = [*common(tiny_data, folder), "--epochs", 2, "--save-every", 2, "--resume"]
    shutil.copy(folder / "1.pt", folder / "state.pt")  # a checkpoint: weights, no progress
    refused(train_sgd.main, flags, capsys, str(folder / "state.pt"))
    shutil.copy(sgd_checkpoints / "state.pt", folder / "state.pt")
    with open(folder / "state.pt", "r+b") as f:
        f.truncate(1000)
    refused(train_sgd.main, flags, capsys, str(folder / "state.pt"))
    twa_state = torch.load(sgd_checkpoints / "state.pt", weights_only=True)
    twa_state["args"] = vars(train_twa.parse_args(["--params_end", "5"]))  # train_twa's flags
    torch.save(twa_state, folder / "state.pt")
    refused(train_sgd.main, flags, capsys, "was saved with")


def test_a_resume_over_a_torn_metrics_file_names_its_line(sgd_checkpoints, tiny_data, tmp_path,
                                                         capsys):
    folder = copy_run(sgd_checkpoints, tmp_path / "run")
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("{half a row\n")
    refused(train_sgd.main, [*common(tiny_data, folder), "--epochs", 2, "--save-every", 2,
                             "--resume"], capsys, "metrics.jsonl line 3 is not JSON")


def test_twa_resume_refuses_checkpoints_replaced_under_the_same_names(sgd_checkpoints, tiny_data,
                                                                      tmp_path):
    copy_run(sgd_checkpoints, tmp_path / "ck")
    flags = ["--params_end", 5, "--epochs", 1, "--output-dir", tmp_path / "out"]
    run("train_twa.py", *common(tiny_data, tmp_path / "ck", *flags))
    os.remove(tmp_path / "ck" / runfiles.Manifest.FILE)  # replaced with their manifest: as good
    edit_checkpoint(tmp_path / "ck" / "2.pt", lambda s: s["fc.bias"].add_(1.0))
    proc = run("train_twa.py", *common(tiny_data, tmp_path / "ck", *flags, "--resume"), check=False)
    assert proc.returncode == 2 and "saved for other checkpoint contents" in proc.stderr, proc.stderr


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


def test_an_empty_resume_state_is_one_line(sgd_checkpoints, tiny_data, tmp_path):
    flags = common(tiny_data, sgd_checkpoints, "--params_end", 3, "--epochs", 1, "--output-dir", tmp_path)
    open(tmp_path / "twa_state.pt", "w").close()
    proc = run("train_twa.py", *flags, "--resume", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot load {tmp_path / 'twa_state.pt'}")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_finished_twa_folder_is_replaced_only_with_overwrite(sgd_checkpoints, tiny_data, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    flags = common(tiny_data, sgd_checkpoints, "--params_end", 5, "--epochs", 1, "--output-dir", out,
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
