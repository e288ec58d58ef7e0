"""Peak memory of Subspace.from_checkpoints over safetensors files (read a tensor at a time) against
the same checkpoints as torch.save files (each loaded whole).

    python bench/safetensors_memory.py [--mb 48] [--tensors 12] [--count 4] [--results [DIR]]

Writes --count checkpoints of a model of --tensors equal Linear layers (--mb MiB of float32
weights in all) along a random walk, once as .safetensors files and once as torch.save files, then
builds the subspace of each set in a fresh process, which reports:
- checkpoint MiB held: the peak of the checkpoint tensors alive at once (torch.load's whole state,
  or the tensors safetensors' reader handed out), counted with weakref finalizers;
- peak MiB: the process's peak resident size during the build (the kernel's mark reset just before
  it, /proc/self/status VmHWM) above its size then: the basis (count x weights), the float64 mean
  and two work vectors, plus what the reading holds.
With --results, writes <DIR>/safetensors-memory.json (default DIR: results/) with the command line,
the thread count and the git revision.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref

import torch
from torch import nn

import common

sys.path.insert(0, common.ROOT)
import runfiles  # noqa: E402
import twa  # noqa: E402

MiB = 2 ** 20


def model_of(mb, tensors):
    """An MLP of `tensors` square Linear layers (no biases) holding `mb` MiB of float32 weights."""
    width = int((mb * MiB / 4 / tensors) ** 0.5)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(tensors)])


def write_checkpoints(folder, model, count):
    """The same random walk as .safetensors and .pt files; returns the two lists of paths."""
    import safetensors.torch
    gen = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    files = {"safetensors": [], "torch.save": []}
    for i in range(count):
        for value in state.values():
            value.add_(torch.randn(value.shape, generator=gen), alpha=0.01)
        files["safetensors"].append(os.path.join(folder, f"{i}.safetensors"))
        safetensors.torch.save_file(state, files["safetensors"][-1])
        files["torch.save"].append(os.path.join(folder, f"{i}.pt"))
        torch.save(state, files["torch.save"][-1])
    return files


class HeldBytes:
    """The bytes of the tensors a reader handed out that are still alive, and their peak."""

    def __init__(self):
        self.now = self.peak = 0

    def track(self, tensor):
        self.now += tensor.nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self.release, tensor.nbytes)

    def release(self, nbytes):
        self.now -= nbytes


def count_reads(held):
    """Route torch.load and safetensors' get_tensor through `held`."""
    import safetensors
    real_load, real_open = torch.load, safetensors.safe_open

    def load(*args, **kwargs):
        state = real_load(*args, **kwargs)
        for value in state.values():
            held.track(value)
        return state

    class Reader:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            tensor = self.handle.get_tensor(name)
            held.track(tensor)
            return tensor

    torch.load, safetensors.safe_open = load, Reader


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def worker(args):
    """One build in this fresh process; prints a JSON line."""
    model = model_of(args.mb, args.tensors)
    files = sorted((os.path.join(args.dir, f) for f in os.listdir(args.dir) if f.endswith(args.ext)),
                   key=lambda p: int(os.path.basename(p).split(".")[0]))
    held = HeldBytes()
    count_reads(held)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak mark starts again from here
    before = resident_bytes()
    started = time.perf_counter()
    space = twa.Subspace.from_checkpoints(model, files)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak": peak_resident_bytes() - before,
                      "held": held.peak, "basis": space.nbytes(), "rank": space.rank}))


def run_worker(args, folder, ext):
    command = [sys.executable, __file__, "--worker", "--dir", folder, "--ext", ext,
               "--mb", str(args.mb), "--tensors", str(args.tensors)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=48, help="MiB of float32 weights in the model")
    parser.add_argument("--tensors", type=int, default=12, help="weight tensors (equal sizes)")
    parser.add_argument("--count", type=int, default=4, help="checkpoints")
    parser.add_argument("--results", nargs="?", const=os.path.join(common.ROOT, "results"),
                        default=None, help="write safetensors-memory.json to this folder "
                        "(default results/)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--ext", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        write_checkpoints(folder, model_of(args.mb, args.tensors), args.count)
        for kind, ext in (("safetensors", ".safetensors"), ("torch.save", ".pt")):
            rows[kind] = run_worker(args, folder, ext)
    checkpoint_mib = sum(p.numel() for p in model_of(args.mb, args.tensors).parameters()) * 4 / MiB
    print(f"{args.count} checkpoints of {checkpoint_mib:.1f} MiB ({args.tensors} tensors), basis "
          f"{rows['safetensors']['basis'] / MiB:.0f} MiB, torch threads {torch.get_num_threads()}")
    common.print_table(["files", "seconds", "checkpoint MiB held", "peak MiB above start"],
                       [[kind, f"{r['seconds']:.2f}", f"{r['held'] / MiB:.1f}",
                         f"{r['peak'] / MiB:.0f}"] for kind, r in rows.items()])
    ratios = {key: rows["torch.save"][key] / rows["safetensors"][key] for key in ("held", "peak")}
    print(f"torch.save / safetensors: checkpoint held {ratios['held']:.1f}x, peak "
          f"{ratios['peak']:.2f}x")
    if args.results:
        path = os.path.join(args.results, "safetensors-memory.json")
        runfiles.save_json({"invocation": common.invocation(), "git": runfiles.git_revision(),
                            "settings": {"mb": args.mb, "tensors": args.tensors,
                                         "count": args.count},
                            "rows": rows, "ratios": ratios}, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
