"""Tests for plot.py, run as a command-line script in a subprocess."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

PLOT_SCRIPT = Path(__file__).resolve().parents[1] / "plot.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_plot(*args):
    """Run plot.py with `args`; return the completed process."""
    return subprocess.run([sys.executable, str(PLOT_SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000


def write_metrics(run_dir, offset):
    """Write a 3-epoch metrics.jsonl into `run_dir`, plus rows plot.py must skip."""
    run_dir.mkdir(parents=True)
    rows = [{"stage": "start", "lr": 0.1}]
    for epoch in range(1, 4):
        rows.append({"epoch": epoch, "stage": "train", "lr": 0.1, "time": 1.5,
                     "train_loss": 2.0 / epoch + offset, "train_acc": 30.0 * epoch,
                     "test_loss": 2.2 / epoch + offset, "test_acc": 28.0 * epoch})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run_dir


def test_curves_two_runs(tmp_path):
    run_a = write_metrics(tmp_path / "sgd", offset=0.0)
    run_b = write_metrics(tmp_path / "twa", offset=0.1)
    out = tmp_path / "figures" / "curves.png"
    result = run_plot("curves", run_a, run_b / "metrics.jsonl", "-o", out, "--labels", "SGD", "TWA")
    assert result.returncode == 0, result.stderr
    assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]


def test_coefficients_bar_chart(tmp_path):
    coefficients = tmp_path / "coefficients.json"
    coefficients.write_text(json.dumps({
        "checkpoints": ["0.pt", "1.pt", "2.pt", "3.pt"],
        "alpha": [0.4, 0.35, -0.05, 0.3],
        "uniform": 0.25,
    }))
    out = tmp_path / "alpha.png"
    result = run_plot("coefficients", coefficients, "-o", out)
    assert result.returncode == 0, result.stderr
    assert_png(out)


def test_malformed_json_line_exits_2(tmp_path):
    run = write_metrics(tmp_path / "broken_run", offset=0.0)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 4, "train_loss": \n')
    result = run_plot("curves", run, "-o", tmp_path / "out.png")
    assert result.returncode == 2
    assert "metrics.jsonl:5" in result.stderr
    assert "broken_run" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_missing_file_exits_2(tmp_path):
    result = run_plot("curves", tmp_path / "nowhere", "-o", tmp_path / "out.png")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    result = run_plot("coefficients", tmp_path / "nowhere.json", "-o", tmp_path / "out.png")
    assert result.returncode == 2
    assert "nowhere.json" in result.stderr


def test_mismatched_coefficients_exits_2(tmp_path):
    coefficients = tmp_path / "coefficients.json"
    coefficients.write_text(json.dumps({"checkpoints": ["0.pt", "1.pt"], "alpha": [1.0]}))
    result = run_plot("coefficients", coefficients, "-o", tmp_path / "out.png")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_layerwise_coefficients_plot_the_size_weighted_mean(tmp_path):
    path = tmp_path / "coefficients.json"
    path.write_text(json.dumps({"checkpoints": ["a", "b"], "alpha": None, "uniform": 0.5, "blocks": [
        {"entries": 3, "alpha": [1.0, 0.0]}, {"entries": 1, "alpha": [0.0, 1.0]}]}))
    result = run_plot("coefficients", str(path), "-o", str(tmp_path / "alpha.png"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "alpha.png").read_bytes().startswith(PNG_SIGNATURE)
    sys.path.insert(0, str(PLOT_SCRIPT.parent))
    import plot
    assert plot.blocks_mean(json.loads(path.read_text())["blocks"]) == [0.75, 0.25]


def test_twa_continues_from_the_head_with_swa_and_final_markers(tmp_path):
    sys.path.insert(0, str(PLOT_SCRIPT.parent))
    import plot
    rows = [{"stage": "sgd", "epoch": e, "test_acc": 50.0 + e} for e in (1, 2, 3, 4)]
    rows += [{"stage": "twa", "epoch": e, "test_acc": 60.0 + e} for e in (1, 2)]
    series = plot.split_stages("", rows, twa_start=2.0)
    assert [r["epoch"] for r in series["TWA"]] == [3.0, 4.0]  # after the head's epoch 2
    assert [r["epoch"] for r in series["SGD"]] == [1, 2, 3, 4]
    results = {"swa": {"loss": 1.0, "accuracy": 55.0}, "twa": {"loss": 0.9, "accuracy": 61.5}}
    markers = plot.result_markers("", rows, results, 2.0)
    assert [(m[0], m[1], m[2]["acc"]) for m in markers] == [("SWA test", 2.0, 55.0),
                                                          ("TWA, BN recomputed test", 4.0, 61.5)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "twa_results.json").write_text(json.dumps({**results, "start_epoch": 2.0}))
    result = run_plot("curves", run, "-o", tmp_path / "c.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").stat().st_mode & 0o777 == 0o644  # readable by everyone


def refused_in_one_line(result, *fragments):
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_coefficients_of_the_wrong_shape_name_the_file_and_field(tmp_path):
    cases = [
        ({"checkpoints": ["a"], "alpha": None, "blocks": [{"entries": 0, "alpha": [1.0]}]},
         "blocks[0].entries: expected an integer >= 1, got 0"),
        ({"checkpoints": ["a", "b"], "alpha": None, "blocks": [{"entries": 1, "alpha": [1.0, 0.0]},
                                                              {"entries": 1, "alpha": [1.0]}]},
         "2 checkpoints but alpha lists of 1, 2 values"),
        ({"checkpoints": ["a"], "alpha": [float("nan")]}, "alpha[0]: expected a finite number, got nan"),
        ({"checkpoints": ["a"], "alpha": ["0.5"]}, "alpha[0]: expected a finite number"),
        ({"checkpoints": ["a"], "alpha": None}, "no 'alpha' and no 'blocks'"),
        ({"alpha": [1.0]}, "no 'checkpoints' field"),
        ([1.0], "expected an object, got a list"),
        ({"checkpoints": ["a"], "alpha": [1.0], "uniform": "x"}, "uniform: expected a finite number"),
    ]
    for i, (data, fragment) in enumerate(cases):
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps(data))
        refused_in_one_line(run_plot("coefficients", path, "-o", tmp_path / "out.png"), str(path), fragment)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    refused_in_one_line(run_plot("coefficients", deep, "-o", tmp_path / "out.png"), "not valid JSON")
    assert not (tmp_path / "out.png").exists()


def test_a_twa_results_file_of_the_wrong_shape_is_refused_not_ignored(tmp_path):
    run = write_metrics(tmp_path / "run", offset=0.0)
    for data, fragment in (({"start_epoch": "2"}, "start_epoch: expected a finite number"),
                           ([{"start_epoch": 2}], "expected an object, got a list"),
                           ({"swa": {"accuracy": [55.0]}}, "swa.accuracy: expected a finite number")):
        (run / "twa_results.json").write_text(json.dumps(data))
        refused_in_one_line(run_plot("curves", run, "-o", tmp_path / "c.png"), "twa_results.json",
                            fragment)
    metrics = run / "metrics.jsonl"
    metrics.write_text("[" * 100_000 + "\n")
    refused_in_one_line(run_plot("curves", metrics, "-o", tmp_path / "c.png"), "metrics.jsonl:1")


def test_an_output_that_is_not_a_regular_file_is_left_alone(tmp_path):
    run = write_metrics(tmp_path / "run", offset=0.0)
    fifo = tmp_path / "figure.png"
    os.mkfifo(fifo)
    refused_in_one_line(run_plot("curves", run, "-o", fifo), "not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "run"]  # no temp file left
