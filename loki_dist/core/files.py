"""The one way loki_dist writes a file or a directory: atomically.

Whatever a user had stays whole until its replacement is complete. A file or directory is written under
a temporary name in the same directory (so the final rename never crosses a file system), flushed to
disk with fsync, and renamed over its target; a directory that is replaced is first set aside under a
name that says so (`.<name>.loki-old-<host>-<pid>-<random>`), and deleted once the new one is in place.
A killed writer leaves only names that say who made them (temporaries: `.<name>.loki-tmp-<host>-<pid>-
<random>`); the next writer into that directory removes those whose process is gone, and puts back a
set-aside directory whose writer died in the instant between its two renames.

Collective writes (several ranks filling one directory) use `staging_path`, a name every rank can
compute, and `publish` once every rank is done; `make_staging` marks such a directory with its creator,
so that it too is removed as stale once that process is gone. A write that fails for a reason of the
file system (no space left, read-only, no permission) is a UserError naming the path, not a traceback.

The checks every command makes before any work (an output that would write over an input, or that
cannot be written; files that cannot be read as what they should be) are checks.py's.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from loki_dist.core.errors import UserError

if TYPE_CHECKING:  # torch is imported where a tensor is written: most writes are JSON or text
    import torch

TMP_TAG = ".loki-tmp-"
ASIDE_TAG = ".loki-old-"  # a directory being replaced, set aside until its replacement is in place
STAGING_SUFFIX = ".partial"
OWNER_FILE = ".loki-owner"  # in a staging directory: "<host>-<pid>" of the process that made it
# errors of the file system, not of loki_dist: what a user can fix (space, permissions, a path)
_USER_OS_ERRORS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
    errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG, errno.ENOENT,
}  # fmt: skip


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temporary_name(target: Path) -> Path:
    """A fresh sibling of target that names its writer (host and pid), for stale clean-up."""
    return target.parent / f".{target.name}{TMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def staging_path(target: Path) -> Path:
    """The sibling of target that a collective write fills before `publish` (same name on every rank)."""
    return target.parent / f".{target.name}{STAGING_SUFFIX}"


def make_staging(target: Path) -> Path:
    """An empty `staging_path(target)`, marked as made by this process (`publish` drops the mark).

    The name is the same on every rank, so it cannot say who made it as `temporary_name` does; the mark
    inside does, so that a staging directory left by a killed writer is removed by the next writer
    into the same parent (`remove_stale_temporaries`), whatever it was going to be called.
    """
    staging = staging_path(target)
    _remove(staging)
    staging.mkdir(parents=True)
    (staging / OWNER_FILE).write_text(f"{_host()}-{os.getpid()}")
    return staging


def _writer_is_gone(path: Path) -> bool:
    """True for a temporary of ours whose writer ran on this host and has exited."""
    if path.name.endswith(STAGING_SUFFIX):
        try:
            tag = (path / OWNER_FILE).read_text()
        except OSError:
            return False  # not marked (or not yet): its writer is unknown, leave it
    else:
        tag = path.name.rpartition(ASIDE_TAG if ASIDE_TAG in path.name else TMP_TAG)[2]
    host, _, rest = tag.partition("-")
    pid = rest.partition("-")[0]
    if host != _host() or not pid.isdigit():
        return False  # another host's writer may still be alive: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete our temporaries in `directory` whose writer is gone, and put back a directory set aside by
    a writer that died before its replacement was in place; returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    for aside in directory.glob(f".*{ASIDE_TAG}*"):
        original = directory / aside.name[1 : aside.name.rindex(ASIDE_TAG)]
        if _writer_is_gone(aside) and not original.exists() and not original.is_symlink():
            os.replace(aside, original)
    found = [*directory.glob(f".*{TMP_TAG}*"), *directory.glob(f".*{ASIDE_TAG}*")]
    for path in [*found, *directory.glob(f".*{STAGING_SUFFIX}")]:
        if _writer_is_gone(path):
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file of a directory and the directory entries, to stable storage."""
    paths = [path] if path.is_file() else [*sorted(path.rglob("*")), path]
    for item in paths:
        if item.is_symlink():
            continue
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(written: Path, target: Path) -> None:
    """Move a complete file or directory `written` onto `target`.

    A file replaces its target in one rename. An old target directory is set aside first (a directory
    cannot be renamed over a non-empty one) and deleted once the new one is in place; should this
    process die between the two renames, the next writer into the directory puts it back.
    """
    if written.is_dir():
        (written / OWNER_FILE).unlink(missing_ok=True)
    fsync_tree(written)
    old = None
    if target.is_dir() and not target.is_symlink():
        old = target.parent / f".{target.name}{ASIDE_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(target, old)
    os.replace(written, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Create `target` through `write(tmp)`, which makes a file or a directory at `tmp`; then publish it.

    On any failure the temporary is removed and the old target, if any, is untouched; a failure of the
    file system (no space left, read-only, no permission, a file where a directory should be) is a
    UserError naming the target. A file never replaces a directory, nor a directory a file.
    """
    target = Path(target)
    tmp = temporary_name(target)
    try:
        with file_system_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(target.parent)
            write(tmp)
            if is_real_dir(tmp) != is_real_dir(target) and target.exists():
                kind = "a directory" if is_real_dir(target) else "a file"
                raise UserError(f"{target}: is {kind}; loki_dist does not replace it with another kind")
            publish(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    return target


@contextmanager
def file_system_errors(target: Path) -> Iterator[None]:
    """A failure of the file system while writing `target` (no space left, read-only, no permission)
    becomes a UserError naming it, by the name the user knows (users_name); any other OSError stays
    what it is."""
    try:
        yield
    except OSError as err:
        if err.errno not in _USER_OS_ERRORS:
            raise
        raise UserError(f"{users_name(target)}: cannot write it ({err.strerror or err})") from None


def users_name(path: str | Path) -> Path:
    """The name a user knows for a path of ours still in the making: a temporary `.<name>.loki-tmp-...`
    or a staging directory `.<name>.partial` (one that make_staging marked: a user's own hidden `.partial`
    is left alone) anywhere along it is named as the `<name>` it is about to become. A file written
    inside a checkpoint or an export being filled is `checkpoint-N/...`, not the hidden directory."""
    real, shown = Path(), Path()
    for part in Path(path).parts:
        real, name = real / part, part
        if part.startswith(".") and TMP_TAG in part:
            name = part[1 : part.rindex(TMP_TAG)]
        elif part.startswith(".") and part.endswith(STAGING_SUFFIX) and (real / OWNER_FILE).is_file():
            name = part[1 : -len(STAGING_SUFFIX)]
        shown /= name
    return shown


@contextmanager
def removed_on_failure(path: Path, remove: bool) -> Iterator[None]:
    """Remove `path` (when `remove`: the rank that made it) if the block fails: a collective write that
    failed on any rank is never published, and its staging directory is not left for the next run."""
    try:
        yield
    except BaseException:
        if remove:
            _remove(path)
        raise


def is_real_dir(path: Path) -> bool:
    """A directory itself, not a symlink to one."""
    return path.is_dir() and not path.is_symlink()


def write_text(target: str | Path, text: str) -> Path:
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(target: str | Path, value, indent: int = 1) -> Path:
    return write_text(target, json.dumps(value, indent=indent) + "\n")


def save_tensors(
    target: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """A safetensors file, written atomically (by our own writer: safetensors' save_file makes its files
    readable by their owner alone, where every other file follows the umask)."""
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    return save_tensors_streaming(target, layout, tensors.items(), metadata)


# torch's dtypes by name (str(torch.float64) is "torch.float64") -> safetensors' names
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def _safetensors_header(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
    """The header bytes (length prefix included) and each tensor's size in bytes, in layout order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    sizes, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        sizes[name] = math.prod(shape) * dtype.itemsize
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")],
            "shape": list(shape),
            "data_offsets": [offset, offset + sizes[name]],
        }
        offset += sizes[name]
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors itself writes
    return len(text).to_bytes(8, "little") + text, sizes


