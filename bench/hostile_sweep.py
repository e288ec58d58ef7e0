"""An adversarial sweep of both scripts: bad flags, bad files, faults and signals at random moments,
a full disk, runs that collide, torchrun with ranks that disagree, lack a file or die.

    python bench/hostile_sweep.py [--out bench/results/hostile-sweep.txt] [--only SUBSTRING]

Each case runs the scripts as a user would, on a tiny synthetic ImageFolder tree, and checks what
a careful user expects: the exit code; for an error, one line on stderr (no traceback); that no file
left behind is torn, holds a NaN or mixes two runs; and that a resumed run finishes. Prints one line
per case (held / FAILED and why) and the totals, and writes them to --out. About 10 minutes on 2
cores.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import torch
from PIL import Image

import hostile_round3
import runfiles
from hostile_kit import (PY, SGD, TWA, ENV, TWA_BASE, Broken, Fixture, default_sigint, expect,
                         file_limit, files_whole_and_finite, flags, image_tree, nodes, run, start,
                         wait_for)
import common


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(common.ROOT, "bench", "results",
                                                      "hostile-sweep.txt"))
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------------
# The cases: each takes a fresh folder `t` and the shared fixtures, and raises Broken if it fails
# ---------------------------------------------------------------------------------------------------

def cases(data, base):
    """(name, function) pairs of the first two rounds."""
    twa_base = TWA_BASE
    fixture = Fixture(data, base)
    sgd, twa, copy_base = fixture.sgd, fixture.twa, fixture.copy_base

    def blow_up(t):
        expect(sgd(t, "--epochs", 2, "--lr", 1e4, "--schedule", "constant", "--save-every", 6), 1,
               "non-finite")
        files_whole_and_finite(t)

    def collide(t):
        first = start(SGD, flags(data, t, "--epochs", 50))
        wait_for(os.path.join(t, "0.pt"), first)
        expect(sgd(t, "--epochs", 50, "--resume"), 2, "in use by another run", f"pid {first.pid}")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)

    def resume_changed(flag, value):
        def case(t):
            expect(sgd(t), 0)
            expect(sgd(t, flag, value, "--resume"), 2, "was saved with")
        return case

    def twa_resume_other_opt(t):
        expect(twa(base, t), 0)
        expect(twa(base, t, "--opt", "AdamW", "--resume"), 2, "--opt SGD, not AdamW")

    def impossible_counters(t):
        expect(sgd(t), 0)
        state = torch.load(os.path.join(t, "state.pt"), weights_only=True)
        state["progress"]["batch"] = -1
        torch.save(state, os.path.join(t, "state.pt"))
        expect(sgd(t, "--resume"), 2, "impossible counters")

    def killed_after_first_checkpoint(t):
        shutil.copy(os.path.join(base, "0.pt"), os.path.join(t, "0.pt"))
        expect(sgd(t, "--epochs", 2, "--save-every", 2, "--resume"), 0)
        if not torch.equal(torch.load(os.path.join(t, "4.pt"), weights_only=True)["fc.weight"],
                           torch.load(os.path.join(base, "4.pt"), weights_only=True)["fc.weight"]):
            raise Broken("the restarted run differs from an uninterrupted one")

    def finished_twa_resumed(t):
        expect(twa(base, t), 0)
        first = torch.load(os.path.join(t, "twa.pt"), weights_only=True)
        expect(twa(base, t, "--resume"), 0)
        again = torch.load(os.path.join(t, "twa.pt"), weights_only=True)
        if not all(torch.equal(first[k], again[k]) for k in first):
            raise Broken("twa.pt differs after resuming a finished run")

    def node_lacks_checkpoint(t):
        other = copy_base(os.path.join(t, "node1"))
        os.remove(os.path.join(other, "3.pt"))
        started = time.time()
        out = os.path.join(t, "out")
        results = nodes(TWA, [flags(data, base, *twa_base, "--output-dir", out, "--log-dir", out),
                              flags(data, other, *twa_base, "--output-dir", out, "--log-dir", out)])
        expect(results[1], 2, "checkpoint not found")
        expect(results[0], 2, "process 1 of 2 stopped")
        if time.time() - started > 90:
            raise Broken(f"took {time.time() - started:.0f} s")

    def ranks_disagree(t):
        results = nodes(SGD, [flags(data, t, "--epochs", 1),
                              flags(data, t, "--epochs", 1, "--train-subset", 40)])
        for result in results:
            expect(result, 2, "disagree on --train-subset")

    def rank_dies(t):
        procs = subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2", SGD, *map(str, flags(data, t, "--epochs", 10))],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
        wait_for(os.path.join(t, "2.pt"), procs)
        children = subprocess.run(["pgrep", "-f", f"train_sgd.py.*{t}"], capture_output=True,
                                  text=True).stdout.split()
        workers = [int(pid) for pid in children if int(pid) != procs.pid]
        os.kill(max(workers), signal.SIGKILL)  # the younger worker: rank 1
        started = time.time()
        rc = procs.wait(timeout=300)
        if rc == 0 or time.time() - started > 120:
            raise Broken(f"torchrun exit {rc} after {time.time() - started:.0f} s")
        files_whole_and_finite(t, temp_files_allowed=True)
        expect(sgd(t, "--epochs", 10, "--resume", timeout=900), 0)  # alone, after the crash
        files_whole_and_finite(t)

    def unwritable(flag):
        def case(t):
            open(os.path.join(t, "a-file"), "w").close()
            target = os.path.join(t, "a-file", "x")
            result = sgd(t, flag, target) if flag != "--output-dir" else twa(base, target)
            expect(result, 2, "cannot write to")
        return case

    def truncated_image(t):
        tree = shutil.copytree(data, os.path.join(t, "data"))
        bad = os.path.join(tree, "train", "b", "3.png")
        with open(bad, "r+b") as f:
            f.truncate(200)
        expect(run(SGD, flags(tree, os.path.join(t, "run"), "--epochs", 1)), 2, "cannot decode image",
               bad)

    def truncated_cache(t):
        cache = os.path.join(t, "cache")
        env_run = {**ENV, "TWA_CACHE_DIR": cache}
        subprocess.run([PY, SGD, *map(str, flags(data, os.path.join(t, "a"), "--epochs", 1))],
                       env=env_run, check=True, capture_output=True)
        for name in os.listdir(cache):
            with open(os.path.join(cache, name), "r+b") as f:
                f.truncate(100)
        proc = subprocess.run([PY, SGD, *map(str, flags(data, os.path.join(t, "b"), "--epochs", 1))],
                              env=env_run, capture_output=True, text=True)
        if proc.returncode != 0 or "rebuilding it" not in proc.stdout + proc.stderr:
            raise Broken(f"exit {proc.returncode}: {proc.stderr[-300:]}")

    def nan_checkpoint(t):
        bad = copy_base(os.path.join(t, "ckpt"))
        state = torch.load(os.path.join(bad, "2.pt"), weights_only=True)
        state["blocks.0.conv1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(state, os.path.join(bad, "2.pt"))
        os.remove(os.path.join(bad, "checkpoints.json"))
        expect(twa(bad, os.path.join(t, "out")), 2, "2.pt: 'blocks.0.conv1.weight' holds NaN")

    def string_tensor(t):
        bad = copy_base(os.path.join(t, "ckpt"))
        state = torch.load(os.path.join(bad, "1.pt"), weights_only=True)
        state["fc.bias"] = "zeros"
        torch.save(state, os.path.join(bad, "1.pt"))
        os.remove(os.path.join(bad, "checkpoints.json"))
        expect(twa(bad, os.path.join(t, "out")), 2, "'fc.bias' is a str, not a tensor")

    def state_is_a_list(t):
        expect(sgd(t), 0)
        torch.save([1, 2, 3], os.path.join(t, "state.pt"))
        expect(sgd(t, "--resume"), 2, "not a resume state")

    def bad_split(t):
        split = os.path.join(t, "split.json")
        with open(split, "w") as f:
            json.dump({"examples": 48, "percent": 10, "seed": 0, "held_out": "1,2"}, f)
        expect(twa(base, os.path.join(t, "out"), "--split", split, "--val-split", 10), 2,
               "cannot read the split")

    def early_sigint(t):
        proc = subprocess.Popen([PY, SGD, *map(str, flags(data, t, "--epochs", 1))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                preexec_fn=default_sigint)
        proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        expect((proc.returncode, err), 143, "interrupted")

    def flipped_byte(t):
        rotted = copy_base(os.path.join(t, "ckpt"))
        path = os.path.join(rotted, "3.pt")
        raw = bytearray(open(path, "rb").read())
        raw[len(raw) // 2] ^= 1
        open(path, "wb").write(bytes(raw))
        expect(twa(rotted, os.path.join(t, "out")), 2, "is not the file train_sgd.py saved")

    def corrupt_manifest(t):
        folder = copy_base(os.path.join(t, "ckpt"))
        with open(os.path.join(folder, "checkpoints.json"), "w") as f:
            f.write("{not json")
        expect(twa(folder, os.path.join(t, "out")), 2, "cannot read the checkpoint manifest")

    def terminated_and_resumed(script_is_sgd, kill):
        def case(t):
            if script_is_sgd:
                args, marker = flags(data, t, "--epochs", 3, "--save-every", 6), "state.pt"
            else:
                args = flags(data, base, *twa_base[:2], "--epochs", 4, "--output-dir", t, "--log-dir", t)
                marker = "twa_state.pt"
            proc = start(SGD if script_is_sgd else TWA, args)
            wait_for(os.path.join(t, marker), proc)
            time.sleep(random.uniform(0, 1.5))
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            rc = proc.wait(timeout=120)
            final = os.path.join(t, "18.pt" if script_is_sgd else "twa.pt")
            # a signal that lands after the run's last file, while the interpreter shuts down,
            # ends it by the signal itself: nothing is lost
            finished = rc == -signal.SIGTERM and os.path.exists(final)
            if rc not in ((-9,) if kill else (143, 0)) and not finished:
                raise Broken(f"exit {rc}: {proc.stderr.read()[-300:]}")
            files_whole_and_finite(t, temp_files_allowed=kill)
            expect(run(SGD if script_is_sgd else TWA, args + ["--resume"]), 0)
            if not os.path.exists(final):
                raise Broken("the resumed run did not finish")
            files_whole_and_finite(t)
        return case

    def full_disk(script_is_sgd):
        def case(t):
            if script_is_sgd:
                result = sgd(t, "--epochs", 2, preexec=file_limit(600_000))
            else:
                result = twa(base, t, preexec=file_limit(20_000))
            expect(result, 1, "cannot write")
            files_whole_and_finite(t)
        return case

    def usage(script_is_sgd, extra, *phrases):
        def case(t):
            expect(sgd(t, *extra) if script_is_sgd else twa(base, t, *extra), 2, *phrases)
        return case

    def empty_checkpoint(t):
        folder = copy_base(os.path.join(t, "ckpt"))
        open(os.path.join(folder, "2.pt"), "w").close()
        expect(twa(folder, os.path.join(t, "out")), 2, "2.pt")

    def pickled_code(t):
        folder = copy_base(os.path.join(t, "ckpt"))
        os.remove(os.path.join(folder, "checkpoints.json"))
        torch.save({"x": torch.zeros(1), "code": Broken("pickled")}, os.path.join(folder, "1.pt"))
        expect(twa(folder, os.path.join(t, "out")), 2, "refusing to load")

    def other_architecture(t):
        expect(twa(base, t, "--arch", "resnet32"), 2, "does not match --arch resnet32")

    def mixed_sizes(t):
        tree = shutil.copytree(data, os.path.join(t, "data"))
        Image.new("RGB", (28, 28)).save(os.path.join(tree, "train", "a", "odd.png"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"), "--epochs", 1)), 2, "differ in size")

    def no_test_folder(t):
        tree = shutil.copytree(data, os.path.join(t, "data"))
        shutil.rmtree(os.path.join(tree, "test"))
        expect(run(SGD, flags(tree, os.path.join(t, "run"), "--epochs", 1)), 2, "must hold train/")

    def nan_init(t):
        state = torch.load(os.path.join(base, "1.pt"), weights_only=True)
        state["fc.weight"][0, 0] = float("inf")
        torch.save(state, os.path.join(t, "init.pt"))
        expect(sgd(os.path.join(t, "run"), "--init", os.path.join(t, "init.pt")), 1, "non-finite")
        expect(sgd(os.path.join(t, "run")), 0)  # the folder is not stuck

    def corrupt_metrics(t):
        expect(sgd(t), 0)
        with open(os.path.join(t, "metrics.jsonl"), "a") as f:
            f.write("{half a row\n")
        expect(sgd(t, "--resume"), 2, "metrics.jsonl line 2 is not JSON")

    def two_twa_runs(t):
        first = start(TWA, flags(data, base, *twa_base[:2], "--epochs", 30, "--output-dir", t,
                                 "--log-dir", t))
        wait_for(os.path.join(t, "twa_args.json"), first)
        expect(twa(base, t), 2, "in use by another run")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)

    def other_scripts_state(t):
        expect(twa(base, t), 0)
        shutil.copy(os.path.join(t, "twa_state.pt"), os.path.join(t, "state.pt"))
        expect(sgd(t, "--resume"), 2, "was saved with")

    def uneven_batch_torchrun(t):
        proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               SGD, *map(str, flags(data, t, "--epochs", 1, "-b", 47))],
                              capture_output=True, text=True, env=ENV, timeout=300)
        if proc.returncode != 0:
            raise Broken(f"exit {proc.returncode}: {proc.stderr[-300:]}")
        files_whole_and_finite(t)

    def duplicate_low_bits(t):
        """5 distinct checkpoints and a copy of one: no precision may count the copy; 32 bits
        keeps all 5 and rebuilds the weights from alpha to rounding; 8 bits records its miss."""
        folder = copy_base(os.path.join(t, "ckpt"))
        os.remove(os.path.join(folder, "checkpoints.json"))
        shutil.copy(os.path.join(folder, "2.pt"), os.path.join(folder, "5.pt"))
        for bits in (32, 8):
            out = os.path.join(t, f"out{bits}")
            expect(run(TWA, flags(data, folder, "--params_end", 6, "--epochs", 1, "--pbits", bits,
                                  "--output-dir", out, "--log-dir", out)), 0)
            rank = json.load(open(os.path.join(out, "twa_results.json")))["basis"]["rank"]
            miss = json.load(open(os.path.join(out, "coefficients.json")))["reconstruction"]["relative"]
            if rank > 5 or (bits == 32 and (rank != 5 or miss > 1e-4)) or not 0 <= miss < 1:
                raise Broken(f"{bits} bits: rank {rank} (5 distinct checkpoints), alpha misses by "
                             f"{miss:.2g}")

    return [
        ("1 blow-up saves nothing non-finite", blow_up),
        ("1 --momentum nan", usage(True, ["--momentum", "nan"], "finite")),
        ("1 --tol inf (twa)", usage(False, ["--tol", "inf"], "finite")),
        ("2 two train_sgd into one folder", collide),
        ("2 two train_twa into one output folder", two_twa_runs),
        ("3 resume with another -b", resume_changed("-b", 4)),
        ("3 resume with another --arch", resume_changed("--arch", "resnet32")),
        ("3 resume with another --train-subset", resume_changed("--train-subset", 40)),
        ("3 twa resume with another --opt", twa_resume_other_opt),
        ("3 impossible counters", impossible_counters),
        ("4 killed between 0.pt and the first state", killed_after_first_checkpoint),
        ("4 --init with an Inf checkpoint, then a fresh run", nan_init),
        ("5 resume a finished TWA run", finished_twa_resumed),
        ("6 one node lacks a checkpoint", node_lacks_checkpoint),
        ("7 ranks disagree on --train-subset", ranks_disagree),
        ("8 unwritable --save-dir", unwritable("--save-dir")),
        ("8 unwritable --log-dir", unwritable("--log-dir")),
        ("8 unwritable --output-dir", unwritable("--output-dir")),
        ("9 truncated image", truncated_image),
        ("9 truncated decode cache", truncated_cache),
        ("10 NaN in an input checkpoint", nan_checkpoint),
        ("11 a string in place of a tensor", string_tensor),
        ("11 state.pt holds a list", state_is_a_list),
        ("11 split.json with wrong types", bad_split),
        ("11 --device bogus", usage(True, ["--device", "bogus"], "not a device")),
        ("11 SIGINT before training", early_sigint),
        ("12 a flipped byte in a checkpoint", flipped_byte),
        ("12 a corrupt checkpoints.json", corrupt_manifest),
        *((f"13 {name} at a random moment ({script}), #{i}",
           terminated_and_resumed(script == "sgd", name == "SIGKILL"))
          for i in range(1, 4) for script in ("sgd", "twa") for name in ("SIGTERM", "SIGKILL")),
        ("14 torchrun, -b 47 over 48 images", uneven_batch_torchrun),
        ("15 a duplicated checkpoint at 8 bits", duplicate_low_bits),
        ("own: full disk (ulimit -f) in train_sgd", full_disk(True)),
        ("own: full disk (ulimit -f) in train_twa", full_disk(False)),
        ("own: torchrun, rank 1 killed mid-run, then resumed", rank_dies),
        ("own: --epochs 0", usage(True, ["--epochs", 0], "--epochs must be positive")),
        ("own: -b -1", usage(True, ["-b", -1], "must be positive")),
        ("own: --eval-every 0", usage(True, ["--eval-every", 0], "--eval-every must be positive")),
        ("own: --dist-timeout 0", usage(True, ["--dist-timeout", 0], "--dist-timeout")),
        ("own: --label-smoothing 1.5", usage(True, ["--label-smoothing", 1.5], "label-smoothing")),
        ("own: --val-split 100", usage(True, ["--val-split", 100], "--val-split")),
        ("own: --params_end past the last checkpoint", usage(False, ["--params_end", 9],
                                                             "checkpoint not found")),
        ("own: --train_start outside the range", usage(False, ["--train_start", 7], "--train_start 7")),
        ("own: --checkpoints glob that matches nothing", usage(False, ["--checkpoints", "/nowhere/*.pt",
                                                                      "--val-split", 10], "matches no file")),
        ("own: --save-every above the batches", usage(True, ["--save-every", 1000], "exceeds")),
        ("own: an empty checkpoint file", empty_checkpoint),
        ("own: a checkpoint that carries pickled code", pickled_code),
        ("own: checkpoints of another architecture", other_architecture),
        ("own: images of two sizes", mixed_sizes),
        ("own: a data folder without test/", no_test_folder),
        ("own: a corrupt metrics.jsonl on resume", corrupt_metrics),
        ("own: another script's state as state.pt", other_scripts_state),
    ]


def main():
    args = parse_args()
    random.seed(0)
    root = tempfile.mkdtemp(prefix="twa-sweep-")
    data = image_tree(os.path.join(root, "data"))
    base = os.path.join(root, "base")
    expect(run(SGD, flags(data, base, "--epochs", 2, "--save-every", 2)), 0)
    lines = []
    for number, (name, case) in enumerate([*cases(data, base), *hostile_round3.cases(Fixture(data, base))]):
        if args.only and args.only not in name:
            continue
        folder = os.path.join(root, f"case{number}")
        os.makedirs(folder)
        started = time.time()
        try:
            case(folder)
            verdict = "held"
        except (Broken, subprocess.TimeoutExpired) as err:
            verdict = f"FAILED: {err}"
        except Exception as err:  # the harness itself: reported, and the sweep goes on
            verdict = f"FAILED: harness error {type(err).__name__}: {err}"
        lines.append(f"{verdict.split(':')[0]:6s} {name} ({time.time() - started:.0f} s)"
                     + (f"\n       {verdict}" if verdict != "held" else ""))
        print(lines[-1], flush=True)
    held = sum(line.startswith("held") for line in lines)
    summary = f"{len(lines)} cases tried, {held} held, {len(lines) - held} failed"
    print(summary)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"python bench/hostile_sweep.py  (git {runfiles.git_revision()})\n")
        f.write("\n".join(lines) + f"\n{summary}\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
