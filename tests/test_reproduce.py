"""The reproduction pipeline end to end on the tiny tree (a smoke run, never the full table)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs the scripts end to end


def test_reproduce_pipeline_and_report(tiny_data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce.py"), "--quick", "--epochs", "4",
           "-b", "8", "--seed", "3", "--head-ends", "3", "--data-dir", tiny_data, "--out", tmp_path / "runs",
           "--results", tmp_path]
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
                             "reproduce-quick", "--results", str(tmp_path)],
                            check=True, capture_output=True, text=True, timeout=300)
    assert "| SGD | 4 |" in report.stdout and "TWA - SWA" in report.stdout
    assert "| TWA, 13 ckpts, 2 ep, lr 2.0 | 5 |" in report.stdout
    assert os.path.getsize(tmp_path / "reproduce-quick-accuracy.png") > 1000
