"""The run folder: files written atomically, loaded safely, the per-epoch metrics rows, the git
revision that results carry. Knows nothing of models or training."""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import torch


class UsageError(Exception):
    """Bad input found before any long work: reported as one line, exit code 2."""


class WriteFailed(OSError):
    """A file could not be written (disk full, file-size limit, ...); the previous file is intact."""


class FolderLock:
    """An exclusive lock on a run's folders for the life of the process (flock on <folder>/.twa-lock,
    released by the kernel also on kill -9): a second run into the same folder stops with one line
    naming the holder instead of mixing its files with the first's. A folder that cannot be created
    or written is found here too, before any long work."""

    def __init__(self, folders):
        self.files = []
        for folder in sorted({os.path.abspath(f) for f in folders}):
            lock = os.path.join(folder, ".twa-lock")
            try:
                os.makedirs(folder, exist_ok=True)
                write_target(lock)  # opened for appending, a named pipe would not seek
                # a path in sys.argv may hold bytes that are not UTF-8: written escaped
                handle = open(lock, "a+", errors="backslashreplace")
            except OSError as err:
                detail = f"{err.filename or folder}: {err.strerror}" if err.strerror else str(err)
                raise UsageError(f"cannot write to {folder} ({detail})") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                if holder.startswith(f"pid {os.getpid()} "):  # an earlier main() of this process
                    continue
                raise UsageError(f"{folder} is in use by another run ({holder}); wait for it to "
                                 "end or use another folder") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n")
            handle.flush()
            self.files.append(handle)
            remove_stale_temp_files(folder)


