"""Per-example test results, the paired intervals built on them, the head protocol's options
(the step schedule by steps, the reference's running BatchNorm pass), the benchmarks' data set and
what their results record."""
import io
import json
import signal
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from torch import nn

import loaders
import loop
import models
import packed_bits
import runfiles
import schedules
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import paired  # noqa: E402


def test_packed_bits_round_trip():
    flags = np.random.default_rng(0).random(10_001) < 0.3
    text = packed_bits.pack_bits(flags)
    assert len(text) < 10_001 / 8 * 4 / 3 + 4  # base64 of packed bits
    assert np.array_equal(packed_bits.unpack_bits(text, len(flags)), flags)
    for wrong in (500, 10_016, 12_000):  # another test set size: refused, not cut or padded
        with pytest.raises(ValueError, match="do not hold"):
            packed_bits.unpack_bits(text, wrong)


class Threshold(nn.Module):
    """Predicts class 1 where the first input value is positive."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        first = x.flatten(1)[:, :1] * self.w
        return torch.cat([-first, first], 1)


@pytest.mark.parametrize("world", [1, 3])
def test_evaluate_records_which_examples_each_rank_got_right(world):
    """The bits follow the data's order, whichever rank scored an example (ranks take every
    world-th example of a batch), and agree with the accuracy."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 1, 2, 2), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 2, (37,), generator=gen)
    truth = ((images[:, 0, 0, 0].float() - 127.5) > 0).long() == labels
    model = Threshold()
    right = np.zeros(37, dtype=int)
    for rank in range(world):
        loader = loaders.TensorLoader(images, labels, 8, [0.5], [0.5], rank=rank, world_size=world)
        result = loop.evaluate(model, loader)
        right += packed_bits.unpack_bits(result["correct"], 37)
    assert np.array_equal(right.astype(bool), truth.numpy())
    if world == 1:
        assert result["accuracy"] == pytest.approx(100 * truth.float().mean().item())


def test_paired_bootstrap_matches_resampling_whole_index_vectors():
    rng = np.random.default_rng(1)
    a = rng.random(2000) < 0.8
    b = np.where(rng.random(2000) < 0.9, a, ~a)  # b disagrees with a on about 10% of the examples
    diff, low, high = paired.paired_difference(a, b)
    assert diff == pytest.approx(100 * (a.mean() - b.mean()))
    idx = rng.integers(0, 2000, (4000, 2000))
    resampled = 100 * (a[idx].mean(1) - b[idx].mean(1))
    assert low == pytest.approx(np.percentile(resampled, 2.5), abs=0.15)
    assert high == pytest.approx(np.percentile(resampled, 97.5), abs=0.15)
    assert paired.paired_difference(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired.paired_difference(a, b[:10])


def test_difference_of_gaps_matches_resampling_whole_index_vectors():
    rng = np.random.default_rng(2)
    a, a_ref, b, b_ref = (rng.random((4, 3000)) < np.array([[0.8], [0.85], [0.7], [0.8]]))
    gap, low, high = paired.difference_of_gaps(a, a_ref, b, b_ref)
    assert gap == pytest.approx(100 * ((a.mean() - a_ref.mean()) - (b.mean() - b_ref.mean())))
    idx = rng.integers(0, 3000, (4000, 3000))
    resampled = 100 * (a[idx].mean(1) - a_ref[idx].mean(1) - b[idx].mean(1) + b_ref[idx].mean(1))
    assert low == pytest.approx(np.percentile(resampled, 2.5), abs=0.2)
    assert high == pytest.approx(np.percentile(resampled, 97.5), abs=0.2)
    assert paired.difference_of_gaps(a, a_ref, a, a_ref) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="3000 and 3000 and 3000 and 10"):
        paired.difference_of_gaps(a, a_ref, b, b_ref[:10])


