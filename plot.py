"""Plot training curves and learned TWA averaging coefficients.

Two sub-commands, each writing one PNG:

    python plot.py curves RUN_DIR_OR_METRICS_FILE [more ...] -o curves.png [--labels a b ...]
    python plot.py coefficients coefficients.json -o coefficients.png

The plotting functions (`read_metrics`, `plot_curves`, `plot_coefficients`)
can be imported by other scripts. Figures are drawn with matplotlib's Agg
(non-interactive) canvas and written atomically.
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import schema

LOGGER = logging.getLogger("plot")
METRICS_FILENAME = "metrics.jsonl"
SPLIT_STYLES = {"train": "-", "test": "--"}
EXIT_BAD_INPUT = 2


class PlotInputError(ValueError):
    """Raised when an input file cannot be plotted; the message is one line."""


# ---------------------------------------------------------------- reading


def resolve_metrics_path(path):
    """Return the metrics file for `path`, which is a file or a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.is_file():
        raise PlotInputError(f"{path}: no such file")
    return path


def is_number(value):
    """True for ints and floats, but not for bools (a JSON true is not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_metrics_line(line, path, line_number):
    """Parse one JSON line; return the row, or None when it has no epoch."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        raise PlotInputError(f"{path}:{line_number}: not valid JSON ({error})") from None
    if not isinstance(row, dict) or not is_number(row.get("epoch")):
        return None
    return row


def read_metrics(path):
    """Read a `metrics.jsonl` file (or `<dir>/metrics.jsonl`) into a list of rows.

    Blank lines and rows without a numeric "epoch" are skipped. Raises
    PlotInputError for a missing file, an invalid JSON line or no usable rows.
    """
    path = resolve_metrics_path(path)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                row = parse_metrics_line(line, path, line_number)
                if row is not None:
                    rows.append(row)
    if not rows:
        raise PlotInputError(f"{path}: no rows with an 'epoch' field")
    return rows


