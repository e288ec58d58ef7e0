"""TWA in one command (train_sgd.py --twa-at) against the two-command route (train_sgd.py saving
checkpoint files, then train_twa.py over them), side by side in one run on the real CIFAR-10.

    python bench/online.py [--settings resnet20 vgg16bn] [--device cpu]

Both routes do the same work: SGD at a constant lr for the head's epochs, k checkpoints per epoch
(plus the initial weights), then SWA and TWA over all of them. Prints, per setting and route, the
wall time, the peak resident memory of the processes, the bytes left on disk and the TWA accuracy;
writes bench/results/online-<device>-<settings>.txt.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import common

sys.path.insert(0, common.ROOT)
import runfiles  # noqa: E402

# name: (arch, training images, SGD epochs, checkpoints per epoch, TWA epochs, batch size, test
# images per class: a smaller test tree keeps VGG16BN's evaluations from dominating on a CPU)
SETTINGS = {"resnet20": ("resnet20", 10000, 3, 2, 2, 128, None),
            "vgg16bn": ("VGG16BN", 2000, 1, 4, 1, 64, 100)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 ImageFolder tree (default: "
                        "extracted from ../shared/data into ~/.cache/twa-data)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--route", nargs=3, default=None, metavar=("SETTING", "ROUTE", "DIR"),
                        help=argparse.SUPPRESS)  # internal: run one route in a child process
    return parser.parse_args()


def route_commands(setting, route, folder, data_dir, device):
    arch, subset, epochs, per_epoch, twa_epochs, batch, _ = SETTINGS[setting]
    flags = ["--datasets", "ImageFolder", "--data-dir", data_dir, "--arch", arch, "--device", device,
             "--train-subset", subset, "-b", batch, "--quiet", "-p", 1000, "--save-dir", folder,
             "--schedule", "constant", "--lr", 0.05, "--wd", 5e-4]
    twa = ["--lr", 0.5, "--wd", 1e-5, "--schedule", "step", "--epochs", twa_epochs]
    if route == "one":
        return [["train_sgd.py", *flags, "--epochs", epochs, "--twa-at", epochs, "--record-every",
                 per_epoch, "--twa-epochs", twa_epochs, "--twa-lr", 0.5, "--twa-wd", 1e-5]]
    return [["train_sgd.py", *flags, "--epochs", epochs, "--save-every", per_epoch],
            ["train_twa.py", *flags, *twa, "--params_end", epochs * per_epoch + 1]]


def run_route(setting, route, folder, data_dir, device):
    """In a child process of its own: the route's commands, then their peak memory (the largest
    RSS of any of them) on stdout."""
    for script, *flags in route_commands(setting, route, folder, data_dir, device):
        done = subprocess.run([sys.executable, os.path.join(common.ROOT, script), *map(str, flags)],
                              stdout=subprocess.DEVNULL)  # its stderr (the reason it fails) passes on
        if done.returncode:
            raise SystemExit(f"{script} exited {done.returncode} in the {route} route of {setting}")
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux


def test_subset_tree(data_dir, per_class):
    """A tree with the same train/ and the first per_class test images of each class (links)."""
    if per_class is None:
        return data_dir
    root = f"{data_dir.rstrip(os.sep)}-test{per_class}"
    if not os.path.isdir(os.path.join(root, "test")):
        os.makedirs(root, exist_ok=True)
        if not os.path.exists(os.path.join(root, "train")):
            os.symlink(os.path.join(data_dir, "train"), os.path.join(root, "train"))
        for label in sorted(os.listdir(os.path.join(data_dir, "test"))):
            source, target = os.path.join(data_dir, "test", label), os.path.join(root, "test.tmp", label)
            os.makedirs(target, exist_ok=True)
            for name in sorted(os.listdir(source))[:per_class]:
                os.link(os.path.join(source, name), os.path.join(target, name))
        os.replace(os.path.join(root, "test.tmp"), os.path.join(root, "test"))
    return root


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


def twa_accuracy(folder):
    with open(os.path.join(folder, "twa_results.json")) as f:
        return json.load(f)["twa"]["accuracy"]


def main():
    args = parse_args()
    data_dir = common.cifar10_dir(args.data_dir)
    if args.route:
        setting = args.route[0]
        run_route(*args.route, test_subset_tree(data_dir, SETTINGS[setting][-1]), args.device)
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for setting in args.settings:
            for route in ("two", "one"):
                folder = os.path.join(scratch, f"{setting}-{route}")
                started = time.perf_counter()
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--device",
                                      args.device, "--data-dir", data_dir, "--route", setting, route,
                                      folder], stdout=subprocess.PIPE, text=True)
                if out.returncode:  # the route printed why on stderr
                    raise SystemExit(out.returncode)
                seconds = time.perf_counter() - started
                rows.append([setting, {"two": "train_sgd + train_twa", "one": "train_sgd --twa-at"}[route],
                             f"{seconds:.0f}", f"{int(out.stdout.split()[-1]) / 1024:.0f}",
                             f"{folder_bytes(folder) / 1e6:.1f}", f"{twa_accuracy(folder):.2f}"])
                print(" | ".join(rows[-1]), flush=True)
    header = ["setting", "route", "wall s", "peak RSS MB", "disk MB", "TWA acc"]
    common.print_table(header, rows)
    path = os.path.join(common.ROOT, "bench", "results",
                        f"online-{args.device}-{'-'.join(args.settings)}.txt")
    runfiles.save_text(" | ".join(header) + "\n" + "\n".join(" | ".join(r) for r in rows) + "\n", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
