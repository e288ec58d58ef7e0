"""The Lightning example runs as its docstring says, on the real CIFAR-10 copy at a tiny size, under
torchrun on 2 processes with FSDP2."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLE = os.path.join(ROOT, "examples", "lightning_resnet20.py")


@pytest.mark.parametrize("processes,strategy,images", [(2, "fsdp", 512)])
def test_lightning_example(tmp_path, processes, strategy, images):
    """2 batches of 128 per process and epoch: 2 epochs recorded twice each, then 1 of TWA. (On
    one process the example's code is the same; tests/test_lightning.py covers that route.)"""
    prefix = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    proc = subprocess.run([*prefix, EXAMPLE, "--data", common.cifar10_dir(), "--subset", str(images),
                           "--switch", "2", "--twa-epochs", "1", "--strategy", strategy,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"SWA point ([\d.]+)%, TWA ([\d.]+)% \((\d+) directions", proc.stdout)
    assert found, proc.stdout[-2000:]
    assert int(found[3]) == 5  # 2 epochs, 2 snapshots each, and the initial weights
    report = json.loads((tmp_path / "checkpoints" / "twa.json").read_text())
    assert len(report["alpha"][0]) == 5 and report["swa"]["val_acc"] == pytest.approx(float(found[1]),
                                                                                         abs=0.01)
