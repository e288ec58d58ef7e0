"""What a newcomer meets first: the README's length and links, its own-model snippet run as written,
and run.sh run twice."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, write_image_folder

README = os.path.join(ROOT, "README.md")


def readme():
    with open(README) as f:
        return f.read()


def test_readme_is_a_ten_minute_read():
    assert len(readme().splitlines()) <= 250


def anchors(markdown):
    """GitHub's anchors of a document's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        found.add(re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-"))
    return found


def test_every_link_to_docs_names_a_file_and_heading_that_exist():
    documents = [README] + [os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))]
    for document in documents:
        with open(document) as f:
            text = f.read()
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)?(?:#([\w-]+))?\)", text):
            if not target and not anchor:
                continue
            path = os.path.join(os.path.dirname(document), target) if target else document
            assert os.path.isfile(path), f"{document} links to a missing {target}"
            if anchor:
                with open(path) as f:
                    assert anchor in anchors(f.read()), f"{document} links to a missing #{anchor} in {path}"


def snippet():
    usage = readme().split("## Use TWA on your own model", 1)[1]
    return usage.split("```python\n", 1)[1].split("```", 1)[0]


def batches(count, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen))
            for _ in range(count)]


def test_snippet_keeps_what_scores_best_on_held_out_data_swa_included(tmp_path, monkeypatch):
    """The snippet as written, on 8 checkpoints of a small network with BatchNorm: every rate it tries
    and SWA are scored on the held-out batches, and twa.pt holds the weights of the best of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))
    os.makedirs(tmp_path / "ckpt")
    for i in range(8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.save(model.state_dict(), tmp_path / "ckpt" / f"{i}.pt")
    code = snippet().replace("range(101)", "range(8)")
    monkeypatch.chdir(tmp_path)
    scope = {"build_model": lambda: model, "train_loader": batches(4, 1), "val_loader": batches(2, 2)}
    exec(code, scope)
    scores = scope["scores"]
    assert 0 in scores and len(scores) >= 3  # SWA is a candidate, beside several rates
    best = max(scores, key=lambda lr: scores[lr][0])
    saved = torch.load(tmp_path / "twa.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in scores[best][1].items())
    assert len({round(score, 6) for score, _ in scores.values()}) > 1  # the rates were really trained


@pytest.mark.slow
def test_run_sh_quick_run_twice_names_its_knobs_then_resumes_or_starts_again(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), per_class=100)
    env = {**os.environ, "DATA_DIR": data, "EPOCHS": "2", "SUBSET": "0", "OUT": str(tmp_path / "out"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}  # run.sh's python

    def run(**knobs):
        return subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "quick"], env={**env, **knobs},
                              capture_output=True, text=True, timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("[run.sh ")  # progress before torch has even loaded
    results = tmp_path / "out" / "twa_results.json"
    written = results.stat().st_mtime_ns
    again = run()
    assert again.returncode == 2
    assert "RESUME=1" in again.stderr and "FRESH=1" in again.stderr and "OUT=" in again.stderr
    assert results.stat().st_mtime_ns == written  # nothing touched
    assert run(RESUME="1").returncode == 0
    fresh = run(FRESH="1")
    assert fresh.returncode == 0 and "removing" in fresh.stdout
    assert (tmp_path / "out" / "checkpoints" / "4.pt").exists()


@pytest.mark.parametrize("knobs, message", [
    ({"EPOCHS": "abc"}, "EPOCHS=abc is not a whole number"),
    ({"SUBSET": "-1"}, "SUBSET=-1 is not a whole number"),
    ({"RESUME": "1", "FRESH": "1"}, "set one"),
])
def test_run_sh_refuses_malformed_or_contradicting_knobs_before_any_work(tmp_path, knobs, message):
    env = {**os.environ, "OUT": str(tmp_path / "out"), **knobs}
    done = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "quick"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and not (tmp_path / "out").exists()


def test_run_sh_takes_a_folder_without_checkpoints_for_no_earlier_run(tmp_path):
    """A run that failed before its first checkpoint (no data) left logs only: nothing to continue."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "log.log").write_text("a failed start\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "missing"),
           "DATASET": "ImageFolder", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "quick"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "holds an earlier run" not in done.stderr
    assert "1/2 SGD" in done.stdout  # it went on to train, and train_sgd.py refused the missing data
