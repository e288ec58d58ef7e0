"""The run folder: files written atomically, loaded safely, the per-epoch metrics rows, the git
revision that results carry. Knows nothing of models or training."""
import fcntl
import json
import os
import socket
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
            try:
                os.makedirs(folder, exist_ok=True)
                handle = open(os.path.join(folder, ".twa-lock"), "a+")
            except OSError as err:
                raise UsageError(f"cannot write to {folder}: {err.strerror}") from None
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


def atomic_write(path, write):
    """write(tmp_path) into a temp file beside `path`, flush it to disk, then rename it over `path`:
    a crash leaves the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a short write as RuntimeError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WriteFailed(f"cannot write {path} ({first}); the previous file, if any, is "
                          "intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def save_json(obj, path):
    save_text(json.dumps(obj, indent=1) + "\n", path)


def load_torch(path):
    """torch.load with weights_only=True (no code runs on load) and one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except Exception as err:
        raise UsageError(f"cannot load {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def git_revision():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
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
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