def save_tensors_streaming(
    target: str | Path,
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    pieces: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """A safetensors file written atomically from pieces that arrive one at a time.

    A safetensors file is a JSON header of byte offsets followed by the raw little-endian data, so
    the header can be written from `layout` (name -> dtype, shape, in file order) before any data
    exists, and then each piece appended as it comes: `pieces` yields (name, tensor) with the
    tensors in layout order, each tensor's pieces being consecutive runs of its flat data. The writer
    never holds more than one piece, which is what lets rank 0 write statistics and scores larger
    than its memory. A piece of the wrong tensor, type or size is a bug and fails before publishing.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this host is big-endian")
    header, sizes = _safetensors_header(layout, metadata or {})

    def write(tmp: Path) -> None:
        import torch

        order, remaining = iter(layout), dict(sizes)
        current = None
        with open(tmp, "wb") as handle:
            handle.write(header)
            for name, piece in pieces:
                while current != name:
                    if current is not None and remaining[current]:
                        raise ValueError(f"{current}: {remaining[current]} bytes missing before {name}")
                    current = next(order, None)
                    if current is None:
                        raise ValueError(f"{name}: not in the layout, or out of order")
                if piece.dtype != layout[name][0] or piece.nbytes > remaining[name]:
                    raise ValueError(f"{name}: piece {piece.dtype} x {piece.numel()} does not fit")
                handle.write(piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
                remaining[name] -= piece.nbytes
        missing = {name: left for name, left in remaining.items() if left}
        if missing:
            raise ValueError(f"tensors not filled: {missing}")

    return atomic_write(target, write)
