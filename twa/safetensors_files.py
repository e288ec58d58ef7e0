"""Hugging Face checkpoints read as they are: a .safetensors file, or a folder as save_pretrained
and Trainer write it (checkpoint-500/ holding model.safetensors, or model.safetensors.index.json
whose weight_map names the shard files that hold each tensor).

A checkpoint is a read-only mapping (SafetensorsState) whose every lookup reads that one tensor with
safetensors' lazy reader, mapping the file for that read alone: a build that copies each tensor
into its flat vector and drops it holds one tensor of a checkpoint at a time, never the whole
checkpoint (kept open, the mapping would leave every page read so far resident). Up front only the
headers are read: they name each tensor and where its bytes lie, enough to catch a truncated or
corrupt file cheaply. safetensors itself is imported only to read a tensor (`import twa` needs
torch alone)."""
import json
import os
import struct
from collections.abc import Mapping

from .errors import CheckpointError, first_line

SUFFIX = ".safetensors"
SINGLE = "model.safetensors"  # what save_pretrained writes for a model that fits one file
SHARDED = "model.safetensors.index.json"  # ... and the index of a model it splits
MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers too


def is_safetensors(path):
    """Whether `path` names a .safetensors file, or a folder holding SINGLE or SHARDED."""
    path = os.fsdecode(path)
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, name)) for name in (SINGLE, SHARDED))
    return path.endswith(SUFFIX)


class SafetensorsState(Mapping):
    """A checkpoint's tensors by name, each read from its file when looked up (a new tensor each
    time: keep it only as long as it is needed). entries: {name: (file, its name in the file)};
    label: the path that messages name."""

    def __init__(self, entries, label):
        self.entries, self.label = entries, label

    def __getitem__(self, key):
        file, stored = self.entries[key]
        return read_tensor(file, stored)

    def __contains__(self, key):  # Mapping's own would read the tensor
        return key in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def without_prefix(self, prefix):
        """The same tensors under their names less `prefix` (which every name has), none read."""
        return self.renamed({key[len(prefix):]: key for key in self.entries})

    def renamed(self, names):
        """The tensors named by the values of {new name: name}, under the new names, none read."""
        return SafetensorsState({new: self.entries[old] for new, old in names.items()}, self.label)


def read_tensor(file, name):
    """Tensor `name` of a safetensors file, read alone (the file mapped only while it lives)."""
    safe_open = _safe_open()
    try:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(name)
    except Exception as err:  # safetensors raises its SafetensorError, or OSError
        raise CheckpointError(f"checkpoint {file} is unreadable ({type(err).__name__}: "
                              f"{first_line(err)})") from None


def open_checkpoint(path):
    """The SafetensorsState of a .safetensors file or a Hugging Face checkpoint folder (its
    SINGLE file where there is one, as from_pretrained reads it, else its SHARDED index), every
    file's header read and checked against the file's size (CheckpointError naming the path)."""
    path = os.fsdecode(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, SINGLE)):
            return SafetensorsState(_sharded_entries(path), path)
        file = os.path.join(path, SINGLE)
        return SafetensorsState({name: (file, name) for name in read_header(file)}, path)
    return SafetensorsState({name: (path, name) for name in read_header(path)}, path)


def check_files(path):
    """Cheap up-front check that a safetensors checkpoint is whole: the headers (open_checkpoint),
    then safetensors' own validation of each file's header (offsets contiguous and of the tensors'
    sizes); no tensor is read."""
    safe_open = _safe_open()
    for file in sorted({file for file, _ in open_checkpoint(path).entries.values()}):
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as err:
            raise CheckpointError(f"checkpoint {file} is truncated or corrupt ({type(err).__name__}: "
                                  f"{first_line(err)})") from None


def _safe_open():
    """safetensors' lazy reader, imported where a checkpoint in its format is read (`import twa`
    needs torch alone)."""
    try:
        import safetensors
    except ImportError:
        raise CheckpointError("reading .safetensors checkpoints needs the safetensors package "
                              "(pip install safetensors)") from None
    return safetensors.safe_open


def read_header(path):
    """{tensor name: (begin, end) of its bytes} from a safetensors file's header: 8 bytes of
    little-endian length, then that many bytes of JSON; refused unless every tensor's bytes lie
    within the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            length = _header_length(path, f.read(8), size)
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({first_line(err)})") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"checkpoint {path} is corrupt (its header is no JSON: "
                              f"{first_line(err)})") from None
    return _data_offsets(path, header, size - 8 - length)


def _header_length(path, head, size):
    if len(head) < 8:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({size} bytes: no "
                              "safetensors header)")
    length = struct.unpack("<Q", head)[0]
    if length > min(size - 8, MAX_HEADER):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (a header of {length} "
                              f"bytes in a file of {size})")
    return length


def _data_offsets(path, header, data_size):
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt (its header is no JSON object)")
    offsets = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(where, list) and len(where) == 2 and
                all(isinstance(x, int) for x in where) and 0 <= where[0] <= where[1]):
            raise CheckpointError(f"checkpoint {path} is corrupt (no data offsets for '{name}')")
        if where[1] > data_size:
            raise CheckpointError(f"checkpoint {path} is truncated ('{name}' ends at byte "
                                  f"{where[1]} of data, the file holds {data_size})")
        offsets[name] = tuple(where)
    return offsets


def _sharded_entries(folder):
    """{name: (shard file, name)} of a folder's SHARDED index, each shard file's header read."""
    try:
        with open(os.path.join(folder, SHARDED), encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {folder} has an unreadable {SHARDED} "
                              f"({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"checkpoint {folder}: its {SHARDED} has no weight_map of tensor "
                              "names to shard files")
    held = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(folder, shard)
        if os.path.basename(shard) != shard:  # no path out of the folder
            raise CheckpointError(f"checkpoint {folder}: its {SHARDED} names {shard!r}, not a file "
                                  "in the folder")
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint {folder} lacks its shard file {shard}")
        held[shard] = read_header(file)
    for name, shard in weight_map.items():
        if name not in held[shard]:
            raise CheckpointError(f"checkpoint {folder}: its {SHARDED} places '{name}' in {shard}, "
                                  "which does not hold it")
    return {name: (os.path.join(folder, shard), name) for name, shard in weight_map.items()}