def load_json(path):
    """The JSON value in the file `path`; PlotInputError naming it where there is none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise PlotInputError(f"{path}: not valid JSON ({error})") from None


def read_coefficients(path):
    """Read a coefficients JSON file; return (names, alpha, uniform or None)."""
    path = Path(path)
    if not path.is_file():
        raise PlotInputError(f"{path}: no such file")
    data = schema.validate(load_json(path), schema.COEFFICIENTS, path)
    names, alpha, uniform = data["checkpoints"], data.get("alpha"), data.get("uniform")
    if alpha is None:
        alpha = blocks_mean(data["blocks"])
    return [str(name) for name in names], [float(a) for a in alpha], uniform


def blocks_mean(blocks):
    """Layer-wise TWA's per-block alphas, averaged with each block's share of the parameters as
    its weight: one bar per checkpoint."""
    total = sum(block["entries"] for block in blocks)
    return [sum(block["entries"] * block["alpha"][i] for block in blocks) / total
            for i in range(len(blocks[0]["alpha"]))]


def check_coefficients(names, alpha, uniform, source):
    """Raise PlotInputError unless names/alpha are equal-length, non-empty lists."""
    if not isinstance(names, list) or not isinstance(alpha, list):
        raise PlotInputError(f"{source}: 'checkpoints' and 'alpha' must both be lists")
    if not alpha:
        raise PlotInputError(f"{source}: 'alpha' is empty")
    if len(names) != len(alpha):
        raise PlotInputError(
            f"{source}: {len(names)} checkpoints but {len(alpha)} alpha values")
    if not all(is_number(a) for a in alpha):
        raise PlotInputError(f"{source}: 'alpha' must contain only numbers")
    if uniform is not None and not is_number(uniform):
        raise PlotInputError(f"{source}: 'uniform' must be a number")


# ---------------------------------------------------------------- writing


def save_figure(fig, path):
    """Write `fig` to `path` as PNG atomically, creating the folder if needed."""
    path = Path(os.path.realpath(path))  # a link is written through: the file it names is replaced
    if path.exists() and not path.is_file():  # renamed over, /dev/null would become a PNG
        raise PlotInputError(f"{path} exists and is not a regular file; it is left as it is")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as handle:
        temp_path = handle.name
    try:
        FigureCanvasAgg(fig).print_png(temp_path)
        os.chmod(temp_path, 0o644)  # a temporary file is created private
        os.replace(temp_path, path)
    except BaseException:
        Path(temp_path).unlink(missing_ok=True)
        raise
    LOGGER.info("wrote %s", path)


# ---------------------------------------------------------------- drawing


def series(rows, key):
    """Return (epochs, values) for the rows that carry a numeric `key`."""
    points = [(row["epoch"], row[key]) for row in rows if is_number(row.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def draw_metric(ax, runs, metric, ylabel, markers=()):
    """Draw train (solid) and test (dashed) `metric` for every run on `ax`, and the single points
    of `markers`: (label, epoch, {"loss": .., "acc": ..}, matplotlib marker)."""
    for index, (label, rows) in enumerate(runs.items()):
        for split, style in SPLIT_STYLES.items():
            epochs, values = series(rows, f"{split}_{metric}")
            if epochs:
                ax.plot(epochs, values, linestyle=style, color=f"C{index % 10}",
                        marker="." if len(epochs) < 30 else None,
                        label=f"{label} {split}")
    for label, epoch, values, marker in markers:
        if is_number(values.get(metric)):
            ax.plot([epoch], [values[metric]], marker=marker, markersize=9, linestyle="none",
                    color="black", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_curves(runs, path, markers=()):
    """Plot loss and accuracy vs epoch for each run; `runs` maps label -> rows; `markers` as in
    draw_metric (the test metrics of single points such as SWA)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    draw_metric(loss_ax, runs, "loss", "loss", markers)
    draw_metric(acc_ax, runs, "acc", "accuracy (%)", markers)
    loss_ax.set_title("Loss (train solid, test dashed)")
    acc_ax.set_title("Accuracy (train solid, test dashed)")
    save_figure(fig, path)