def test_seed_mean_difference_resamples_the_shared_test_images():
    rng = np.random.default_rng(3)
    truth = rng.random(2000) < 0.8  # three seeds' models, correlated through the images they share
    pairs = [(np.where(rng.random(2000) < 0.9, truth, ~truth),
              np.where(rng.random(2000) < 0.88, truth, ~truth)) for _ in range(3)]
    mean, low, high = paired.seed_mean_difference(pairs)
    per_seed = [paired.paired_difference(a, b)[0] for a, b in pairs]
    assert mean == pytest.approx(np.mean(per_seed))
    idx = rng.integers(0, 2000, (4000, 2000))  # one draw of images for all seeds
    resampled = np.mean([100 * (a[idx].mean(1) - b[idx].mean(1)) for a, b in pairs], axis=0)
    assert low == pytest.approx(np.percentile(resampled, 2.5), abs=0.15)
    assert high == pytest.approx(np.percentile(resampled, 97.5), abs=0.15)
    with pytest.raises(ValueError):
        paired.seed_mean_difference([pairs[0], (pairs[1][0], pairs[1][1][:10])])


def test_seed_mean_gap_change_resamples_the_shared_test_images():
    rng = np.random.default_rng(4)
    truth = rng.random(2000) < 0.8
    quads = [tuple(np.where(rng.random(2000) < p, truth, ~truth) for p in (0.85, 0.9, 0.8, 0.88))
             for _ in range(3)]
    mean, low, high = paired.seed_mean_gap_change(quads)
    assert mean == pytest.approx(np.mean([paired.difference_of_gaps(*q)[0] for q in quads]))
    idx = rng.integers(0, 2000, (4000, 2000))  # one draw of images for all seeds
    resampled = np.mean([100 * (a[idx].mean(1) - a_ref[idx].mean(1) - b[idx].mean(1) + b_ref[idx].mean(1))
                         for a, a_ref, b, b_ref in quads], axis=0)
    assert low == pytest.approx(np.percentile(resampled, 2.5), abs=0.15)
    assert high == pytest.approx(np.percentile(resampled, 97.5), abs=0.15)
    with pytest.raises(ValueError):
        paired.seed_mean_gap_change([quads[0], quads[1][:3] + (quads[1][3][:10],)])


def test_interval_over_seeds():
    mean, low, high = paired.over_seeds([1.0, 2.0, 3.0])
    assert (mean, high - mean) == (2.0, pytest.approx(4.303 * 1.0 / 3 ** 0.5))
    assert paired.over_seeds([0.5]) == (0.5, None, None)


def test_step_fraction_reaches_all_three_rates_in_one_epoch():
    steps = 10
    rates = [schedules.lr_at("step-fraction", 2.0, 0, 1, b / steps) for b in range(steps)]
    assert rates == pytest.approx([2.0] * 5 + [0.2] * 3 + [0.02] * 2)
    assert schedules.lr_at("step", 2.0, 0, 1, 0.0) == pytest.approx(0.2)  # why it exists


def test_running_bn_pass_continues_the_statistics_with_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    bn = model[1]
    model.eval()
    bn.running_mean.fill_(5.0)
    batches = [(torch.randn(4, 1, 3, 3) + 1, None) for _ in range(3)]
    expected = bn.running_mean.clone()
    with torch.no_grad():
        for images, _ in batches:
            expected = 0.9 * expected + 0.1 * model[0](images).mean((0, 2, 3))
    loop.recompute_bn(model, batches, "running")
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert bn.momentum == 0.1 and not model.training
    loop.recompute_bn(model, batches, "recompute")  # reset: the 5.0 start is gone
    with torch.no_grad():
        means = torch.stack([model[0](x).mean((0, 2, 3)) for x, _ in batches]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5)


def test_outputs_of_one_run_are_replaced_together_or_not_at_all(tmp_path):
    """A write that fails half-way (disk full at the second file) leaves the previous run's files,
    never the new twa.pt beside the old coefficients, and no temp file."""
    first, second = tmp_path / "twa.pt", tmp_path / "coefficients.json"
    runfiles.atomic_write_all([(first, runfiles.text_writer("old weights")),
                               (second, runfiles.json_writer({"alpha": [0.5, 0.5]}))])

    def full_disk(tmp):
        raise OSError(28, "No space left on device")
    with pytest.raises(runfiles.WriteFailed, match="No space left"):
        runfiles.atomic_write_all([(first, runfiles.text_writer("new weights")), (second, full_disk)])
    assert first.read_text() == "old weights"
    assert sorted(os.listdir(tmp_path)) == ["coefficients.json", "twa.pt"]


