"""torchrun processes that fail or disagree stop together, promptly, with one line: a node that
lacks a checkpoint, holds other files under the same names or was started with other flags stops
every process on bad input (exit 2, naming the process and the difference); the survivors of a
process that dies name it (exit 1). A process left without images in the last batch trains on, as
one process would."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import runfiles
from conftest import ROOT
from test_cli import common
from test_distributed import launch, relative_difference


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(script, per_rank_args, timeout=180, cwds=None):
    """Start one process per rank as separate launches (two nodes of one process each), with its
    own flags (and working folder); returns [(returncode, stderr, seconds)] by rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(len(per_rank_args)),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    started = time.time()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args), "--quiet"],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=cwds and cwds[rank])
             for rank, args in enumerate(per_rank_args)]
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        out.append((proc.returncode, err, time.time() - started))
    return out


@pytest.mark.slow
def test_a_node_missing_a_checkpoint_stops_every_node_promptly(sgd_checkpoints, tiny_data, tmp_path):
    other_node = tmp_path / "node1"
    shutil.copytree(sgd_checkpoints, other_node)
    os.remove(other_node / "3.pt")
    flags = ["--params_end", 5, "--epochs", 1, "--device", "cpu", "--dist-timeout", 120,
             "--output-dir", tmp_path / "out", "--log-dir", tmp_path / "out"]
    results = launch_nodes("train_twa.py", [common(tiny_data, sgd_checkpoints, *flags),
                                            common(tiny_data, other_node, *flags)])
    (rc0, err0, seconds0), (rc1, err1, seconds1) = results
    assert rc1 == 2 and f"checkpoint not found: {other_node / '3.pt'}" in err1, err1[-500:]
    assert rc0 == 2 and "process 1 of 2 stopped on bad input" in err0, err0[-500:]
    assert len(err0.strip().splitlines()) == 1 and max(seconds0, seconds1) < 100


@pytest.mark.slow
def test_nodes_that_disagree_on_the_data_stop_naming_the_flag(tiny_data, tmp_path):
    flags = ["--epochs", 1, "--device", "cpu", "--save-dir", tmp_path / "run"]
    results = launch_nodes("train_sgd.py", [common(tiny_data, tmp_path / "run", *flags),
                                            common(tiny_data, tmp_path / "run", *flags,
                                                   "--train-subset", 40)])
    for rc, err, _ in results:
        assert rc == 2 and "the 2 processes disagree on --train-subset" in err, err[-500:]
    assert not (tmp_path / "run" / "0.pt").exists()  # stopped before the first file


def rewrite(path, shift=1.0):
    """The file saved again under its name, one weight moved by `shift` (another run's, a stale
    copy); the same size for any shift."""
    state = torch.load(path, weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + shift
    torch.save(state, path)


@pytest.mark.slow
def test_nodes_holding_other_files_under_the_same_names_stop_naming_them(sgd_checkpoints, tiny_data,
                                                                          tmp_path):
    """Checkpoints of the same names and sizes, another content on one node (no manifest to catch
    it): compared by SHA-256, hashed once per node, refused before a patchwork basis is built."""
    for node in ("a", "b"):
        shutil.copytree(sgd_checkpoints, tmp_path / node / "ck")
        os.remove(tmp_path / node / "ck" / runfiles.Manifest.FILE)
    rewrite(tmp_path / "a" / "ck" / "2.pt", shift=0.0)
    rewrite(tmp_path / "b" / "ck" / "2.pt")
    assert os.path.getsize(tmp_path / "a" / "ck" / "2.pt") == os.path.getsize(tmp_path / "b" / "ck" / "2.pt")
    flags = common(tiny_data, "ck", "--params_end", 5, "--epochs", 1, "--device", "cpu",
                   "--output-dir", "out", "--log-dir", "out")
    results = launch_nodes("train_twa.py", [flags, flags], cwds=[tmp_path / "a", tmp_path / "b"])
    for rc, err, _ in results:
        assert rc == 2 and "the 2 processes disagree on checkpoint files" in err, err[-500:]
    assert not (tmp_path / "a" / "out" / "twa.pt").exists()


PEER_STOPS = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import cli

def main(argv):
    dist.init_process_group("gloo")
    for step in range(10 ** 6):
        if dist.get_rank() == 1 and step == 20:
            os._exit(9)  # as if killed: no goodbye to the group
        dist.all_reduce(torch.zeros(10))

cli.run_main(main)
"""


def test_the_survivor_of_a_killed_process_says_one_line_naming_it(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(PEER_STOPS.format(root=ROOT))
    (rc0, err0, _), (rc1, _, _) = launch_nodes(script, [[], []], timeout=120)
    assert rc1 == 9
    assert rc0 == 1 and err0.strip().splitlines() == [
        "error: process 0 of 2 lost contact with process 1, which stopped or stalled past "
        "--dist-timeout (its own output says why); the last saved state is kept"], err0


@pytest.mark.slow
@pytest.mark.parametrize("loader, within", [("memory", 1e-5), ("torchvision", 0.1)])
def test_an_empty_share_of_the_last_batch_trains_as_one_process(tiny_data, tmp_path, loader, within):
    """48 images at -b 47 on 2 processes: the last global batch holds one image, rank 1 none. The
    in-memory loader crops by (seed, epoch, image), so N processes equal one to rounding; the
    torchvision path draws crops from each process's generator, so only the images agree."""
    for n in (1, 2):
        launch("train_sgd.py", n, "--datasets", "ImageFolder", "--data-dir", tiny_data, "--arch",
               "resnet20", "-b", 47, "--save-dir", tmp_path / f"p{n}", "--device", "cpu",
               "--epochs", 1, "--lr", 0.02, "--loader", loader, "-j", 0)
    one, two = (torch.load(tmp_path / f"p{n}" / "1.pt", weights_only=True) for n in (1, 2))
    assert relative_difference(one, two) < within
    rows = [runfiles.read_jsonl(tmp_path / f"p{n}" / "metrics.jsonl")[0] for n in (1, 2)]
    assert abs(rows[0]["train_loss"] - rows[1]["train_loss"]) < 10 * within * rows[0]["train_loss"]
    states = torch.load(tmp_path / "p2" / "state.pt", weights_only=True)["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["cpu"], states[1]["cpu"])