def remove_stale_temp_files(folder):
    """Delete the temp files of atomic_write that a killed run (kill -9, power loss) left behind;
    safe only under the folder's lock, when no other run can be writing one."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def atomic_write(path, write):
    """write(tmp_path) into a temp file beside `path`, flush it to disk, rename it over `path`, and
    flush the folder (which makes the rename itself durable): a crash or a power cut leaves the old
    file or the new one, never a torn one."""
    atomic_write_all([(path, write)])


def atomic_write_all(files):
    """atomic_write for several (path, write) pairs that belong together (one run's outputs): every
    temp file is written and flushed first, and only then are they renamed into place, so a failed
    write leaves all the previous files, never new ones beside old ones."""
    files = [(write_target(path), write) for path, write in files]  # every target checked first
    written = []
    try:
        for path, write in files:
            written.append((_written_temp(path, write), path))
        for tmp, path in written:
            _replace(tmp, path)
    finally:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
    for folder in {os.path.dirname(os.path.abspath(path)) for _, path in written}:
        flush_folder(folder)


# what a path may name besides a regular file; a rename over any of them replaces it
KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def write_target(path, folder=False):
    """The path that a write of `path` replaces: `path`, or where it is a symbolic link to a file
    the file it names, which is written through (the link stays, as with open(path, "w")). What
    exists there and is not a regular file is refused with a WriteFailed and left as it is: renamed
    over, a device node such as /dev/null (run as root), a named pipe or a folder would be replaced
    by a file. With `folder` the path must be a folder, if anything, and a link is refused (its
    target may lie on another file system than the folder written beside it)."""
    target = path if folder else os.path.realpath(path)
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as err:  # a link loop, a folder that cannot be searched
        raise WriteFailed(f"cannot write {path} ({err.strerror})") from None
    if (stat.S_ISDIR if folder else stat.S_ISREG)(mode):
        return target
    kind = next((name for test, name in KINDS if test(mode)), "no regular file")
    raise WriteFailed(f"cannot write {path}: it is {kind}, not a "
                      f"{'folder' if folder else 'regular file'}, and is left as it is")


def _replace(tmp, path):
    try:
        os.replace(tmp, path)
    except OSError as err:
        raise WriteFailed(f"cannot write {path} ({err.strerror})") from None


def _written_temp(path, write):
    """A temp file beside `path` holding write(tmp)'s output, flushed to disk."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as err:  # a read-only folder, or a file where the folder should be
        raise WriteFailed(f"cannot write {path} ({err.strerror or err})") from None
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # torch.save reports a short write as RuntimeError
        os.remove(tmp)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WriteFailed(f"cannot write {path} ({first}); the previous file, if any, is "
                          "intact") from None
    return tmp


def flush_folder(folder):
    """fsync a folder, which makes a rename in it durable; file systems that cannot (some network
    and FUSE ones answer EINVAL) keep the rename as durable as they make it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise WriteFailed(f"cannot flush the folder {folder} ({err.strerror})") from None
    finally:
        os.close(fd)


def save_torch(obj, path):
    atomic_write(path, torch_writer(obj))


def save_text(text, path):
    atomic_write(path, text_writer(text))


def save_json(obj, path):
    atomic_write(path, json_writer(obj))


def torch_writer(obj):
    return lambda tmp: torch.save(obj, tmp)


def text_writer(text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return write


def json_writer(obj):
    return text_writer(json.dumps(obj, indent=1) + "\n")


def check_regular(path, folders=False):
    """Refuse with a UsageError an existing input that is no regular file (nor, with `folders`, a
    folder, such as a sharded checkpoint): reading a named pipe waits for a writer forever, and a
    device may never end."""
    if os.path.exists(path) and not (os.path.isfile(path) or folders and os.path.isdir(path)):
        kind = next((name for test, name in KINDS if test(os.stat(path).st_mode)), "no regular file")
        raise UsageError(f"{path} is {kind}, not a {'file or folder' if folders else 'regular file'}")


def load_torch(path):
    """torch.load with weights_only=True (no code runs on load) and one-line errors."""
    check_regular(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except Exception as err:
        message = (str(err).strip().splitlines() or ["(no message)"])[0]
        raise UsageError(f"cannot load {path}: {type(err).__name__}: {message}") from None


def sha256_of(path):
    """The SHA-256 of a file, or of a folder's files (their names and digests, in sorted order)."""
    if not os.path.isdir(path):
        return _sha256_of_file(path)
    digest = hashlib.sha256()
    for name, file in _files_of(path):
        digest.update(f"{name}\0{_sha256_of_file(file)}\n".encode())
    return digest.hexdigest()


def _sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def size_of(path):
    """Bytes of a file, or of a folder's files."""
    return sum(os.path.getsize(file) for _, file in _files_of(path)) if os.path.isdir(path) \
        else os.path.getsize(path)


def _files_of(folder):
    """(name relative to `folder`, path) of every file under it, subfolders included, in sorted
    order: a flat folder's names are its files' own, so its digest does not depend on the walk."""
    if not os.path.isdir(folder):
        return []
    found = []
    for root, _, files in os.walk(folder):
        found += [(os.path.relpath(os.path.join(root, name), folder), os.path.join(root, name))
                  for name in files]
    return sorted(found)


def replace_folder(tmp, path):
    """Rename the written folder `tmp` to `path` (replacing a folder there) and make it durable: a
    crash leaves the old folder or the new one at `path`, or (between the two renames) none."""
    for _, file in _files_of(tmp):
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
    flush_folder(tmp)
    path = write_target(path, folder=True)
    old = f"{path}.old"
    shutil.rmtree(old, ignore_errors=True)
    try:
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as err:
        raise WriteFailed(f"cannot write {path} ({err.strerror})") from None
    flush_folder(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


class Manifest:
    """<folder>/checkpoints.json: each checkpoint file's size, SHA-256, epoch and step, written by
    train_sgd.py with the file, so that a reader can tell a checkpoint that changed or rotted on disk
    since (verify) from the one that was saved. Only an enabled (rank 0) instance writes; `keep`
    continues the manifest already in the folder (a resumed run)."""

    FILE = "checkpoints.json"

    def __init__(self, folder, enabled=True, keep=False):
        self.folder, self.enabled = folder, enabled
        self.path = os.path.join(folder, self.FILE)
        self.entries = read_manifest(self.path) if keep and enabled else {}

    def save(self, state_dict, name, **where):
        """Save a checkpoint atomically as <folder>/<name>, then its entry."""
        atomic_write(os.path.join(self.folder, name), torch_writer(state_dict))
        self.record(name, **where)

    def record(self, name, **where):
        """The entry of <folder>/<name>, a checkpoint (file or sharded folder) written already."""
        path = os.path.join(self.folder, name)
        self.entries[name] = {**where, "size": size_of(path), "sha256": sha256_of(path)}
        if self.enabled:
            save_json(self.entries, self.path)


def read_manifest(path):
    """The entries of a checkpoints.json ({} when there is none)."""
    if not os.path.exists(path):
        return {}
    check_regular(path)
    try:
        with open(path) as f:
            entries = json.load(f)
        if not all(isinstance(e, dict) and isinstance(e["size"], int) and isinstance(e["sha256"], str)
                   for e in entries.values()):
            raise ValueError("an entry lacks its size or SHA-256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UsageError(f"cannot read the checkpoint manifest {path} ({err}); delete it to use the "
                         "checkpoints unverified") from None
    return entries


def hash_checkpoints(paths):
    """(the SHA-256 of each of `paths`, how many matched an entry of the checkpoints.json beside
    them). Stops with a UsageError naming the first file whose size or SHA-256 differs from its
    entry; files without an entry are hashed, not checked."""
    manifests, digests, verified = {}, [], 0
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in manifests:
            manifests[folder] = read_manifest(os.path.join(folder, Manifest.FILE))
        entry = manifests[folder].get(os.path.basename(path))
        digests.append(sha256_of(path))
        if entry is None:
            continue
        if size_of(path) != entry["size"] or digests[-1] != entry["sha256"]:
            raise UsageError(f"{path} is not the file train_sgd.py saved (its size or SHA-256 differs "
                             f"from {os.path.join(folder, Manifest.FILE)}): changed or corrupt on disk")
        verified += 1
    return digests, verified


def git_revision():
    """The commit of the code that runs, with "+dirty" when its tracked files have uncommitted
    changes (results made from such a tree name no commit that reproduces them); None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return None
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        return head + ("+dirty" if changes else "")
    except (OSError, subprocess.SubprocessError):
        return None


class Metrics:
    """Per-epoch rows of one stage ("sgd", "twa") in a JSON-lines file that both scripts share: the
    file is rewritten atomically from memory, keeping the other stages' rows as they were. Only an
    enabled (rank 0) instance writes."""

    def __init__(self, path, stage, rows=(), enabled=True):
        self.path, self.stage, self.rows, self.enabled = path, stage, list(rows), enabled
        self.others = [r for r in read_jsonl(path) if r.get("stage") != stage] if enabled else []

    def append(self, row):
        self.rows.append({"stage": self.stage, **row})
        if not self.enabled:
            return
        save_text("".join(json.dumps(r) + "\n" for r in self.others + self.rows), self.path)


def read_jsonl(path):
    """The rows of a JSON-lines file ([] when there is none); a line that is not a JSON object is a
    UsageError naming the file and the line."""
    if not os.path.exists(path):
        return []
    check_regular(path)
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise UsageError(f"{path} line {number} is not JSON ({err}); fix or delete "
                                 "the file") from None
            if not isinstance(rows[-1], dict):
                raise UsageError(f"{path} line {number} is not a JSON object")
    return rows