def image_archive(path, files):
    """A .tar.gz holding {name: bytes}, as ../shared/data's CIFAR-10 tree (train/, test/ at the top)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def test_a_data_dir_without_train_is_an_error_not_an_extraction_target(tmp_path):
    typo = tmp_path / "cifar1O"
    with pytest.raises(SystemExit, match="no train/ folder there"):
        common.cifar10_dir(str(typo), cache=str(tmp_path / "cache"))
    assert sorted(os.listdir(tmp_path)) == []  # neither the folder nor the cache made
    (typo / "train").mkdir(parents=True)
    assert common.cifar10_dir(str(typo)) == str(typo)


def test_extraction_leaves_the_whole_tree_or_none(tmp_path):
    files = {"train/a/0.jpg": b"x" * 5000, "test/a/0.jpg": b"y" * 5000}
    image_archive(tmp_path / "whole.tar.gz", files)
    raw = (tmp_path / "whole.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[:len(raw) // 2])  # a download or copy cut short
    with pytest.raises(SystemExit, match="cannot extract .*cut.tar.gz"):
        common.extract_whole(str(tmp_path / "cut.tar.gz"), str(tmp_path / "data" / "cifar10"))
    assert os.listdir(tmp_path / "data") == []  # no partial tree a later run would take as the data
    common.extract_whole(str(tmp_path / "whole.tar.gz"), str(tmp_path / "data" / "cifar10"))
    assert (tmp_path / "data" / "cifar10" / "train" / "a" / "0.jpg").read_bytes() == b"x" * 5000
    assert os.listdir(tmp_path / "data") == ["cifar10"]
    # a second run that waited for the first finds its tree in place and keeps it; what a run
    # killed mid-extraction (SIGTERM skips the clean-up) left is removed
    (tmp_path / "data" / ".extracting-killed" / "train").mkdir(parents=True)
    image_archive(tmp_path / "other.tar.gz", {"train/a/0.jpg": b"z", "test/a/0.jpg": b"z"})
    common.extract_whole(str(tmp_path / "other.tar.gz"), str(tmp_path / "data" / "cifar10"))
    assert (tmp_path / "data" / "cifar10" / "train" / "a" / "0.jpg").read_bytes() == b"x" * 5000
    assert os.listdir(tmp_path / "data") == ["cifar10"]
    # a folder in the way that is not a tree: one line, not a traceback
    (tmp_path / "stale" / "test").mkdir(parents=True)
    with pytest.raises(SystemExit, match="cannot extract .* Directory not empty"):
        common.extract_whole(str(tmp_path / "whole.tar.gz"), str(tmp_path / "stale"))


def test_a_runner_passes_one_sigterm_to_each_script_and_starts_none_after_it(tmp_path):
    """common.Scripts: two SIGTERMs to the runner reach a running script once (a second would stop
    it unsaved); the script's exit is one line; nothing starts after the signal; the handler
    before is back afterwards."""
    script = tmp_path / "script.py"
    script.write_text(
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda *_: got.append(1))\n"
        f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
        "deadline = time.time() + 60\n"
        "while not got and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(1)  # a second signal would arrive by now\n"
        f"open({str(tmp_path / 'count')!r}, 'w').write(str(len(got)))\n"
        "sys.exit(143)\n")
    before = signal.getsignal(signal.SIGTERM)
    commands = []
    with common.Scripts(commands) as scripts:
        child = scripts.start(str(script), ["--flag", 1])
        while not (tmp_path / "ready").exists():  # the script's handler is in place
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit, match="script.py was interrupted"):
            scripts.wait(child)
        with pytest.raises(SystemExit, match="interrupted before"):
            scripts.start(str(script), [])
    assert (tmp_path / "count").read_text() == "1"
    assert commands == [f"python {script} --flag 1"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_basis_spectrum_records_its_command_and_revision(tmp_path):
    """bench/basis_spectrum.py on four ResNet-20 checkpoints: every basis spans them (rank 4, the
    float64 pass orthonormal), and the JSON names the command line and the revision that made it.
    A range past the last checkpoint is a usage error before any reading."""
    torch.manual_seed(0)
    model = models.build_model("resnet20", 10)
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        torch.save(model.state_dict(), tmp_path / f"{i}.pt")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "basis_spectrum.py"), "--save-dir", str(tmp_path),
           "--params_start", "0", "--params_end", "4", "--name", "t", "--results", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    with open(tmp_path / "basis-spectrum-t.json") as f:
        report = json.load(f)
    assert report["orthonormal"]["rank"] == 4
    assert report["reference float64"]["orthogonality_error"] < 1e-10
    assert "bench/basis_spectrum.py --save-dir" in report["commands"][0]
    assert report["git"] == runfiles.git_revision()
    cmd[cmd.index("--params_end") + 1] = "5"  # 4.pt does not exist
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].endswith("are missing, the first " + str(tmp_path / "4.pt"))


# ---------------------------------------------------------------------------------------------------
# bench/report.py: the rule, the reading of results files, one protocol and one run per seed a table
# ---------------------------------------------------------------------------------------------------

import report  # noqa: E402
import results_files  # noqa: E402
import rule  # noqa: E402


def scored(*flags):
    """Per-image scores a - b of one seed from its -1/0/1 list."""
    return np.array(flags)


def test_rule_interval_by_hand():
    # seed 1: +1 on image 0 (d = 25 points); seed 2: +1 on images 0 and 1 (d = 50); N = 4
    # e_i = 100, 50, 0, 0 (mean 37.5): var_images = (62.5^2 + 12.5^2 + 2 * 37.5^2) / 3 = 6875 / 3
    # var_seeds = (25 - 50)^2 / 2 = 312.5; a = 312.5 / 2 = 156.25, b = 6875 / 12 = 572.9167
    # df = 729.1667^2 / (156.25^2 / 1 + 572.9167^2 / 3) = 3.97, rounded down 3: t(3) = 3.182
    mean, low, high = rule.rule_interval([scored(1, 0, 0, 0), scored(1, 1, 0, 0)])
    assert mean == 37.5
    assert high - mean == pytest.approx(3.182 * 729.1667 ** 0.5, rel=1e-6)
    assert mean - low == pytest.approx(high - mean)
    # one seed: e_i = 100, 0, 0, 0, var = 2500, SE = sqrt(2500 / 4) = 25, 1.96 * 25 = 49
    assert rule.rule_interval([scored(1, 0, 0, 0)]) == pytest.approx((25, -24, 74))
    with pytest.raises(ValueError, match="4 and 3 images"):
        rule.rule_interval([scored(1, 0, 0, 0), scored(1, 0, 0)])


def test_seeds_that_agree_do_not_hide_the_test_sets_noise():
    """Three seeds with the same paired difference on noisy images: the t interval over the seeds has
    no width, the rule's is as wide as the images allow, so +0.4 points is not settled."""
    one = np.array([1] * 600 + [-1] * 560 + [0] * 8840)  # +0.40 points on 10,000 images
    cells = rule.over_seed_cells([(seed, one) for seed in (1, 2, 3)])
    assert cells[2] == "+0.40 [+0.40, +0.40]"  # t over the seeds alone
    mean, low, high = rule.rule_interval([one] * 3)
    image_se = (np.var(100.0 * one, ddof=1) / one.size) ** 0.5
    # no seed-to-seed spread: the image term's 9,999 degrees of freedom, t = 1.960
    assert high - mean == pytest.approx(rule.t975(9999) * image_se) and high - mean > 0.6
    assert cells[:2] == [f"+0.40 [{low:+.2f}, {high:+.2f}]", "not settled"]


