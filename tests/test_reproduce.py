"""The reproduction pipeline end to end on the tiny tree (a smoke run, never the full table)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import packed_bits
import runfiles

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs the scripts end to end


def test_reproduce_pipeline_and_report(tiny_data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--quick", "--epochs", "4",
           "-b", "8", "--seed", "3", "--head-ends", "3", "--train-subset", "40", "--data-dir", tiny_data,
           "--out", tmp_path / "runs",
           "--results", tmp_path, "--allow-dirty"]
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, timeout=900)
    result = json.load(open(tmp_path / "reproduce-quick-seed3.json"))
    assert len(result["sgd"]["test_acc"]) == 4
    assert result["complete"]
    assert [h["twa_epochs"] for h in result["head"]] == [1, 2, 3, 2, 2]
    assert [h["n"] for h in result["head"]] == [9, 9, 9, 3, 13]  # 4 per epoch over epochs 0..2 (or 1); 0..3
    assert [h["sgd_epochs"] for h in result["head"]] == [2, 2, 2, 2, 3]
    assert [t["tail_lr"] for t in result["tail"]] == [0.05, 0.10]
    assert all(0 <= t["twa_acc"] <= 100 and len(t["alpha"]) == 1 for t in result["tail"])
    # a second call finds every step done and only rewrites the summary
    again = subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, timeout=300)
    assert "train_" not in again.stdout
    report = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name",
                             "reproduce-quick", "--results", str(tmp_path), "--test-images", "12"],
                            check=True, capture_output=True, text=True, timeout=300)  # 3 classes x 4
    assert "| SGD | 4 |" in report.stdout and "TWA - SWA" in report.stdout
    assert "| TWA, 13 ckpts, 2 ep, lr 2, 0.2 | 5 |" in report.stdout  # the rates that ran
    assert os.path.getsize(tmp_path / "reproduce-quick-accuracy.png") > 1000


def test_head_pipeline_records_paired_results(tiny_data, tmp_path):
    """bench/head.py at tiny size: every scored model's per-image bits, the revision, the commands,
    and report.py's paired intervals from them."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "head.py"), "--seed", "2", "--epochs", "3",
           "--twa-end", "1", "--per-epoch", "2", "--twa-epochs", "1", "-b", "8", "--data-dir", tiny_data,
           "--out", tmp_path / "runs", "--results", tmp_path, "--allow-dirty"]
    subprocess.run(list(map(str, cmd + ["--budget-matched"])), check=True, capture_output=True, text=True,
                   timeout=900)
    result = json.load(open(tmp_path / "head-paper-seed2.json"))
    assert result["complete"] and result["git"] and len(result["commands"]) == 4
    # SGD for the epochs TWA spends in all (1 + 1), on its own schedule
    assert result["sgd_matched"]["epochs"] == 2 and len(result["sgd_matched"]["test_acc"]) == 2
    assert "--epochs 2 --lr 0.1" in result["commands"][3] and result["sgd_matched"]["test_correct"][-1]
    assert "--schedule step-fraction" in result["commands"][1]
    # rerunnable from the repository root on any machine: relative paths, the data folder as given
    assert result["commands"][0].startswith("python train_sgd.py ") and ROOT not in result["commands"][0]
    assert f"--data-dir {tiny_data} " in result["commands"][0]
    assert result["invocations"][0]["command"].startswith("python bench/head.py --seed 2 ")
    assert result["invocations"][0]["threads"] >= 1
    assert [(h["n"], h["twa_epochs"]) for h in result["head"]] == [(2, 1), (3, 1)]
    assert all(h["wall_seconds"] > h["basis_seconds"] >= 0 for h in result["head"])  # the TWA arm's cost
    only = subprocess.run(list(map(str, cmd + ["--twa-per-epoch", "1", "--name", "head-sparse"])),
                          check=True, capture_output=True, text=True, timeout=900)
    sparse = json.load(open(tmp_path / "head-sparse-seed2.json"))
    assert [h["name"] for h in sparse["head"]] == ["twa-1pe-1ep"] and sparse["complete"], only.stdout
    refused = subprocess.run(list(map(str, cmd + ["--twa-per-epoch", "3"])), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "each --twa-per-epoch must divide --per-epoch (2)" in refused.stderr
    tests = 12  # the tiny tree's test images
    sgd = packed_bits.unpack_bits(result["sgd"]["test_correct"][-1], tests)
    assert 100 * sgd.mean() == pytest.approx(result["sgd"]["test_acc"][-1])
    for head in result["head"]:
        for mode in ("recompute", "running"):
            scored = head["twa"][mode]
            assert 100 * packed_bits.unpack_bits(scored["correct"], tests).mean() == pytest.approx(
                scored["accuracy"])
    report = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name",
                             "head-paper", "--results", str(tmp_path), "--test-images", str(tests)],
                            check=True, capture_output=True, text=True, timeout=300)
    assert "TWA, 3 ckpts, 1 ep, BN running - TWA, 3 ckpts, 1 ep, BN recompute" in report.stdout
    assert "TWA, 3 ckpts, 1 ep, BN recompute - TWA, 2 ckpts, 1 ep, BN recompute" in report.stdout
    assert "| 2 | TWA, 3 ckpts, 1 ep, BN recompute - SGD(2) |" in report.stdout  # the same epochs
    assert "| 2 | TWA, 3 ckpts, 1 ep, BN recompute - SGD(3) |" in report.stdout  # SGD(E)
    wrong = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name",
                            "head-paper", "--results", str(tmp_path), "--test-images", "100"],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1 and wrong.stdout == ""  # no half table before the error line
    assert "do not hold 100 flags" in wrong.stderr
    # another protocol on the same seed (here the same run renamed): every model paired by name
    json.dump(dict(result, name="head-other", sgd_wd=5e-4), open(tmp_path / "head-other-seed2.json", "w"))
    against = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name",
                              "head-other", "--against", "head-paper", "--results", str(tmp_path),
                              "--test-images", str(tests)], check=True, capture_output=True, text=True,
                             timeout=300)
    assert "head-other (SGD wd 0.0005) against head-paper (SGD wd 0.0001)" in against.stdout
    row = next(x for x in against.stdout.splitlines() if x.startswith("| 2 | TWA, 3 ckpts, 1 ep, BN running |"))
    assert row.endswith("| +0.00 [+0.00, +0.00] | matches | +0.00 [+0.00, +0.00] | matches |")
    assert "Over the seeds" not in against.stdout  # one seed: nothing to pool
    json.dump(dict(result, name="head-long", epochs=6, sgd=dict(
        result["sgd"], test_correct=result["sgd"]["test_correct"] * 2)), open(tmp_path / "head-long-seed2.json", "w"))
    longer = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name",
                             "head-long", "--against", "head-paper", "--results", str(tmp_path),
                             "--test-images", str(tests)],
                            capture_output=True, text=True, timeout=300)
    assert longer.returncode == 1 and longer.stderr.strip().splitlines() == [
        "--against pairs runs of one E: head-long ran 6 epochs, head-paper 3"]
    # a second seed on which the other protocol's TWA (BN running) gets every image right: the mean
    # over the two seeds is half that seed's difference, and so is the mean change of the gap
    running = next(h for h in result["head"] if h["n"] == 3)["twa"]["running"]
    gain = (100 - running["accuracy"]) / 2
    json.dump(dict(result, seed=3), open(tmp_path / "head-paper-seed3.json", "w"))
    better = json.loads(json.dumps(result))
    better_running = next(h for h in better["head"] if h["n"] == 3)["twa"]["running"]
    better_running["correct"] = packed_bits.pack_bits([1] * tests)
    json.dump(dict(better, name="head-other", sgd_wd=5e-4, seed=3),
              open(tmp_path / "head-other-seed3.json", "w"))
    cmd = [sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name", "head-paper", "--against",
           "head-other", "--results", str(tmp_path), "--test-images", str(tests)]
    over = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    row = next(x for x in over.splitlines() if x.startswith("| TWA, 3 ckpts, 1 ep, BN running | 2 |"))
    cells = [c.strip() for c in row.split("|")[3:9]]
    assert gain > 0
    assert all(cells[i].startswith(f"{-gain:+.2f} [") for i in (0, 2, 3, 5))  # the rule's, t's
    assert cells[1] in ("worse", "not settled") and cells[4] in ("worse", "not settled")
    assert "| SGD(3) | 2 | +0.00 [+0.00, +0.00] | matches | +0.00 [+0.00, +0.00] |  |  |  |" in over
    # seeds scored from other data folders: image i need not be the same image, so nothing pooled
    json.dump(dict(result, seed=3, data_dir="elsewhere"), open(tmp_path / "head-paper-seed3.json", "w"))
    over = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    row = next(x for x in over.splitlines() if x.startswith("| TWA, 3 ckpts, 1 ep, BN running | 2 |"))
    assert row.count("(other data folders)") == 2
    # seeds pooled from two names (a rerun adding a TWA length): NAME:SEEDS picks, rows any seed has
    longer_twa = json.loads(json.dumps(result))
    longer_twa["head"].append(dict(longer_twa["head"][-1], twa_epochs=2))
    json.dump(dict(longer_twa, name="head-more", seed=4), open(tmp_path / "head-more-seed4.json", "w"))
    report = [sys.executable, os.path.join(ROOT, "bench", "report.py"), "--results", str(tmp_path),
              "--test-images", str(tests), "--name"]
    pooled = subprocess.run(report + ["head-paper:2", "head-more"], check=True, capture_output=True,
                            text=True, timeout=300).stdout
    assert pooled.startswith("head-paper:2 + head-more: seeds 2, 4\n")
    assert "| TWA, 3 ckpts, 2 ep, BN recompute | 3 |" in pooled  # seed 4's model only
    assert "| 4 | TWA, 3 ckpts, 2 ep, BN recompute - TWA, 3 ckpts, 1 ep, BN recompute |" in pooled
    assert "| TWA, 3 ckpts, 1 ep, BN recompute - SGD(3) | 2 |" in pooled  # both seeds, over seeds
    for names, error in [(["head-paper", "head-paper:2"], "seed 2 is in more than one of"),
                         (["head-paper:2", "head-other:3"], "differ in sgd_wd"),
                         (["head-paper:5"], "no head-paper-seed5*.json in")]:
        refused = subprocess.run(report + names, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and refused.stdout == "" and error in refused.stderr


def test_head_twa_during_sgd_survives_a_sigterm_and_resumes(tiny_data, tmp_path):
    """bench/head.py --twa-during-sgd: TWA's result comes while SGD still runs; a second runner of
    the same name is refused; a SIGTERM to the runner then reaches SGD, which saves its state; the
    record keeps TWA and SGD's epochs so far; the next call resumes SGD alone and completes it."""
    epochs = 100  # tiny epochs take about 0.3 s: SGD outlasts TWA's start-up and epoch
    cmd = list(map(str, [sys.executable, os.path.join(ROOT, "bench", "head.py"), "--seed", "1",
                         "--epochs", epochs, "--twa-end", "1", "--per-epoch", "1", "--twa-epochs", "1",
                         "-b", "8", "--data-dir", tiny_data, "--out", tmp_path / "runs", "--results",
                         tmp_path, "--allow-dirty", "--twa-during-sgd"]))
    path = tmp_path / "head-paper-seed1.json"
    runner = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (path.exists() and json.load(open(path))["head"]) and runner.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # one runner per name
    assert second.returncode == 1 and "is in use by another run" in second.stderr, second.stderr
    assert second.stdout == ""  # refused before it started a script or read the record
    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=300)
    stopped = json.load(open(path))
    assert runner.returncode == 1 and "train_sgd.py was interrupted" in err, err
    assert [h["name"] for h in stopped["head"]] == ["twa-1pe-1ep"] and not stopped["complete"]
    assert 1 <= len(stopped["sgd"]["test_acc"]) < epochs  # TWA's result came while SGD ran
    state = runfiles.load_torch(tmp_path / "runs" / "head-paper-seed1" / "sgd" / "state.pt")
    assert state["progress"]["epoch"] < epochs
    # the checkpoints gone (bench/gpu_head.sh brings back the states alone): SGD resumes without them
    for checkpoint in (tmp_path / "runs" / "head-paper-seed1" / "sgd").glob("[0-9]*.pt"):
        checkpoint.unlink()
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    done = json.load(open(path))
    assert done["complete"] and len(done["sgd"]["test_acc"]) == epochs
    assert done["head"] == stopped["head"]  # TWA was not run again
    last = done["commands"][-1]  # SGD continued from its saved state
    assert "train_sgd.py" in last and last.endswith("--resume")


