"""The scripts end to end on a tiny ImageFolder tree, their resume paths and their bad-input errors."""
import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_sgd
import train_twa
import cli
import loop
import runfiles
import stage
from conftest import ROOT, write_image_folder
from test_twa import RunsCode

pytestmark = pytest.mark.slow  # every test here runs the scripts end to end


def run(script, *args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def common(data, save_dir, *extra):
    return ["--datasets", "ImageFolder", "--data-dir", data, "--arch", "resnet20", "-b", "8",
            "--save-dir", save_dir, "--print-freq", "2", *extra]


@pytest.fixture(scope="module")
def sgd_run(tiny_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("sgd")
    run("train_sgd.py", *common(tiny_data, save, "--epochs", "2", "--save-every", "2"))
    return save


def test_sgd_writes_checkpoints_state_and_metrics(sgd_run):
    names = sorted(os.listdir(sgd_run))
    assert {"0.pt", "1.pt", "2.pt", "3.pt", "4.pt", "state.pt", "metrics.jsonl", "log.log",
            "sgd_args.json"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp")]
    state = torch.load(sgd_run / "4.pt", weights_only=True)
    assert "conv1.weight" in state and "bn1.running_mean" in state  # plain state_dict with buffers
    rows = [json.loads(line) for line in open(sgd_run / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["stage"] == "sgd" for r in rows)


def test_twa_writes_weights_coefficients_and_results(sgd_run):
    run("train_twa.py", *common(_data_of(sgd_run), sgd_run,
                                "--epochs", "2", "--lr", "0.5", "--params_end", "5"))
    coefficients = json.load(open(sgd_run / "coefficients.json"))
    assert coefficients["checkpoints"] == [f"{i}.pt" for i in range(5)]
    results = json.load(open(sgd_run / "twa_results.json"))
    assert results["basis"]["rank"] == 5 and results["basis"]["orthogonality_error"] <= 1e-5
    assert 0 <= results["swa"]["accuracy"] <= 100 and 0 <= results["twa"]["accuracy"] <= 100
    # the saved alpha reproduces the saved weights
    final = torch.load(sgd_run / "twa.pt", weights_only=True)
    checkpoints = [torch.load(sgd_run / f"{i}.pt", weights_only=True) for i in range(5)]
    alpha = torch.tensor(coefficients["alpha"], dtype=torch.float64)
    for name in [k for k in final if "running_" not in k and "num_batches" not in k]:
        mixed = sum(a * c[name].double() for a, c in zip(alpha, checkpoints))
        assert (mixed - final[name].double()).norm() <= 1e-5 * final[name].double().norm() + 1e-7
    rows = [json.loads(line) for line in open(sgd_run / "metrics.jsonl")]
    assert [r["stage"] for r in rows] == ["sgd", "sgd", "twa", "twa"]  # both scripts' rows kept


def _data_of(save_dir):
    return json.load(open(save_dir / "sgd_args.json"))["args"]["data_dir"]


def test_twa_reads_dataparallel_checkpoints(sgd_run, tmp_path):
    for i in range(3):
        state = torch.load(sgd_run / f"{i}.pt", weights_only=True)
        torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / f"{i}.pt")
    # --resume where a run was killed before its first state: it starts afresh
    proc = run("train_twa.py", *common(_data_of(sgd_run), tmp_path, "--epochs", "1", "--params_end",
                                       "3", "--train_start", "1", "--resume"))
    assert (tmp_path / "twa.pt").exists() and "starting afresh" in proc.stdout


def test_pca_low_precision_stride_and_output_dir(sgd_run, tmp_path):
    out = tmp_path / "out"
    run("train_twa.py", *common(_data_of(sgd_run), sgd_run, "--epochs", "1", "--params_end", "5",
                                "--params_stride", "2", "--extract", "PCA", "--n_components", "2",
                                "--bits", "8", "--output-dir", out, "--log-dir", out))
    results = json.load(open(out / "twa_results.json"))
    assert results["basis"]["rank"] == 2 and results["basis"]["bits"] == 8
    coefficients = json.load(open(out / "coefficients.json"))
    assert coefficients["checkpoints"] == ["0.pt", "2.pt", "4.pt"]
    assert (out / "twa.pt").exists()


def test_sgd_branches_from_a_checkpoint(sgd_run, tmp_path):
    run("train_sgd.py", *common(_data_of(sgd_run), tmp_path, "--epochs", "1", "--init",
                                sgd_run / "2.pt", "--schedule", "constant", "--lr", "0.05"))
    start = torch.load(sgd_run / "2.pt", weights_only=True)
    branch = torch.load(tmp_path / "0.pt", weights_only=True)
    assert all(torch.equal(start[k], branch[k]) for k in start)


def final_weights(path):
    return torch.load(path, weights_only=True)


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def start(script, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sgd_interrupted_and_resumed_equals_uninterrupted(tiny_data, tmp_path):
    flags = ["--epochs", "4", "--save-every", "3", "--deterministic"]
    run("train_sgd.py", *common(tiny_data, tmp_path / "full", *flags))
    proc = start("train_sgd.py", *common(tiny_data, tmp_path / "cut", *flags))
    wait_for(tmp_path / "cut" / "2.pt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    assert not (tmp_path / "cut" / "12.pt").exists()
    run("train_sgd.py", *common(tiny_data, tmp_path / "cut", *flags, "--resume"))
    for i in range(13):
        a, b = final_weights(tmp_path / "full" / f"{i}.pt"), final_weights(tmp_path / "cut" / f"{i}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), f"{i}.pt differs"
    rows = [json.loads(line)["epoch"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert rows == [1, 2, 3, 4]


def test_sgd_killed_leaves_no_torn_file_and_resumes(tiny_data, tmp_path):
    flags = ["--epochs", "3", "--save-every", "6"]
    proc = start("train_sgd.py", *common(tiny_data, tmp_path, *flags))
    wait_for(tmp_path / "3.pt")
    proc.kill()
    proc.wait()
    for name in os.listdir(tmp_path):
        if name.endswith(".pt"):
            torch.load(tmp_path / name, weights_only=True)  # every visible file is whole
    run("train_sgd.py", *common(tiny_data, tmp_path, *flags, "--resume"))
    assert (tmp_path / "18.pt").exists()


def test_twa_interrupted_and_resumed_equals_uninterrupted(sgd_run, tmp_path):
    data = _data_of(sgd_run)
    flags = ["--epochs", "6", "--params_end", "5", "--lr", "0.2", "--deterministic"]
    for name in ("full", "cut"):
        os.makedirs(tmp_path / name)
        for i in range(5):
            os.link(sgd_run / f"{i}.pt", tmp_path / name / f"{i}.pt")
    run("train_twa.py", *common(data, tmp_path / "full", *flags))
    proc = start("train_twa.py", *common(data, tmp_path / "cut", *flags))
    wait_for(tmp_path / "cut" / "twa_state.pt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    run("train_twa.py", *common(data, tmp_path / "cut", *flags, "--resume"))
    a, b = final_weights(tmp_path / "full" / "twa.pt"), final_weights(tmp_path / "cut" / "twa.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def expect_usage_error(main, argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main, [*map(str, argv), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_sgd_inputs(tiny_data, tmp_path, capsys):
    base = common(tiny_data, tmp_path / "run")
    cases = [
        (["--arch", "resnet21"], "unknown --arch 'resnet21'; choose one of:"),
        (["--datasets", "MNIST"], "unknown --datasets 'MNIST'; choose one of: CIFAR10"),
        (["--lr", "-0.1"], "--lr must be positive"),
        (["-b", "0"], "--batch-size must be positive"),
        (["--data-dir", tmp_path / "nowhere"], "does not exist"),
        (["--save-every", "1000"], "exceeds the"),
        (["--resume"], "file not found"),
        (["--cuda-graphs"], "--cuda-graphs captures the compiled step: add --compile"),
    ]
    for extra, message in cases:
        expect_usage_error(train_sgd.main, [*base, "--epochs", "1", *extra], capsys, message)
    empty = tmp_path / "empty"
    os.makedirs(empty / "train" / "a")
    os.makedirs(empty / "test" / "a")
    expect_usage_error(train_sgd.main, [*common(empty, tmp_path / "e"), "--epochs", "1"], capsys,
                       "no images found")


def test_bad_twa_inputs(sgd_run, tmp_path, capsys):
    base = common(_data_of(sgd_run), sgd_run)
    cases = [
        (["--params_start", "3", "--params_end", "3"], "empty or reversed checkpoint range [3, 3)"),
        (["--params_start", "4", "--params_end", "2"], "empty or reversed"),
        (["--params_end", "9"], f"checkpoint not found: {sgd_run / '5.pt'}"),
        (["--params_end", "1000000000"], "checkpoint not found"),  # not a billion paths first
        (["--params_end", "4", "--train_start", "4"], "--train_start 4 is outside [0, 4) step 1"),
        (["--params_stride", "0"], "--params_stride must be positive"),
        (["--extract", "PCA", "--params_end", "4"], "--extract PCA needs --n_components in [1, 4]"),
        (["--lr", "0"], "--lr must be positive"),
        (["--fsdp-keep-gathered"], "--fsdp-keep-gathered needs --fsdp"),
    ]
    for extra, message in cases:
        expect_usage_error(train_twa.main, [*base, *extra], capsys, message)
    # a truncated checkpoint, and checkpoints of another architecture
    broken = tmp_path / "broken"
    os.makedirs(broken)
    data = open(sgd_run / "1.pt", "rb").read()
    os.link(sgd_run / "0.pt", broken / "0.pt")
    open(broken / "1.pt", "wb").write(data[:1000])
    expect_usage_error(train_twa.main, [*common(_data_of(sgd_run), broken), "--params_end", "2"],
                       capsys, f"checkpoint {broken / '1.pt'} is truncated or corrupt")
    two_classes = write_image_folder(str(tmp_path / "two"), per_class=4, classes=("a", "b"))
    out = ["--output-dir", tmp_path / "out", "--log-dir", tmp_path / "out"]  # sgd_run holds a TWA run
    expect_usage_error(train_twa.main, [*common(two_classes, sgd_run, *out), "--params_end", "2"],
                       capsys, "'fc.weight' has shape (3, 64), the model (2, 64)")
    unsafe = tmp_path / "unsafe"
    os.makedirs(unsafe)
    torch.save({"w": torch.zeros(1), "code": RunsCode(str(tmp_path / "ran"))}, unsafe / "0.pt")
    expect_usage_error(train_twa.main, [*common(_data_of(sgd_run), unsafe), "--params_end", "1"],
                       capsys, "refusing to load")
    assert not (tmp_path / "ran").exists()
    expect_usage_error(train_twa.main, [*base, *out, "--params_end", "2", "--arch", "resnet32"], capsys,
                       f"{sgd_run / '0.pt'} does not match --arch resnet32 on ImageFolder: 72 missing")


def test_non_finite_loss_stops_with_the_step(tiny_data, tmp_path):
    proc = run("train_sgd.py", *common(tiny_data, tmp_path, "--epochs", "2", "--lr", "1e30"),
               check=False)
    assert proc.returncode == 1
    assert "non-finite loss in epoch 0 by step" in proc.stderr
    assert not (tmp_path / "1.pt").exists()


def test_existing_run_is_not_overwritten(sgd_run, capsys):
    before = os.path.getmtime(sgd_run / "0.pt")
    expect_usage_error(train_sgd.main, [*common(_data_of(sgd_run), sgd_run), "--epochs", "1"], capsys,
                       "already holds checkpoints")
    assert os.path.getmtime(sgd_run / "0.pt") == before


def test_help_explains_every_flag():
    for script in ("train_sgd.py", "train_twa.py"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"],
                             capture_output=True, text=True, check=True).stdout
        for flag in ("--datasets", "--arch", "--epochs", "--lr", "--wd", "--save-dir", "--resume",
                     "--device", "--randomseed", "--workers", "--print-freq", "--log-name"):
            assert flag in out, (script, flag)


def test_non_finite_values_are_refused_up_front_and_never_saved(tiny_data, tmp_path):
    for flag in ("--momentum", "--lr", "--wd"):
        bad = run("train_sgd.py", *common(tiny_data, tmp_path / "nan", flag, "nan"), check=False)
        assert bad.returncode == 2 and "finite" in bad.stderr, (flag, bad.stderr[-300:])
    bogus = run("train_sgd.py", *common(tiny_data, tmp_path / "dev", "--device", "bogus"), check=False)
    assert bogus.returncode == 2 and "not a device" in bogus.stderr
    blown = run("train_sgd.py", *common(tiny_data, tmp_path / "blow", "--epochs", 2, "--lr", 1e4,
                                        "--schedule", "constant", "--save-every", 6), check=False)
    assert blown.returncode == 1
    for name in os.listdir(tmp_path / "blow"):
        if name.endswith(".pt"):
            state = torch.load(tmp_path / "blow" / name, weights_only=True)
            tensors = state["model"].values() if name == "state.pt" else state.values()
            assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), name


def test_a_second_run_into_a_busy_folder_stops_naming_the_first(tiny_data, tmp_path):
    first = start("train_sgd.py", *common(tiny_data, tmp_path / "run", "--epochs", 50))
    wait_for(tmp_path / "run" / "0.pt")
    # with or without --resume, and whatever the first has written yet (the lock comes before the
    # resume state is read): the folder is busy, not "holding checkpoints"
    second = [run("train_sgd.py", *common(tiny_data, tmp_path / "run", "--epochs", 50, *resume),
                  check=False) for resume in (["--resume"], [])]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM
    for refused in second:
        assert refused.returncode == 2 and f"in use by another run (pid {first.pid}" in refused.stderr
    (tmp_path / "a-file").write_text("")  # a folder that cannot be made, even by root
    denied = run("train_sgd.py", *common(tiny_data, tmp_path / "a-file" / "run"), check=False)
    assert denied.returncode == 2 and "cannot write to" in denied.stderr


def test_resume_names_the_first_changed_flag_before_any_work(sgd_run, tiny_data, tmp_path):
    run("train_sgd.py", *common(tiny_data, tmp_path / "a", "--epochs", 1))
    for flag, value in (("-b", 4), ("--lr", 0.2), ("--randomseed", 7), ("--arch", "resnet32")):
        proc = run("train_sgd.py", *common(tiny_data, tmp_path / "a", "--epochs", 1, flag, value,
                                           "--resume"), check=False)
        assert proc.returncode == 2 and "was saved with --" in proc.stderr, (flag, proc.stderr[-300:])
    state = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    state["progress"]["epoch"] = -3
    torch.save(state, tmp_path / "a" / "state.pt")
    proc = run("train_sgd.py", *common(tiny_data, tmp_path / "a", "--epochs", 1, "--resume"),
               check=False)
    assert proc.returncode == 2 and "impossible counters" in proc.stderr
    torch.save([1, 2], tmp_path / "a" / "state.pt")
    proc = run("train_sgd.py", *common(tiny_data, tmp_path / "a", "--epochs", 1, "--resume"),
               check=False)
    assert proc.returncode == 2 and "not a resume state" in proc.stderr
    twa_out = tmp_path / "twa"
    run("train_twa.py", *common(_data_of(sgd_run), sgd_run, "--params_end", 5, "--epochs", 1,
                                "--output-dir", twa_out, "--log-dir", twa_out))
    proc = run("train_twa.py", *common(_data_of(sgd_run), sgd_run, "--params_end", 5, "--epochs", 1,
                                       "--output-dir", twa_out, "--log-dir", twa_out, "--opt",
                                       "AdamW", "--lr", 2, "--resume"), check=False)
    assert proc.returncode == 2 and "--opt SGD, not AdamW" in proc.stderr


def test_a_full_disk_is_one_line_and_leaves_no_torn_file(tiny_data, tmp_path):
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sgd.py"),
                           *map(str, common(tiny_data, tmp_path / "full", "--epochs", 3, "--twa-at", 2,
                                            "--record-every", 2)), "--quiet"],
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot write"), proc.stderr[-500:]
    assert not [n for n in os.listdir(tmp_path / "full") if n.endswith((".pt", ".tmp"))]


def test_each_stage_reads_its_own_flags_through_typed_settings():
    """train_sgd --twa-at's TWA stage reads --twa-epochs, --twa-lr, --twa-wd, --twa-schedule and
    --twa-opt, not the SGD stage's values of the same names; train_twa's reads its own flags."""
    sgd = train_sgd.parse_args(["--epochs", "6", "--lr", "0.1", "--wd", "5e-4", "--twa-at", "3",
                                "--twa-epochs", "2", "--twa-lr", "0.3", "--twa-wd", "1e-5",
                                "--twa-schedule", "cosine", "-p", "7", "--save-dir", "s"])
    assert loop.LoopSettings.from_flags(sgd) == loop.LoopSettings(epochs=6, lr=0.1, print_freq=7,
                                                                   quiet=False)
    online = stage.TWASettings.of_train_sgd(sgd)
    assert (online.loop.epochs, online.loop.lr, online.weight_decay, online.schedule, online.opt,
            online.output_dir, online.bn) == (2, 0.3, 1e-5, "cosine", "SGD", "s", ("recompute",))
    assert online.flags["epochs"] == 6 and not online.named_checkpoints
    files = train_twa.parse_args(["--epochs", "4", "--lr", "1.5", "--wd", "2e-5", "--params_start",
                                  "0", "--params_end", "3", "--bn", "running", "recompute"])
    offline = stage.TWASettings.of_train_twa(files)
    assert (offline.loop.epochs, offline.loop.lr, offline.weight_decay, offline.bn) == \
        (4, 1.5, 2e-5, ("running", "recompute"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        offline.loop.epochs = 5


def test_a_resume_with_another_optimizer_names_it_not_the_rate_it_implies():
    saved = train_twa.parse_args(["--params_end", "3"])
    other = train_twa.parse_args(["--params_end", "3", "--opt", "AdamW"])  # --lr's default follows
    state = {"args": vars(saved), "progress": {"epoch": 0, "batch": 0}}
    with pytest.raises(cli.UsageError, match="--opt SGD, not AdamW"):
        cli.check_resume(state, other, train_twa.SHAPING, "twa_state.pt", other.epochs, 1)


def test_a_state_saved_under_the_reference_flag_names_resumes_under_the_new_ones():
    """--bits and --train were saved as pbits and coefficients: such a state resumes with equal
    values and is refused, naming the flag as it is spelt now, with other ones."""
    state = {"args": {"pbits": 8, "coefficients": "alpha"}, "progress": {"epoch": 1, "batch": 0},
             "rng": [torch.zeros(1)]}
    same = argparse.Namespace(bits=8, train="alpha")
    cli.check_resume(state, same, ("bits", "train"), "state.pt", epochs=2, world=1)
    with pytest.raises(runfiles.UsageError, match="was saved with --bits 8, not 4"):
        cli.check_resume(state, argparse.Namespace(bits=4, train="alpha"), ("bits", "train"),
                         "state.pt", epochs=2, world=1)