@pytest.mark.parametrize("low, high, word", [
    (0.1, 0.9, "better"), (0.05, 0.25, "better (within +-0.3)"), (-0.9, -0.1, "worse"),
    (-0.25, -0.01, "worse (within +-0.3)"), (-0.2, 0.3, "matches"), (-0.5, 0.2, "not settled"),
    (-0.1, 0.31, "not settled")])
def test_each_verdict_word(low, high, word):
    assert rule.verdict(low, high) == word


def test_every_verdict_word_from_per_image_results():
    """Each word reached from scores through the interval, and the words without an interval."""
    def seeds(gains, losses, n=10_000):
        return [(s, np.array([1] * (g + s) + [-1] * (l + s) + [0] * (n - g - l - 2 * s)))
                for s, (g, l) in enumerate(zip(gains, losses))]
    words = {
        "better": seeds([900] * 3, [100] * 3),
        "worse": seeds([100] * 3, [900] * 3),
        "better (within +-0.3)": seeds([10_750] * 3, [9_250] * 3, n=1_000_000),  # +0.15
        "matches": seeds([2_000] * 3, [2_000] * 3, n=1_000_000),
        "not settled": seeds([300] * 3, [260] * 3),
    }
    for word, scored_seeds in words.items():
        assert rule.over_seed_cells(scored_seeds)[1] == word
    assert rule.over_seed_cells([], unscored=[(1, 0.5), (2, 0.4)])[1:] == [
        "not settled (no per-image results)", "+0.45 [-0.19, +1.09]"]
    assert rule.over_seed_cells(words["better"], shared=False)[1] == "not settled (other data folders)"
    partial = rule.over_seed_cells(words["better"][:2], unscored=[(7, 8.0)])
    assert partial[0].endswith(" over seeds 0, 1") and partial[1] == "better"
    assert rule.over_seed_cells(words["better"][:1], unscored=[(7, 8.0)])[0].endswith(
        " (one seed: seed 0)")