def test_tail_report_pairs_twa_with_swa_within_and_over_seeds(tmp_path):
    """bench/report.py on tail_swa.py's results: a paired interval where the per-image bits exist,
    the plain difference where an earlier run kept accuracies only, a t interval over the seeds, and
    a bootstrap over the test images of the seeds with per-image results; and one variant's TWA
    against another's, on the seeds with per-image results."""
    n = 1000
    swa = packed_bits.pack_bits([1] * 800 + [0] * 200)
    twa = packed_bits.pack_bits([1] * 790 + [0] * 10 + [1] * 30 + [0] * 170)  # +2 points
    for seed, bits in ((1, False), (2, True), (3, True)):
        variant = {"swa_acc": 80.0, "twa_acc": 82.0 if bits else 81.0,
                   "swa_correct": swa if bits else None, "twa_correct": twa if bits else None}
        sparse = {"swa_acc": 80.0, "twa_acc": 80.0, "swa_correct": swa if bits else None,
                  "twa_correct": swa if bits else None}  # TWA over 1 per epoch: no gain
        run = {"seed": seed, "swa_start": 16, "runs": {"swalr0.1": {"tail": {
            "orth-lr2-e2": variant, "orth-lr2-e2-1pe": sparse}}}}
        with open(tmp_path / f"tail-swa-seed{seed}.json", "w") as f:
            json.dump(run, f)
    report = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name",
                             "tail-swa", "--results", str(tmp_path), "--test-images", str(n)],
                            check=True, capture_output=True, text=True, timeout=300)
    assert "| 1 | swalr0.1 | orth-lr2-e2 | 80.00 | 81.00 | +1.00 (no per-image results) |" in report.stdout
    line = next(x for x in report.stdout.splitlines() if x.startswith("| 2 | swalr0.1"))
    low, high = (float(v) for v in line.split("[")[1].split("]")[0].split(", "))
    assert low < 2.0 < high and high - low < 4 and line.endswith("| better |  |  |")  # 40 of 1000 differ
    summary = next(x for x in report.stdout.splitlines() if x.startswith("| swalr0.1 | orth-lr2-e2 | 3"))
    # seeds 2 and 3 agree exactly: the image term alone, var 396.8 / 1000 images, whose 999 degrees
    # of freedom (Welch-Satterthwaite) give t = 1.962: 2.00 +- 1.962 * 0.630
    assert "| 81.67 +- 0.58 | +2.00 [+0.76, +3.24] over seeds 2, 3 | better | +1.67 [" in summary
    # the two variants against each other, on the seeds with per-image results only
    contrast = next(x for x in report.stdout.splitlines()
                    if x.startswith("| swalr0.1 | orth-lr2-e2 - orth-lr2-e2-1pe: "))
    assert "| 2, 3 | +2.00 [+0.76, +3.24] | better | +2.00 [+2.00, +2.00] |" in contrast
    assert "| 2 | swalr0.1 | orth-lr2-e2 - orth-lr2-e2-1pe | +2.00 [" in report.stdout
    assert "| 1 | swalr0.1 | orth-lr2-e2 - orth-lr2-e2-1pe |" not in report.stdout
    for seed in (2, 3):  # scored from two data folders: image i need not be the same image
        with open(tmp_path / f"tail-swa-seed{seed}.json") as f:
            run = json.load(f)
        with open(tmp_path / f"tail-swa-seed{seed}.json", "w") as f:
            json.dump(dict(run, data_dir=f"/data/{seed}"), f)
    report = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--name",
                             "tail-swa", "--results", str(tmp_path), "--test-images", str(n)],
                            check=True, capture_output=True, text=True, timeout=300)
    assert "| not settled (other data folders) | +1.67 [" in report.stdout


