"""The one checker that holds a JSON file to the shape its reader needs (bench/report.py's results,
plot.py's coefficients and twa_results.json): a wrong shape is one line naming the file and the field,
never a traceback further on.

A shape is a dict (an object with those fields; a field written "name?" may be absent), a one-item
list (an array whose items all have that shape), or a checker function(value, field) that raises
ShapeError. The checkers below cover what the readers need; `all_of` adds a relation between fields.
"""
import base64
import binascii
import math


class ShapeError(ValueError):
    """A value that does not have the shape its reader needs; the message is one line."""


def validate(data, shape, path):
    """`data` read from `path` if it has `shape`, else ShapeError naming the file and the field."""
    try:
        check(data, shape, "")
    except ShapeError as err:
        raise ShapeError(f"{path}: {err}") from None
    return data


def check(value, shape, field):
    if isinstance(shape, dict):
        _object(value, shape, field)
    elif isinstance(shape, list):
        array(value, field)
        for i, item in enumerate(value):
            check(item, shape[0], f"{field}[{i}]")
    else:
        shape(value, field)


def _object(value, shape, field):
    if not isinstance(value, dict):
        fail(field, "an object", value)
    for key, sub in shape.items():
        name = key.rstrip("?")
        if name in value:
            check(value[name], sub, f"{field}.{name}" if field else name)
        elif not key.endswith("?"):
            raise ShapeError(f"{field + ': ' if field else ''}no '{name}' field")


def fail(field, expected, value):
    raise ShapeError(f"{field or 'the file'}: expected {expected}, got {_kind(value)}")


def _kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"the string {value[:20]!r}" + ("..." if len(value) > 20 else "")
    return "a list" if isinstance(value, list) else "an object"


def array(value, field):
    if not isinstance(value, list):
        fail(field, "a list", value)


def number(value, field):
    """A finite int or float (JSON true, NaN and Infinity are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(field, "a finite number", value)


def count(least):
    """An integer of at least `least`."""
    def checker(value, field):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            fail(field, f"an integer >= {least}", value)
    return checker


def text(value, field):
    if not isinstance(value, str):
        fail(field, "a string", value)


def flag(value, field):
    if not isinstance(value, bool):
        fail(field, "true or false", value)


def bits(value, field):
    """Packed per-image results (packed_bits.pack_bits): a base64 string."""
    text(value, field)
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ShapeError(f"{field}: not packed per-image results (base64)") from None


def anything(value, field):
    """Any value: a field that must exist but is only printed or compared whole."""


def nullable(shape):
    def checker(value, field):
        if value is not None:
            check(value, shape, field)
    return checker


def nonempty(shape):
    """A list of `shape` with at least one item."""
    def checker(value, field):
        check(value, [shape], field)
        if not value:
            raise ShapeError(f"{field}: empty")
    return checker


def each(shape):
    """An object whose every value has `shape`, whatever its keys."""
    def checker(value, field):
        if not isinstance(value, dict):
            fail(field, "an object", value)
        for key, item in value.items():
            check(item, shape, f"{field}.{key}" if field else key)
    return checker


def all_of(*shapes):
    """Every shape in turn: a dict of fields, then relations between them (checker functions)."""
    def checker(value, field):
        for shape in shapes:
            check(value, shape, field)
    return checker


# ---------------------------------------------------------------------------------------------------
# the files: what each reader uses (other fields pass unchecked)
# ---------------------------------------------------------------------------------------------------

SEED = count(0)


def sgd_covers_the_epochs(run, field):
    """bench/head.py: SGD's per-epoch results reach E and every TWA's start (a stopped run does not)."""
    recorded = len(run["sgd"]["test_correct"])
    needed = max([run["epochs"]] + [head["sgd_epochs"] for head in run["head"]])
    if recorded < needed:
        raise ShapeError(f"sgd.test_correct: {recorded} epochs recorded, {needed} needed (a stopped "
                         "run: let it finish, or leave its seed out with NAME:SEEDS)")


def sgd_curve_covers_the_epochs(run, field):
    """bench/reproduce.py: SGD's test accuracy per epoch reaches E."""
    if len(run["sgd"]["test_acc"]) < run["epochs"]:
        raise ShapeError(f"sgd.test_acc: {len(run['sgd']['test_acc'])} epochs recorded, "
                         f"{run['epochs']} needed")


HEAD = all_of({
    "seed": SEED, "epochs": count(1), "name": text, "sgd_wd": number, "checkpoints_per_epoch": count(1),
    "twa": anything, "complete?": flag, "data_dir?": nullable(text),
    "sgd": {"test_correct": [bits]}, "sgd_matched?": {"epochs": count(1), "test_correct": nonempty(bits)},
    "head": [{"n": count(1), "sgd_epochs": count(1), "twa_epochs": count(1), "swa": {"correct": bits},
              "before_bn": {"correct": bits}, "twa": each({"correct": bits})}],
}, sgd_covers_the_epochs)

TAIL = {
    "seed": SEED, "swa_start": number, "data_dir?": nullable(text),
    "runs": each({"tail": each(nullable({
        "swa_acc": number, "twa_acc": number, "swa_correct?": nullable(bits),
        "twa_correct?": nullable(bits), "swa_held_out_acc?": number, "held_out_acc?": number}))}),
}

REPRODUCE = all_of({
    "seed": SEED, "epochs": count(1), "arch": text, "complete?": flag,
    "sgd": {"test_acc": [number]}, "head_twa": {"schedule": text},
    "head": nonempty({"name": text, "n": count(1), "checkpoints": text, "twa_epochs": count(1),
                      "sgd_epochs?": count(1), "lr": number, "swa_acc": number, "twa_acc": number,
                      "alpha": nonempty(number)}),
    "tail": [{"name": text, "tail_lr": number, "tail_epochs": count(1), "swa_acc": number,
              "twa_acc": number, "sgd": {"test_acc": nonempty(number)}}],
}, sgd_curve_covers_the_epochs)

SOUPS = {
    "seed": SEED, "ingredients": nonempty({"accuracy": number}),
    "methods": each({"accuracy": number, "held_out": {"accuracy": number}}),
}

def same_lengths(data, field):
    """coefficients.json: one coefficient per checkpoint, in `alpha` or in every block."""
    lengths = {len(a) for a in [data.get("alpha")] + [b["alpha"] for b in data.get("blocks") or []]
               if a is not None}
    if data.get("alpha") is None and not data.get("blocks"):
        raise ShapeError("no 'alpha' and no 'blocks'")
    if lengths != {len(data["checkpoints"])}:
        raise ShapeError(f"{len(data['checkpoints'])} checkpoints but alpha lists of "
                         f"{', '.join(map(str, sorted(lengths)))} values")


COEFFICIENTS = all_of({
    "checkpoints": nonempty(anything), "alpha?": nullable(nonempty(number)),
    "uniform?": nullable(number), "blocks?": nullable([{"entries": count(1), "alpha": nonempty(number)}]),
}, same_lengths)

MODEL_RESULT = nullable({"accuracy?": nullable(number), "loss?": nullable(number)})
TWA_RESULTS = {"start_epoch?": nullable(number), "swa?": MODEL_RESULT, "twa?": MODEL_RESULT}
