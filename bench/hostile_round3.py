"""The third round of the hostile sweep (bench/hostile_sweep.py runs it after the first two): the
19 causes of issue 22, as "r3-N", then cases that no issue names, as "r3 own:"."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import torch
from PIL import Image

from hostile_kit import PY, SGD, TWA, TWA_BASE, Broken, expect, flags, run, start, start_nodes, \
    nodes, wait_for


def library(code, timeout=120):
    """Run `code` with the project importable: (exit code, stdout + stderr)."""
    proc = subprocess.run([PY, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n{code}"],
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def library_case(code, *printed):
    """A case that runs `code` against the library: it must exit 0 and print every phrase."""
    def case(t):
        rc, out = library(code)
        if rc != 0 or any(phrase not in out for phrase in printed):
            raise Broken(out[-300:])
    return case


def expect_argparse(result, *phrases):
    """argparse's own refusal: exit 2, its usage, then one error line holding every phrase."""
    rc, err = result
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if rc != 2 or "error:" not in last or any(p not in last for p in phrases):
        raise Broken(f"exit {rc}: {err.strip()[-300:]}")


def results(folder):
    with open(os.path.join(folder, "twa_results.json")) as f:
        return json.load(f)


def coefficients(folder):
    with open(os.path.join(folder, "coefficients.json")) as f:
        return json.load(f)


