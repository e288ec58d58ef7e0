"""Reading checkpoints: state_dicts from files (weights only), sharded checkpoint folders, Hugging
Face safetensors files and folders (read a tensor at a time, see safetensors_files) or mappings,
wrapper prefixes removed, flattened into the float32 vector of a model's trainable parameters (or one
shard of it)."""
import numbers
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping

import torch

from .compat import FSDPModule
from .errors import CheckpointError, first_line
from .safetensors_files import (SHARDED, SINGLE, SafetensorsState, check_files, is_safetensors,
                                open_checkpoint)

# what those who read checkpoints themselves use (the scripts among them); the rest serves twa's own
__all__ = ["CheckpointError", "check_readable", "flatten_checkpoint", "load_sharded",
           "load_state_dict", "reshard"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and torch.compile
# where training checkpoints keep the model's weights, e.g. {"model": ..., "optimizer": ...}
MODEL_KEYS = ("state_dict", "model", "model_state_dict")


def check_readable(path):
    """Cheap up-front check that a torch.save file is whole: a zip archive's directory sits at its
    end, so reading it catches truncation without loading any tensor. A sharded checkpoint folder:
    its index reads, and every shard file it names is there and long enough. A safetensors file or
    folder: see safetensors_files.check_files."""
    if _holds_safetensors(path):
        check_files(path)
        return
    if os.path.isdir(path):
        _check_shard_files(path, _read_index(path))
        return
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
            return
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch < 1.6 wrote a plain pickle stream
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err})") from None
    if not legacy:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a torch.save file)")


def load_state_dict(source, names=None, label=None):
    """A state_dict from a file or a mapping (a training checkpoint's model entry where it is one,
    see MODEL_KEYS), without wrapper prefixes; files load weights only. names: the model's own keys,
    when known; a prefix is then removed only while some are missing (so that a model with a
    submodule called `module` keeps its names). label: how messages name the source (describe).
    A safetensors file or folder gives a SafetensorsState, which reads a tensor when looked up."""
    label = describe(source) if label is None else label
    if not isinstance(source, Mapping) and _holds_safetensors(source):
        source = open_checkpoint(source)
    if isinstance(source, SafetensorsState):  # tensors only, none on the meta device; each read
        return _strip_prefixes(source, names)  # when looked up, never all of them at once
    if isinstance(source, Mapping):
        state = _unwrap_training_checkpoint(source)
    elif os.path.isdir(source):
        state = load_sharded_whole(source)
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint not found: {source}") from None
        except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError here
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                raise CheckpointError(f"refusing to load {source}: it holds pickled Python objects, "
                                      "not just tensors (loaded with weights_only=True)") from None
            raise CheckpointError(f"checkpoint {source} is unreadable "
                                  f"({type(err).__name__}: {first_line(err)})") from None
        state = _unwrap_training_checkpoint(state)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {label} holds a {type(state).__name__}, not a state_dict")
    if state and not any(torch.is_tensor(value) for value in state.values()):
        raise CheckpointError(f"checkpoint {label} holds no tensors at its top level (keys "
                              f"{sorted(map(str, state))[:6]}): save model.state_dict() itself, or "
                              f"a dict with it under one of {list(MODEL_KEYS)}")
    if any(torch.is_tensor(value) and value.is_meta for value in state.values()):
        raise CheckpointError(f"checkpoint {label} holds tensors on the meta device (shapes without "
                              "values): save the model after materialising its weights")
    return _strip_prefixes(dict(state), names)


def _unwrap_training_checkpoint(state):
    """The model's state_dict from a training checkpoint such as {"model": ..., "optimizer": ...}."""
    if isinstance(state, Mapping):
        for key in MODEL_KEYS:
            if isinstance(state.get(key), Mapping):
                return state[key]
    return state


def _holds_safetensors(path):
    """Whether Hugging Face's format is read at `path` (a folder with a sharded torch checkpoint's
    index is one, whatever else it holds)."""
    return is_safetensors(path) and not os.path.isfile(os.path.join(path, INDEX))