def test_t_quantile_beyond_the_table():
    assert rule.t975(10) == 2.228
    assert rule.t975(11) == pytest.approx(2.20099, abs=2e-5)
    assert rule.t975(30) == pytest.approx(2.04227, abs=2e-5)
    assert rule.t975(10_000) == pytest.approx(1.960, abs=1e-3)


N_TEST = 40


def packed(rng, p=0.7):
    return packed_bits.pack_bits(rng.random(N_TEST) < p)


def head_record(seed, epochs=3, **changes):
    """A bench/head.py record of the shape report.py reads, per-image results of N_TEST images."""
    rng = np.random.default_rng(seed)
    record = {"seed": seed, "name": "h", "epochs": epochs, "sgd_wd": 1e-4, "checkpoints_per_epoch": 1,
              "twa": {"lr": 2.0}, "data_dir": "data", "complete": True,
              "sgd": {"test_correct": [packed(rng) for _ in range(epochs)]},
              "head": [{"n": 2, "sgd_epochs": 1, "twa_epochs": 1, "swa": {"correct": packed(rng)},
                        "before_bn": {"correct": packed(rng)},
                        "twa": {"recompute": {"correct": packed(rng)}}}]}
    record.update(changes)
    return record


def tail_record(seed, key="swalr0.1", **changes):
    rng = np.random.default_rng(seed)
    variant = {"swa_acc": 80.0, "twa_acc": 81.0, "swa_correct": packed(rng), "twa_correct": packed(rng)}
    return {"seed": seed, "swa_start": 16, "epochs": 30, "checkpoints_per_epoch": 2, "data_dir": "data",
            "runs": {key: {"tail": {"orth-lr2-e2": variant}}}, **changes}


def write(folder, name, record):
    path = folder / name
    path.write_text(json.dumps(record) if not isinstance(record, str) else record)
    return path


def run_report(folder, *names, test_images=N_TEST):
    """report.py's output for --name NAMES, or its one-line refusal as 'refused: ...'."""
    argv = ["--results", str(folder), "--test-images", str(test_images), "--name", *names]
    try:
        report.main(argv)
    except SystemExit as stop:
        assert "\n" not in str(stop.code), stop.code
        return f"refused: {stop.code}"
    return "ok"