def plot_coefficients(names, alpha, path, uniform=None):
    """Bar chart of the learned coefficient per checkpoint, with the uniform weight."""
    check_coefficients(list(names), list(alpha), uniform, source="coefficients")
    fig = Figure(figsize=(max(5.0, 0.35 * len(alpha) + 2.0), 4.0), layout="constrained")
    ax = fig.subplots()
    positions = range(len(alpha))
    colors = ["C0" if a >= 0 else "C3" for a in alpha]
    ax.bar(positions, alpha, color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    if uniform is not None and math.isfinite(uniform):
        ax.axhline(uniform, color="C1", linestyle="--", label=f"uniform = {uniform:.4g}")
        ax.legend(fontsize="small")
    ax.set_xticks(list(positions), [str(name) for name in names],
                  rotation=90 if len(alpha) > 12 else 0, fontsize="small")
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("alpha")
    ax.set_title(f"Learned averaging coefficients ({len(alpha)} checkpoints)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


# ---------------------------------------------------------------- command line


def default_label(path):
    """The run's folder name: the folder itself, or the metrics file's parent."""
    path = Path(path).resolve()
    return path.name if path.is_dir() else path.parent.name


def unique_labels(labels):
    """Make labels distinct by appending ' (2)', ' (3)', ... to repeats."""
    seen, result = {}, []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        result.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return result


def run_curves(args):
    """The `curves` sub-command."""
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise PlotInputError(
            f"--labels got {len(args.labels)} labels for {len(args.runs)} runs")
    labels = args.labels or [default_label(run) for run in args.runs]
    single = len(args.runs) == 1
    runs, markers = {}, []
    for label, run in zip(unique_labels(labels), args.runs):
        rows, results = read_metrics(run), read_results(run)
        start = results.get("start_epoch") if results else None
        runs.update(split_stages("" if single else label, rows, start or 0))
        markers += result_markers("" if single else label, rows, results, start or 0)
    plot_curves(runs, args.output, markers)


def read_results(run):
    """twa_results.json beside the run's metrics file, or None."""
    path = resolve_metrics_path(run).parent / "twa_results.json"
    if not path.is_file():
        return None
    return schema.validate(load_json(path), schema.TWA_RESULTS, path)


def split_stages(label, rows, twa_start=0):
    """One series per training stage ("sgd", "twa") when a metrics file holds several; TWA's
    epochs continue from twa_start, the SGD epoch its subspace ends at."""
    stages = list(dict.fromkeys(row.get("stage") for row in rows))
    prefix = f"{label} " if label else ""
    if len(stages) == 1 and not twa_start:
        return {label or (stages[0] or "run").upper(): rows}
    return {f"{prefix}{(stage or 'run').upper()}": [
        {**r, "epoch": r["epoch"] + twa_start} if stage == "twa" else r
        for r in rows if r.get("stage") == stage] for stage in stages}


def result_markers(label, rows, results, twa_start):
    """SWA (at the start of TWA) and TWA's final weights with BatchNorm recomputed (at its end),
    from twa_results.json; the last TWA row is before that recompute."""
    if not results:
        return []
    prefix = f"{label} " if label else ""
    twa_epochs = [r["epoch"] for r in rows if r.get("stage") == "twa"]
    end = twa_start + (max(twa_epochs) if twa_epochs else 0)
    points = []
    for name, epoch, marker, text in (("swa", twa_start, "*", "SWA"),
                                      ("twa", end, "D", "TWA, BN recomputed")):
        values = results.get(name)
        if isinstance(values, dict):
            points.append((f"{prefix}{text} test", epoch,
                           {"loss": values.get("loss"), "acc": values.get("accuracy")}, marker))
    return points


def run_coefficients(args):
    """The `coefficients` sub-command."""
    names, alpha, uniform = read_coefficients(args.coefficients)
    plot_coefficients(names, alpha, args.output, uniform=uniform)


def build_parser():
    """The argument parser, with one sub-parser per plot kind."""
    parser = argparse.ArgumentParser(
        description="Plot TWA training curves or learned averaging coefficients to a PNG.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    curves = commands.add_parser(
        "curves", help="loss and accuracy vs epoch from one or more metrics.jsonl files",
        description="Plot loss (left) and accuracy (right) vs epoch; train is solid, "
                    "test dashed, one colour per run.")
    curves.add_argument(
        "runs", nargs="+", metavar="RUN",
        help=f"a run folder (its {METRICS_FILENAME} is read) or a metrics .jsonl file")
    curves.add_argument("-o", "--output", required=True, help="PNG file to write")
    curves.add_argument(
        "--labels", nargs="+", metavar="LABEL",
        help="legend label per run, in order (default: each run's folder name)")
    curves.set_defaults(handler=run_curves)

    coefficients = commands.add_parser(
        "coefficients", help="bar chart of the learned coefficient per checkpoint",
        description="Bar chart of 'alpha' per entry of 'checkpoints' from a JSON file, "
                    "with a dashed line at 'uniform' when present.")
    coefficients.add_argument(
        "coefficients", metavar="COEFFICIENTS_JSON",
        help="JSON with 'checkpoints' (names), 'alpha' (floats) and optional 'uniform'")
    coefficients.add_argument("-o", "--output", required=True, help="PNG file to write")
    coefficients.set_defaults(handler=run_coefficients)
    return parser


def main(argv=None):
    """Parse arguments and draw; bad input is one stderr line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (PlotInputError, schema.ShapeError, OSError, UnicodeDecodeError) as error:
        LOGGER.error("plot.py %s: error: %s", args.command, error)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