def _strip_prefixes(state, names=None):
    """The state_dict without a wrapper's prefix: one that every key carries, removed while any
    of the model's `names` (when given) is missing."""
    while state and (names is None or not all(name in state for name in names)):
        prefix = next((p for p in WRAPPER_PREFIXES if all(str(k).startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = state.without_prefix(prefix) if isinstance(state, SafetensorsState) else \
            {key[len(prefix):]: value for key, value in state.items()}
    return state


def describe(source, index=None):
    """How a checkpoint is named in messages: its path, or which in-memory state_dict."""
    if isinstance(source, SafetensorsState):
        return source.label
    if not isinstance(source, Mapping):
        return str(source)
    return "state_dict" if index is None else f"state_dict #{index}"


def trainable_parameters(model):
    """(name, parameter) pairs that TWA averages: trainable parameters, buffers excluded (of an FSDP2
    model: its sharded parameters, see reshard)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
    reshard(model)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to average")
    return params


def is_int(value):
    """Whether value is an integer (numpy's too) and no bool, which Python counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def basis_device(device, params):
    """Where a basis is kept: `device` (anything torch.device takes), else the first parameter's;
    the meta device, which holds no values, is refused."""
    try:
        found = torch.device(device) if device is not None else params[0][1].device
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is no device ({first_line(err)})") from None
    if found.type == "meta":
        raise ValueError("a basis needs a device that holds values, not 'meta'" if device is not None
                         else "the model's parameters are on the meta device: materialise them first")
    return found


def layout(params):
    """(name, shape) of each trainable parameter, in order: where its entries lie in the flat vector."""
    return [(name, tuple(p.shape)) for name, p in params]


def check_layout(expected, params, owner):
    """Refuse a model whose trainable parameters are laid out otherwise than `expected` (the layout()
    that `owner`, e.g. "the subspace", was built for): an equal number of entries is not enough,
    since the flat vector places each weight by its position. Names are not compared (a renamed or
    wrapped module places its weights alike); shapes are."""
    found = layout(params)
    if len(found) != len(expected):
        raise ValueError(f"the model has {len(found)} trainable parameters, {owner} was built for "
                         f"{len(expected)}")
    for (name, shape), (built, built_shape) in zip(found, expected):
        if shape != tuple(built_shape):
            raise ValueError(f"the model's trainable parameter '{name}' has shape {shape}, where "
                             f"{owner} was built for '{built}' of shape {tuple(built_shape)}")


def reshard(model):
    """Return every FSDP2 unit of the model to its shards. After a forward with no backward (an
    evaluation) FSDP2 keeps the root's parameters gathered, and reuses that gathered copy in the
    next forward: weights read from the shards, or written into them, must find it released."""
    for unit in fsdp_modules(model):
        unit.reshard()


def fsdp_modules(model):
    """The model's FSDP2 units (none for a model that fully_shard did not wrap)."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def flatten_checkpoint(state, params, source="state_dict", out=None, shard=None):
    """The trainable parameters of `state` as one float32 vector, checked against the model's and
    to be finite; with `shard` (a Sharding) only this process's entries of that vector."""
    out = torch.empty(shard.local_size if shard else sum(p.numel() for _, p in params),
                      dtype=torch.float32) if out is None else out
    offset, names = 0, {name for name, _ in params}
    for name, p in params:
        flat = _checked_tensor(state, name, p, names, source).reshape(-1)
        for first, stop, at in shard.overlaps(offset, p.numel()) if shard else [(0, p.numel(), offset)]:
            out[at:at + stop - first].copy_(flat[first:stop])
        offset += p.numel()
        del flat  # a tensor read from a file (SafetensorsState) goes before the next is read
    return out


def _checked_tensor(state, name, p, names, source):
    """state[name], refused unless a finite floating-point tensor of p's shape, and unambiguous
    (no wrapper's prefix + name among the keys besides name, unless the model has that name too)."""
    if name not in state:
        hint = (" (transformers saves some models' weights under older names: read its checkpoints "
                "through twa.hf.checkpoints(model, paths))") if isinstance(state, SafetensorsState) else ""
        raise CheckpointError(f"{source} does not match the model: it has no '{name}'{hint}")
    doubled = [prefix + name for prefix in WRAPPER_PREFIXES if prefix + name in state and
               prefix + name not in names]
    if doubled:
        raise CheckpointError(f"{source} holds both '{name}' and '{doubled[0]}': which one is the "
                              "model's is ambiguous")
    value = state[name]
    if not torch.is_tensor(value):
        raise CheckpointError(f"{source}: '{name}' is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise CheckpointError(f"{source}: '{name}' holds {value.dtype} values, not floating-point "
                              "weights")
    if tuple(value.shape) != tuple(p.shape):
        raise CheckpointError(f"{source} does not match the model: '{name}' has shape "
                              f"{tuple(value.shape)}, the model {tuple(p.shape)}")
    if not bool(torch.isfinite(value).all()):
        # the whole tensor, not just this shard: every process stops at the same file
        raise CheckpointError(f"{source}: '{name}' holds NaN or Inf values")
    return value


def holds_sharded_folder(path):
    """Whether `path` is a sharded checkpoint folder (see below) rather than a file or a Hugging Face
    safetensors folder."""
    return os.path.isdir(path) and not _holds_safetensors(path)


# ---------------------------------------------------------------------------------------------------
# Sharded checkpoints: folders written by torch.distributed.checkpoint (train_sgd.py
# --sharded-checkpoints saves <i>.dcp), a shard file per process and a pickled index, ".metadata"
# ---------------------------------------------------------------------------------------------------

INDEX = ".metadata"
# what the index of a checkpoint of tensors is made of; like torch.load(weights_only=True), nothing else
# is unpickled
_INDEX_CLASSES = {("torch", "Size"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                  ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                  ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class _NotAnIndexClass(pickle.UnpicklingError):
    pass


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _INDEX_CLASSES or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _NotAnIndexClass(f"it names {module}.{name}, which is not part of a checkpoint index")


def _reader(path):
    """torch.distributed.checkpoint's reader of the folder, with its index unpickled safely."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            index = _read_index(path)
            index.storage_meta.load_id = self.load_id
            return index

    return SafeReader(path)


def _read_index(path):
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(os.path.join(path, INDEX), "rb") as f:
            index = _IndexUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is a folder without {INDEX}, {SINGLE} or "
                              f"{SHARDED}: not a checkpoint folder") from None
    except _NotAnIndexClass as err:
        raise CheckpointError(f"refusing to load {path}: {err}") from None
    except Exception as err:  # a truncated or garbled pickle raises EOFError, ValueError and others
        raise CheckpointError(f"checkpoint {path} has an unreadable {INDEX} ({type(err).__name__}: "
                              f"{first_line(err)})") from None
    if not hasattr(index, "state_dict_metadata") or not hasattr(index, "storage_data"):
        raise CheckpointError(f"checkpoint {path}: its {INDEX} is not a checkpoint index")
    from torch.distributed.checkpoint.metadata import StorageMeta
    if getattr(index, "storage_meta", None) is None:
        index.storage_meta = StorageMeta()
    return index


def _check_shard_files(path, index):
    ends = {}
    for info in index.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {path} lacks its shard file {name}")
        if os.path.getsize(file) < end:
            raise CheckpointError(f"checkpoint {path}: shard file {name} is truncated")


def _tensors(path):
    """{name: (shape, dtype)} of the tensors a sharded checkpoint holds."""
    return {name: (tuple(meta.size), meta.properties.dtype)
            for name, meta in _read_index(path).state_dict_metadata.items() if hasattr(meta, "size")}


def load_sharded(state, path, **options):
    """Fill the tensors of `state` (DTensors: only their local shards) from a sharded checkpoint folder
    (dcp.load's options); every process of the load raises a CheckpointError if one fails."""
    from torch.distributed import checkpoint as dcp
    _check_shard_files(path, _read_index(path))  # our one-line errors, before dcp's tracebacks
    try:
        with warnings.catch_warnings():  # one process alone is told it "assumes" a single process
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_reader(path), **options)
    except (Exception, dcp.api.CheckpointException) as err:  # raised on every process of the load
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: "
                              f"{first_line(err)})") from None


def load_sharded_whole(path):
    """Every tensor of a sharded checkpoint, whole, read by this process alone; of a training
    checkpoint (see _model_entries) the model's only, under their own names."""
    key, saved = _model_entries(_tensors(path))
    state = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in saved.items()}
    load_sharded({key: state} if key else state, path, no_dist=True)
    return state


TRAINING_KEY = "state_dict"


def _model_entries(saved):
    """(key, {name: (shape, dtype)}) of the model's tensors in a sharded checkpoint's index: in a
    training checkpoint (Lightning's under ModelParallelStrategy), which torch.distributed.checkpoint
    flattened from {"state_dict": model, "optimizer_0": ...}, those under "state_dict." with the
    prefix removed (no module can own a "state_dict" attribute, so a model's own name never starts
    so); else every tensor, under key None."""
    prefix = f"{TRAINING_KEY}."
    if not any(name.startswith(prefix) for name in saved):
        return None, saved
    return TRAINING_KEY, {name[len(prefix):]: meta for name, meta in saved.items()
                          if name.startswith(prefix)}


def read_local_shards(path, params, source, out, shard, untrained=None):
    """This process's entries of the trainable parameters of a sharded checkpoint, read into tensors
    sharded as the model's own (FSDP2 DTensors): each process reads only its rows of each file.
    untrained (sharding.UntrainedEntries): its entries are also read, sharded as the model holds
    them and in the checkpoint's dtype, where the checkpoint has them in that shape, for its
    compare() to see with the parameters."""
    key, saved = _model_entries(_tensors(path))
    for name, p in params:  # the same index on every process: all stop at the same file, or none
        if name not in saved:
            raise CheckpointError(f"{source} does not match the model: it has no '{name}'")
        shape, dtype = saved[name]
        if not dtype.is_floating_point:
            raise CheckpointError(f"{source}: '{name}' holds {dtype} values, not floating-point weights")
        if shape != tuple(p.shape):
            raise CheckpointError(f"{source} does not match the model: '{name}' has shape {shape}, "
                                  f"the model {tuple(p.shape)}")
    state = {name: torch.empty_like(own, dtype=saved[name][1])
             for name, own in (untrained.entries.items() if untrained else ())
             if name in saved and saved[name][0] == tuple(own.shape)}
    state.update((name, torch.empty_like(p.detach())) for name, p in params)
    load_sharded({key: state} if key else state, path, process_group=shard.group)
    if untrained:
        untrained.compare(state)
    local = torch.cat([state[name].to_local().reshape(-1).float() for name, _ in params])
    bad = shard.sum_(torch.tensor([0.0 if bool(torch.isfinite(local).all()) else 1.0],
                                  device=local.device))
    if bad.item():  # one process's rows suffice: every process stops at the same file
        raise CheckpointError(f"{source}: holds NaN or Inf values")
    return local if out is None else out.copy_(local)