def test_one_name_holds_one_protocol_and_one_run_per_seed(tmp_path):
    write(tmp_path, "h-seed1.json", head_record(1))
    write(tmp_path, "h-seed2.json", head_record(2))
    assert run_report(tmp_path, "h") == "ok"
    write(tmp_path, "h-seed3.json", head_record(3, epochs=4))  # another E under the same name
    message = run_report(tmp_path, "h")
    assert "differ in epochs" in message and "h-seed1.json" in message and "h-seed3.json" in message
    (tmp_path / "h-seed3.json").unlink()
    write(tmp_path, "h-seed1-copy.json", head_record(1))  # one seed counted twice
    message = run_report(tmp_path, "h")
    assert "seed 1 is in more than one of" in message and "h-seed1-copy.json" in message
    assert "seed 1 is in more than one of" in run_report(tmp_path, "h:1", "h:1")
    (tmp_path / "h-seed1-copy.json").unlink()
    write(tmp_path, "h-seed3.json", tail_record(3))  # another runner's record
    assert "a table reads one kind" in run_report(tmp_path, "h")
    assert "a table reads one kind" in run_report(tmp_path, "h*")  # a glob: the same check
    # a tail seed has a file per swa_lr: the same seed twice in one swa_lr only is refused
    write(tmp_path, "t-seed1.json", tail_record(1))
    write(tmp_path, "t-seed1-swalr0.05.json", tail_record(1, key="swalr0.05"))
    assert run_report(tmp_path, "t") == "ok"
    write(tmp_path, "t-seed1-again.json", tail_record(1))
    assert "seed 1 (swalr0.1) is in more than one of" in run_report(tmp_path, "t")


def broken(path, value):
    """head_record(1) with the field at `path` (keys and indices) set to value, or deleted (...)."""
    record = head_record(1)
    *parents, last = path
    holder = record
    for key in parents:
        holder = holder[key]
    if value is ...:
        del holder[last]
    else:
        holder[last] = value
    return record


@pytest.mark.parametrize("record, message", [
    (broken(["seed"], ...), "h-seed1.json: no 'seed' field"),
    (broken(["head"], {"n": 2}), "h-seed1.json: head: expected a list, got an object"),
    (broken(["head", 0, "swa", "correct"], None), "head[0].swa.correct: expected a string, got null"),
    (broken(["epochs"], "3"), "epochs: expected an integer >= 1, got the string '3'"),
    (broken(["sgd_wd"], float("nan")), "sgd_wd: expected a finite number, got nan"),
    (broken(["seed"], True), "seed: expected an integer >= 0, got true"),
    (broken(["head", 0, "twa"], []), "head[0].twa: expected an object, got a list"),
    (broken(["head", 0, "sgd_epochs"], 5), "sgd.test_correct: 3 epochs recorded, 5 needed"),
    (broken(["head", 0, "sgd_epochs"], -1), "head[0].sgd_epochs: expected an integer >= 1, got -1"),
    (broken(["head", 0, "twa", "recompute", "correct"], packed_bits.pack_bits([1] * 80)),
     "head[0].twa.recompute.correct: packed results of 10 bytes do not hold 40 flags"),
    (broken(["head", 0, "swa", "correct"], "not base64!"), "head[0].swa.correct: not packed"),
    ([head_record(1)], "h-seed1.json: not a record of"),
    ("[" * 100_000, "h-seed1.json: not a readable results file"),
    ("", "h-seed1.json: not a readable results file"),
])
def test_a_results_file_of_the_wrong_shape_is_one_line_naming_file_and_field(tmp_path, record, message):
    write(tmp_path, "h-seed1.json", record)
    assert message in run_report(tmp_path, "h")