def edit_checkpoint(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def copy_tree(data, t):
    return shutil.copytree(data, os.path.join(t, "data"))


def cases(fx):
    """(name, function) pairs over a hostile_kit.Fixture."""
    data, base = fx.data, fx.base

    def other_files_same_names(t):
        for node in ("a", "b"):
            fx.copy_base(os.path.join(t, node, "ck"), manifest=False)
            edit_checkpoint(os.path.join(t, node, "ck", "2.pt"), lambda s: None)
        edit_checkpoint(os.path.join(t, "b", "ck", "2.pt"),
                        lambda s: s["fc.bias"].add_(1.0))
        args = flags(data, "ck", *TWA_BASE, "--output-dir", "out", "--log-dir", "out")
        for result in nodes(TWA, [args, args], cwds=[os.path.join(t, "a"), os.path.join(t, "b")]):
            expect(result, 2, "disagree on checkpoint files")

    def zero_tensor_layerwise(t):
        expect(fx.twa(base, t, "--layer-size", 0, "--coefficients", "alpha"), 0)
        alpha = [a for block in coefficients(t)["blocks"] for a in block["alpha"]]
        miss = coefficients(t)["reconstruction"]["relative"]
        if max(map(abs, alpha)) > 100 or miss > 1e-3:
            raise Broken(f"max |alpha| {max(map(abs, alpha)):.3g}, reconstruction misses by {miss:.2g}")

    def twa_resume_replaced(t):
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        out = os.path.join(t, "out")
        expect(fx.twa(folder, out), 0)
        edit_checkpoint(os.path.join(folder, "3.pt"), lambda s: s["fc.bias"].add_(0.5))
        expect(fx.twa(folder, out, "--resume"), 2, "checkpoint contents")

    def sgd_resume_other_data(t):
        tree = copy_tree(data, t)
        run_dir = os.path.join(t, "run")
        expect(run(SGD, flags(tree, run_dir, "--epochs", 1, "--train-subset", 30)), 0)
        Image.new("RGB", (32, 32), (9, 9, 9)).save(os.path.join(tree, "train", "a", "added.png"))
        expect(run(SGD, flags(tree, run_dir, "--epochs", 1, "--train-subset", 30, "--resume")), 2,
               "saved on other data")

    def integer_weight(t):
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        edit_checkpoint(os.path.join(folder, "2.pt"),
                        lambda s: s.__setitem__("fc.weight", s["fc.weight"].long()))
        expect(fx.twa(folder, os.path.join(t, "out")), 2, "fc.weight")

    def prefixed_twin(t):
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        edit_checkpoint(os.path.join(folder, "1.pt"),
                        lambda s: s.__setitem__("module.fc.bias", s["fc.bias"] + 1))
        expect(fx.twa(folder, os.path.join(t, "out")), 2, "module.fc.bias")

    def symlink_loop(t):
        tree = copy_tree(data, t)
        os.symlink("..", os.path.join(tree, "train", "a", "loop"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 2, "loop")

    def sixteen_bit_png(t):
        tree = copy_tree(data, t)
        pixels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
        Image.fromarray(pixels).save(os.path.join(tree, "train", "b", "deep.png"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 2, "deep.png")

    def constant_channel(t):
        tree = os.path.join(t, "data")
        for split, count in (("train", 8), ("test", 2)):
            for label, name in enumerate("abc"):
                os.makedirs(os.path.join(tree, split, name))
                for i in range(count):
                    pixels = np.full((32, 32, 3), 40, np.uint8)
                    pixels[..., 0] = (i * 20 + label * 60) % 255
                    Image.fromarray(pixels).save(os.path.join(tree, split, name, f"{i}.png"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 2, "constant")

    def finished_folder(t):
        expect(fx.twa(base, t), 0)
        expect(fx.twa(base, t, "--epochs", 2), 2, "earlier TWA run", "--overwrite")
        expect(fx.twa(base, t, "--params_end", 3, "--overwrite"), 0)
        if len(coefficients(t)["checkpoints"]) != 3 or results(t)["args"]["params_end"] != 3:
            raise Broken("--overwrite left the earlier run's outputs")

    def huge_range(t):
        started = time.time()
        expect(fx.twa(base, t, "--params_end", 1_000_000_000), 2, "checkpoint not found")
        if time.time() - started > 60:
            raise Broken(f"took {time.time() - started:.0f} s")

    def named_pipe(t):
        tree = copy_tree(data, t)
        os.mkfifo(os.path.join(tree, "train", "c", "x.png"))
        expect(run(SGD, flags(tree, os.path.join(t, "run")), timeout=120), 2, "x.png")

    def first_image_broken(t):
        tree = copy_tree(data, t)
        first = os.path.join(tree, "train", "a", "0.png")
        with open(first, "r+b") as f:
            f.truncate(100)
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 2, "cannot decode image")

    def cache_dir_is_a_file(t):
        blocker = os.path.join(t, "not-a-folder")
        open(blocker, "w").close()
        proc = subprocess.run([PY, SGD, *map(str, flags(data, os.path.join(t, "run")))],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "TWA_CACHE_DIR": blocker})
        if proc.returncode != 0 or "cache" not in proc.stdout + proc.stderr:
            raise Broken(f"exit {proc.returncode}: {proc.stderr[-300:]}")

    def meta_tensor(t):
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        edit_checkpoint(os.path.join(folder, "0.pt"),
                        lambda s: s.__setitem__("fc.bias", s["fc.bias"].to("meta")))
        expect(fx.twa(folder, os.path.join(t, "out")), 2, "meta")

    def dangling_link(t):
        tree = copy_tree(data, t)
        os.symlink(os.path.join(t, "nowhere.png"), os.path.join(tree, "train", "b", "gone.png"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 2, "gone.png")

    def non_utf8_path(t):
        save = os.path.join(t, b"run-\xfe".decode("utf-8", "surrogateescape"))
        args = [PY, SGD, *map(str, flags(data, save, "--epochs", 1))]
        proc = subprocess.run([os.fsencode(a) for a in args], capture_output=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0 or b"Logging error" in proc.stderr:
            raise Broken(f"exit {proc.returncode}: {proc.stderr[-300:]!r}")

    def peer_killed_during_twa(t):
        out = os.path.join(t, "out")
        args = flags(data, base, "--params_end", 5, "--epochs", 40, "--output-dir", out,
                     "--log-dir", out)
        procs = start_nodes(TWA, [args, args])
        wait_for(os.path.join(out, "twa_state.pt"), procs[0])
        procs[1].kill()
        err = procs[0].communicate(timeout=200)[1]
        procs[1].wait(timeout=60)
        expect((procs[0].returncode, err), 1, "lost contact with process 1")

    recorder_after_handout = library_case(  # the space handed out keeps its rank
        "import torch, twa\n"
        "model = torch.nn.Linear(4, 2)\n"
        "rec = twa.SubspaceRecorder(model, 4)\n"
        "rec.add(model); model.weight.data += 1; rec.add(model)\n"
        "space = rec.subspace()\n"
        "model.weight.data += 1\n"
        "try:\n    rec.add(model)\nexcept Exception as err:\n    print('refused:', err)\n"
        "print('rank', space.rank)\n", "refused:", "rank 2")
    submodule_named_module = library_case(
        "import torch, twa\n"
        "net = torch.nn.Sequential()\n"
        "net.add_module('module', torch.nn.Linear(4, 2))\n"
        "states = [{k: v + i for k, v in net.state_dict().items()} for i in range(3)]\n"
        "print('rank', twa.Subspace.from_checkpoints(net, states).rank)\n", "rank 2")
    no_trainable_parameters = library_case(
        "import torch, twa\n"
        "try:\n    twa.SubspaceRecorder(torch.nn.ReLU(), 3)\n"
        "except ValueError as err:\n    print('refused:', err)\n", "refused:")

    def resume_before_first_state(t):
        expect(fx.twa(base, t, "--resume"), 0)

    # -- cases no issue names -------------------------------------------------------------------

    def resume_and_overwrite(t):
        expect(fx.twa(base, t, "--resume", "--overwrite"), 2, "--resume", "--overwrite")

    def checkpoint_is_a_folder(t):
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        os.remove(os.path.join(folder, "2.pt"))
        os.makedirs(os.path.join(folder, "2.pt"))
        expect(fx.twa(folder, os.path.join(t, "out")), 2, "2.pt")

    def checkpoint_links_to_another(t):
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        os.remove(os.path.join(folder, "4.pt"))
        os.symlink(os.path.join(folder, "2.pt"), os.path.join(folder, "4.pt"))
        out = os.path.join(t, "out")
        expect(fx.twa(folder, out), 0)
        if results(out)["basis"]["rank"] != 4:
            raise Broken(f"rank {results(out)['basis']['rank']} from 4 distinct checkpoints")

    def checkpoint_as_state(t):
        expect(fx.sgd(t), 0)
        shutil.copy(os.path.join(t, "1.pt") if os.path.exists(os.path.join(t, "1.pt"))
                    else os.path.join(base, "1.pt"), os.path.join(t, "state.pt"))
        expect(fx.sgd(t, "--resume"), 2, "state.pt")

    def other_twa_state(t):
        expect(fx.twa(base, t), 0)
        expect(fx.twa(base, t, "--params_end", 4, "--resume"), 2, "--params-end")

    def bad_int_flag(script_is_sgd, flag, value, *phrases):
        def case(t):
            expect(fx.sgd(t, flag, value) if script_is_sgd else fx.twa(base, t, flag, value), 2,
                   *phrases)
        return case

    def bad_choice(t):
        expect_argparse(fx.twa(base, t, "--pbits", 3), "--pbits")

    def mixed_architectures(t):
        other = os.path.join(t, "other.pt")
        proc = library("import torch, models\n"
                       f"torch.save(models.ARCHS['resnet32'](num_classes=3).state_dict(), {other!r})")
        if proc[0] != 0:
            raise Broken(proc[1][-300:])
        expect(run(TWA, flags(data, t, "--checkpoints", os.path.join(base, "1.pt"), other,
                              "--val-split", 20, "--epochs", 1)), 2, "other.pt")

    def same_file_twice(t):
        one = os.path.join(base, "2.pt")
        expect(run(TWA, flags(data, t, "--checkpoints", one, one, os.path.join(base, "4.pt"),
                              "--val-split", 20, "--epochs", 1)), 0)

    def data_dir_is_a_file(t):
        bogus = os.path.join(t, "data")
        open(bogus, "w").close()
        expect(run(SGD, flags(bogus, os.path.join(t, "run"))), 2, "data")

    def empty_class_folder(t):
        tree = copy_tree(data, t)
        os.makedirs(os.path.join(tree, "train", "d"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 2)

    def test_class_unknown(t):
        tree = copy_tree(data, t)
        shutil.copytree(os.path.join(tree, "test", "a"), os.path.join(tree, "test", "z"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 2, "different class folders")

    def grayscale_and_rgba(t):
        tree = copy_tree(data, t)
        Image.new("L", (32, 32), 90).save(os.path.join(tree, "train", "a", "gray.png"))
        Image.new("RGBA", (32, 32), (10, 200, 30, 128)).save(os.path.join(tree, "train", "b", "rgba.png"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"))), 0)

    def batch_above_data(t):
        expect(fx.sgd(t, "-b", 4096), 0)

    def tiny_val_split(t):
        expect(fx.sgd(t, "--val-split", 0.01), 2, "--val-split")

    def two_signals(first, second, pause, codes):
        """Two signals `pause` seconds apart once SGD has saved a state: it ends with one of
        `codes`, and --resume then finishes it."""
        def case(t):
            proc = start(SGD, flags(data, t, "--epochs", 3))
            wait_for(os.path.join(t, "state.pt"), proc)
            proc.send_signal(first)
            time.sleep(pause)
            proc.send_signal(second)
            if proc.wait(timeout=300) not in codes:
                raise Broken(f"exit {proc.returncode}: {proc.stderr.read()[-300:]}")
            expect(fx.sgd(t, "--epochs", 3, "--resume"), 0)
        return case

    def log_dir_is_a_file(t):
        blocker = os.path.join(t, "logs")
        open(blocker, "w").close()
        expect(fx.sgd(os.path.join(t, "run"), "--log-dir", blocker), 2, "cannot write")

    def read_only_parent(t):
        parent = os.path.join(t, "ro")
        os.makedirs(parent)
        os.chmod(parent, 0o555)
        try:
            if os.access(parent, os.W_OK):  # root ignores the mode: nothing to test
                return
            expect(fx.sgd(os.path.join(parent, "run")), 2, "cannot write")
        finally:
            os.chmod(parent, 0o755)

    def init_is_a_folder(t):
        expect(fx.sgd(os.path.join(t, "run"), "--init", t), 2, "Is a directory")

    def init_other_arch(t):
        expect(fx.sgd(os.path.join(t, "run"), "--init", os.path.join(base, "1.pt"), "--arch",
                      "resnet32"), 2, "resnet32")

    def truncated_state(t):
        expect(fx.sgd(t), 0)
        with open(os.path.join(t, "state.pt"), "r+b") as f:
            f.truncate(1000)
        expect(fx.sgd(t, "--resume"), 2, "state.pt")

    def empty_twa_state(t):
        expect(fx.twa(base, t), 0)
        open(os.path.join(t, "twa_state.pt"), "w").close()
        expect(fx.twa(base, t, "--resume"), 2, "twa_state.pt")

    def long_name(t):
        expect(fx.sgd(os.path.join(t, "x" * 300)), 2, "cannot write")

    def cuda_without_gpu(t):
        if torch.cuda.is_available():
            return
        expect(fx.sgd(t, "--device", "cuda"), 2, "cuda")

    def missing_key(t):
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        edit_checkpoint(os.path.join(folder, "3.pt"), lambda s: s.pop("fc.bias"))
        expect(fx.twa(folder, os.path.join(t, "out")), 2, "3.pt")

    def extra_entries(t):
        """Entries beside the model's (an epoch counter, an optimizer's state) are not weights:
        they are left alone, and the weights are the same as without them."""
        folder = fx.copy_base(os.path.join(t, "ck"), manifest=False)
        edit_checkpoint(os.path.join(folder, "3.pt"),
                        lambda s: s.update(epoch=torch.tensor(3), optimizer={"lr": torch.tensor(0.1)}))
        expect(fx.twa(folder, os.path.join(t, "out")), 0)
        expect(fx.twa(base, os.path.join(t, "plain")), 0)
        if coefficients(os.path.join(t, "out"))["alpha"] != coefficients(os.path.join(t, "plain"))["alpha"]:
            raise Broken("extra entries changed the coefficients")

    def two_outputs_at_once(t):
        outs = [os.path.join(t, f"out{i}") for i in range(2)]
        procs = [start(TWA, flags(data, base, *TWA_BASE, "--output-dir", out, "--log-dir", out))
                 for out in outs]
        for proc in procs:
            if proc.wait(timeout=300) != 0:
                raise Broken(f"exit {proc.returncode}: {proc.stderr.read()[-300:]}")
        first, second = (torch.load(os.path.join(out, "twa.pt"), weights_only=True) for out in outs)
        if not all(torch.equal(first[k], second[k]) for k in first):
            raise Broken("two identical runs side by side wrote different weights")

    def finished_sgd_resumed(t):
        run_dir = fx.copy_base(os.path.join(t, "run"))
        before = sorted(name for name in os.listdir(run_dir) if name.endswith(".pt"))
        expect(run(SGD, flags(data, run_dir, "--epochs", 2, "--save-every", 2, "--resume")), 0)
        if sorted(name for name in os.listdir(run_dir) if name.endswith(".pt")) != before:
            raise Broken("resuming a finished run wrote new files")

    def twa_at_beyond(t):
        expect(fx.sgd(t, "--twa-at", 5), 2, "--twa-at")

    def pca_components_zero(t):
        expect(fx.twa(base, t, "--extract", "PCA", "--n_components", 0), 2, "--n_components")

    return [
        ("r3-1 two nodes, other files under the same names", other_files_same_names),
        ("r3-2 zero tensors in layer-wise blocks (alpha)", zero_tensor_layerwise),
        ("r3-3 --tol -1", bad_int_flag(False, "--tol", -1, "--tol must lie in (0, 1)")),
        ("r3-4 twa --resume after a checkpoint was replaced", twa_resume_replaced),
        ("r3-5 sgd --resume after images were added", sgd_resume_other_data),
        ("r3-6 an int64 fc.weight", integer_weight),
        ("r3-6 k and module.k in one checkpoint", prefixed_twin),
        ("r3-7 a symbolic link loop in the data", symlink_loop),
        ("r3-7 a 16-bit PNG", sixteen_bit_png),
        ("r3-7 an input channel constant everywhere", constant_channel),
        ("r3-8 a finished TWA folder, then --overwrite", finished_folder),
        ("r3-9 --warmup-epochs nan", bad_int_flag(False, "--warmup-epochs", "nan", "finite")),
        ("r3-9 --train-subset above the images", bad_int_flag(True, "--train-subset", 10_000,
                                                             "exceeds")),
        ("r3-10 --params_end 1e9", huge_range),
        ("r3-11 a named pipe called x.png", named_pipe),
        ("r3-12 the first image does not decode", first_image_broken),
        ("r3-13 TWA_CACHE_DIR names a file", cache_dir_is_a_file),
        ("r3-14 --randomseed -5", bad_int_flag(True, "--randomseed", -5, "--randomseed")),
        ("r3-14 --split-seed 2^70", bad_int_flag(True, "--split-seed", 2 ** 70, "--split-seed")),
        ("r3-15 a tensor on the meta device", meta_tensor),
        ("r3-16 a dangling link in a class folder", dangling_link),
        ("r3-16 a save path that is not UTF-8", non_utf8_path),
        ("r3-17 torchrun: a peer killed during TWA", peer_killed_during_twa),
        ("r3-18 recorder.add after subspace()", recorder_after_handout),
        ("r3-18 a submodule named module", submodule_named_module),
        ("r3-18 a model without trainable parameters", no_trainable_parameters),
        ("r3-19 twa --resume before its first state", resume_before_first_state),
        ("r3 own: --resume with --overwrite", resume_and_overwrite),
        ("r3 own: a checkpoint that is a folder", checkpoint_is_a_folder),
        ("r3 own: a checkpoint linked to another", checkpoint_links_to_another),
        ("r3 own: a checkpoint in place of state.pt", checkpoint_as_state),
        ("r3 own: --resume of a TWA state of another range", other_twa_state),
        ("r3 own: --params_stride 0", bad_int_flag(False, "--params_stride", 0, "--params_stride")),
        ("r3 own: --params_start -2", bad_int_flag(False, "--params_start", -2, "range")),
        ("r3 own: --layer-size -1", bad_int_flag(False, "--layer-size", -1, "--layer-size")),
        ("r3 own: --pbits 3", bad_choice),
        ("r3 own: --extract PCA --n_components 0", pca_components_zero),
        ("r3 own: soup of two architectures", mixed_architectures),
        ("r3 own: soup with one file twice", same_file_twice),
        ("r3 own: --data-dir is a file", data_dir_is_a_file),
        ("r3 own: an empty class folder", empty_class_folder),
        ("r3 own: a test class not in train", test_class_unknown),
        ("r3 own: grayscale and RGBA images among RGB", grayscale_and_rgba),
        ("r3 own: -b above the number of images", batch_above_data),
        ("r3 own: --val-split 0.01 of 48 images", tiny_val_split),
        ("r3 own: SIGTERM twice in a row", two_signals(signal.SIGTERM, signal.SIGTERM, 0.05,
                                                        (143, -signal.SIGTERM))),
        ("r3 own: SIGSTOP, then SIGCONT", two_signals(signal.SIGSTOP, signal.SIGCONT, 2, (0,))),
        ("r3 own: --log-dir is a file", log_dir_is_a_file),
        ("r3 own: --save-dir in a read-only folder", read_only_parent),
        ("r3 own: --init is a folder", init_is_a_folder),
        ("r3 own: --init of another architecture", init_other_arch),
        ("r3 own: a truncated state.pt", truncated_state),
        ("r3 own: an empty twa_state.pt", empty_twa_state),
        ("r3 own: a 300-character folder name", long_name),
        ("r3 own: --device cuda without a GPU", cuda_without_gpu),
        ("r3 own: --lr -0.1", bad_int_flag(True, "--lr", -0.1, "--lr")),
        ("r3 own: --workers -1", bad_int_flag(True, "--workers", -1, "--workers")),
        ("r3 own: --threads -1", bad_int_flag(True, "--threads", -1, "--threads")),
        ("r3 own: --twa-at past --epochs", twa_at_beyond),
        ("r3 own: a checkpoint missing a tensor", missing_key),
        ("r3 own: a checkpoint with entries beside the weights", extra_entries),
        ("r3 own: two TWA runs side by side, other outputs", two_outputs_at_once),
        ("r3 own: --resume of a finished SGD run", finished_sgd_resumed),
    ]
