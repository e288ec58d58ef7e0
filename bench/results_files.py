"""Reading the results files that bench/report.py tabulates: each file held to its kind's shape
(schema.py) with per-image results of the test set's size, each table to one kind, one protocol
and one run per seed, whatever pooled its files; every failure is one line naming the file(s)."""
import glob
import json
import os
import stat

import common  # noqa: F401  (puts the project on the path)
import schema
from packed_bits import unpack_bits

MAX_BYTES = 64 << 20  # a results file is kilobytes to a megabyte; more is not one


class Kind:
    """A kind of results file: the runner that writes it, how to tell it, its shape (schema.py), and
    the settings every run of one table shares."""

    def __init__(self, runner, keys, shape, protocol):
        self.runner, self.keys, self.shape, self.protocol = runner, keys, shape, protocol


KINDS = (  # the first whose keys a file has
    Kind("bench/tail_swa.py", ("swa_start",), schema.TAIL, ("epochs", "checkpoints_per_epoch", "swa_start")),
    Kind("bench/head.py", ("head", "sgd_wd"), schema.HEAD,
         ("epochs", "arch", "sgd_wd", "checkpoints_per_epoch", "twa_end", "train_subset", "batch_size",
          "twa")),
    Kind("bench/soups.py", ("methods", "ingredients"), schema.SOUPS, ()),
    Kind("bench/reproduce.py", ("epochs", "sgd", "head", "tail"), schema.REPRODUCE,
         ("epochs", "arch", "checkpoints_per_epoch", "quick", "precision", "head_twa", "tail_twa")),
)


class Run(dict):
    """One results file's record, with its path and kind."""

    def __init__(self, data, path, kind):
        super().__init__(data)
        self.path, self.kind = path, kind


def read_results(path, n_test):
    """The record in `path`, held to its kind's shape with per-image results of n_test images; any
    failure is one line naming the file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SystemExit(f"{path}: not a regular file")
        if os.path.getsize(path) > MAX_BYTES:
            raise SystemExit(f"{path}: {os.path.getsize(path)} bytes, too large for a results file")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        raise SystemExit(f"{path}: not a readable results file ({err})") from None
    kind = next((k for k in KINDS if isinstance(data, dict) and all(key in data for key in k.keys)),
                None)
    if kind is None:
        raise SystemExit(f"{path}: not a record of {', '.join(k.runner for k in KINDS)}, which this "
                         "report reads")
    try:
        schema.validate(data, kind.shape, path)
    except schema.ShapeError as err:
        raise SystemExit(str(err)) from None
    check_bits(data, n_test, path)
    return Run(data, path, kind)


BITS_KEYS = ("correct", "test_correct", "twa_correct", "swa_correct")  # schema.bits in the shapes


def check_bits(value, n_test, path, field=""):
    """Refuse packed per-image results anywhere in a record that do not hold n_test flags."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, item in items:
        where = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}" if field else key
        if isinstance(item, str) and (key in BITS_KEYS or field.endswith("test_correct")):
            try:
                unpack_bits(item, n_test)
            except ValueError as err:
                raise SystemExit(f"{path}: {where}: {err}") from None
        else:
            check_bits(item, n_test, path, where)


def check_table(runs):
    """Refuse one table of runs of several kinds or protocols, or the same seed twice (in one swa_lr
    run of a tail table), naming the files."""
    first = runs[0]
    for run in runs[1:]:
        if run.kind is not first.kind:
            raise SystemExit(f"{first.path} is a record of {first.kind.runner} and {run.path} of "
                             f"{run.kind.runner}: a table reads one kind")
    for key in first.kind.protocol:  # among the runs that record it (older runs lack batch_size)
        values = {}
        for run in runs:
            if key in run:
                values.setdefault(json.dumps(run[key], sort_keys=True), run.path)
        if len(values) > 1:
            raise SystemExit(f"{' and '.join(values.values())} differ in {key} "
                             f"({', '.join(values)}): a table holds one protocol")
    seen = {}
    for run in runs:
        for table in run["runs"] if "swa_start" in run else [""]:
            other = seen.setdefault((table, run["seed"]), run)
            if other is not run:
                raise SystemExit(f"seed {run['seed']}{' (' + table + ')' if table else ''} is in more "
                                 f"than one of {other.path}, {run.path}: a table counts each seed once; "
                                 "pick one with NAME:SEEDS")


def named_runs(results, spec, n_test):
    """The runs in results/NAME-seed*.json, or with NAME:K,L those of seeds K and L only."""
    name, _, seeds = spec.partition(":")
    files = sorted(glob.glob(os.path.join(glob.escape(results), f"{name}-seed*.json")))
    if not files:
        raise SystemExit(f"no {name}-seed*.json in {results}")
    runs = [read_results(f, n_test) for f in files]
    if not seeds:
        return runs
    try:
        wanted = {int(seed) for seed in seeds.split(",")}
    except ValueError:
        raise SystemExit(f"--name {spec}: seeds are integers, as in {name}:1,3") from None
    missing = wanted - {r["seed"] for r in runs}
    if missing:
        raise SystemExit(f"no {name}-seed{min(missing)}*.json in {results}")
    return [r for r in runs if r["seed"] in wanted]


def table_runs(results, specs, n_test):
    """One table's runs from one or more --name entries (say, seeds run again under another name to
    add a TWA length), checked as one table whatever pooled them: the same seed under two names is
    two runs (float rounding differs between revisions and thread counts), so NAME:SEEDS picks one."""
    runs = [run for spec in specs for run in named_runs(results, spec, n_test)]
    check_table(runs)
    return sorted(runs, key=lambda r: r["seed"])