def test_what_is_not_a_results_file_is_refused_without_reading_it(tmp_path):
    (tmp_path / "d-seed1.json").mkdir()
    assert "d-seed1.json: not a regular file" in run_report(tmp_path, "d")
    os.mkfifo(tmp_path / "f-seed1.json")  # reading would wait for a writer forever
    assert "f-seed1.json: not a regular file" in run_report(tmp_path, "f")
    with open(tmp_path / "big-seed1.json", "wb") as f:
        f.truncate(results_files.MAX_BYTES + 1)
    assert "too large for a results file" in run_report(tmp_path, "big")
    write(tmp_path, "bytes-seed1.json", "")
    (tmp_path / "bytes-seed1.json").write_bytes(b'{"seed": "\xff"}')
    assert "bytes-seed1.json: not a readable results file" in run_report(tmp_path, "bytes")
    assert run_report(tmp_path, "nothing") == f"refused: no nothing-seed*.json in {tmp_path}"
    assert "at least 2 images" in run_report(tmp_path, "d", test_images=1)


def test_names_and_folders_are_taken_as_written(tmp_path):
    folder = tmp_path / "results [1] ü"  # glob magic and unicode in the folder
    folder.mkdir()
    write(folder, "héad-ü-seed1.json", head_record(1))
    assert run_report(folder, "héad-ü") == "ok"


def test_seeds_scored_on_test_sets_of_other_sizes_are_refused_naming_the_file(tmp_path):
    write(tmp_path, "h-seed1.json", head_record(1))
    other = head_record(2)
    other["sgd"]["test_correct"][0] = packed_bits.pack_bits([1] * 48)
    write(tmp_path, "h-seed2.json", other)
    assert "h-seed2.json: sgd.test_correct[0]: packed results of 6 bytes do not hold 40" in run_report(
        tmp_path, "h")


def test_budget_matched_sgd_is_a_baseline_of_every_twa_it_matches(tmp_path, capsys):
    """A head.py record with sgd_matched (SGD on its own schedule for TWA's 1 + 1 epochs): each TWA
    is compared with it by the rule, within each seed and over the seeds."""
    scores = []
    for seed in (1, 2, 3):
        record = head_record(seed)
        rng = np.random.default_rng(10 + seed)
        matched = rng.random(N_TEST) < 0.6
        record["sgd_matched"] = {"epochs": 2, "test_correct": [packed(rng), packed_bits.pack_bits(matched)]}
        twa = packed_bits.unpack_bits(record["head"][0]["twa"]["recompute"]["correct"], N_TEST)
        scores.append(twa.astype(int) - matched)
        write(tmp_path, f"head-e200-seed{seed}.json", record)
    assert run_report(tmp_path, "head-e200") == "ok"
    out = capsys.readouterr().out
    mean, low, high = rule.rule_interval(scores)
    row = next(x for x in out.splitlines()
               if x.startswith("| TWA, 2 ckpts, 1 ep, BN recompute - SGD(2), own schedule | 3 |"))
    assert f"| {mean:+.2f} [{low:+.2f}, {high:+.2f}] | {rule.verdict(low, high)} |" in row
    record["sgd_matched"]["test_correct"] = []
    write(tmp_path, "head-e200-seed3.json", record)
    assert "sgd_matched.test_correct" in run_report(tmp_path, "head-e200")


def test_lr_scale_records_every_rate_with_the_scales_that_explain_it(tiny_data, tmp_path):
    """bench/lr_scale.py at tiny size: SWA and each rate scored on held-out and test images, the
    gradient's norms and the snapshots' spread, the command and the revision."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "lr_scale.py"), "--archs", "small-cnn",
           "--lrs", "0.5", "2", "--epochs", "1", "--twa-epochs", "1", "--train-subset", "0",
           "--data-dir", tiny_data, "--results", str(tmp_path), "--name", "t", "--allow-dirty"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    with open(tmp_path / "t.json") as f:
        record = json.load(f)
    (row,) = record["rows"]
    assert set(row["twa"]) == {"0.5", "2"} and row["snapshots"] == 2  # initial + one batch an epoch
    assert 0 < row["span_grad_norm"] <= row["grad_norm"] + 1e-9 and row["spread"] > 0  # |P g| <= |g|
    assert row["twa"]["2"]["first_step_over_spread"] == pytest.approx(
        4 * row["twa"]["0.5"]["first_step_over_spread"])
    assert record["commands"][0].startswith("python bench/lr_scale.py --archs small-cnn")
    assert record["git"] == runfiles.git_revision()