def test_runner_stops_with_one_line_when_a_script_fails(tiny_data, tmp_path):
    """A step that fails (here train_sgd.py refusing a folder that already holds checkpoints) ends
    the runner with one error line and a non-zero exit, not the runner's own traceback."""
    folder = tmp_path / "runs" / "head-paper-seed2" / "sgd"
    folder.mkdir(parents=True)
    (folder / "0.pt").write_bytes(b"not ours")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "head.py"), "--seed", "2", "--epochs", "3",
           "-b", "8", "--data-dir", tiny_data, "--out", tmp_path / "runs", "--results", tmp_path,
           "--allow-dirty"]
    done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: train_sgd.py exited with status 2")
    assert (folder / "0.pt").read_bytes() == b"not ours"


def scripts_writing_to(folder):
    """The pids of running processes whose command line names `folder` (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(folder).encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_sigterm_to_the_runner_stops_its_script_too(tiny_data, tmp_path):
    """kill <runner>: the running script gets the SIGTERM, saves its state and exits, and the
    runner says so in one line; no script is left running unrecorded."""
    folder = tmp_path / "runs" / "head-paper-seed2" / "sgd"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "head.py"), "--seed", "2", "--epochs", "500",
           "-b", "8", "--data-dir", tiny_data, "--out", tmp_path / "runs", "--results", tmp_path,
           "--allow-dirty"]
    runner = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.time() + 120
    while not (folder / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    runner.terminate()
    _, stderr = runner.communicate(timeout=120)
    assert runner.returncode != 0
    assert stderr.strip().splitlines()[-1].startswith("error: train_sgd.py was interrupted")
    assert scripts_writing_to(folder) == []
    assert runfiles.load_torch(folder / "state.pt")["progress"]["epoch"] < 500


def test_online_benchmark_says_why_a_route_failed(tmp_path):
    """bench/online.py runs each route in a child that runs the scripts: a script's error line must
    reach the user, not a CalledProcessError with the reason captured and dropped."""
    (tmp_path / "train").mkdir()  # a tree the scripts refuse: no class folders, no test/
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "online.py"), "--settings",
                           "resnet20", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "must hold train/ and val/ (or test/) class folders" in done.stderr
    assert "train_sgd.py exited 2 in the two route of resnet20" in done.stderr
