"""The one way loki_dist writes a file or a directory: atomically.

Whatever a user had stays whole until its replacement is complete. A file or directory is written under
a temporary name in the same directory (so the final rename never crosses a file system), flushed to
disk with fsync, and renamed over its target; a directory that is replaced is first renamed away, so
there is no moment where neither the old nor the new one exists. A killed writer leaves only a
temporary whose name says who made it (`.<name>.loki-tmp-<host>-<pid>-<random>`); the next writer into
that directory removes those whose process is gone.

Collective writes (several ranks filling one directory) use `staging_path`, a name every rank can
compute, and `publish` once every rank is done.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch

TMP_TAG = ".loki-tmp-"
STAGING_SUFFIX = ".partial"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temporary_name(target: Path) -> Path:
    """A fresh sibling of target that names its writer (host and pid), for stale clean-up."""
    return target.parent / f".{target.name}{TMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def staging_path(target: Path) -> Path:
    """The sibling of target that a collective write fills before `publish` (same name on every rank)."""
    return target.parent / f".{target.name}{STAGING_SUFFIX}"


def _writer_is_gone(path: Path) -> bool:
    """True for a temporary of ours whose writer ran on this host and has exited."""
    tag = path.name.rpartition(TMP_TAG)[2]
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
    """Delete our temporaries in `directory` whose writer is gone; returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.glob(f".*{TMP_TAG}*"):
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
    """Move a complete file or directory `written` onto `target`, replacing it with no gap.

    The old target, if any, is renamed away first and deleted only after the new one is in place.
    """
    fsync_tree(written)
    old = None
    if target.is_dir() and not target.is_symlink():
        old = temporary_name(target)
        os.replace(target, old)
    os.replace(written, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Create `target` through `write(tmp)`, which makes a file or a directory at `tmp`; then publish it.

    On any failure the temporary is removed and the old target, if any, is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = temporary_name(target)
    try:
        write(tmp)
        publish(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    return target


def write_text(target: str | Path, text: str) -> Path:
    return atomic_write(target, lambda tmp: tmp.write_text(text))


def write_json(target: str | Path, value, indent: int = 1) -> Path:
    return write_text(target, json.dumps(value, indent=indent) + "\n")


def save_tensors(
    target: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """A safetensors file, written atomically."""
    from safetensors.torch import save_file

    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    return atomic_write(target, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


# ------------------------------------------------------------------------------- streamed safetensors

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class TensorStream:
    """Fill a safetensors file one piece at a time, in the order its tensors were declared.

    safetensors is an 8-byte header length, a JSON header giving each tensor's dtype, shape and byte
    range, then the raw little-endian bytes. Knowing every dtype and shape up front, the header is
    written first and each tensor's bytes follow in pieces, so a file far larger than memory (all
    trained rows of a 70B model, [N, L, D] attribution scores) is written holding one piece at a time.
    """

    def __init__(self, handle, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None):
        self.handle, self.pending = handle, []
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}  # fmt: skip
            self.pending.append((name, dtype, size))
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        handle.write(len(text).to_bytes(8, "little") + text)
        self.left = self.pending[0][2] if self.pending else 0

    def write(self, name: str, piece: torch.Tensor) -> None:
        """Append the next piece of tensor `name` (any shape; its elements in row-major order)."""
        expected, dtype, _ = self.pending[0]
        if name != expected or piece.dtype != dtype:
            raise ValueError(f"expected a piece of {expected} ({dtype}), got {name} ({piece.dtype})")
        data = piece.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()  # no copy
        if data.nbytes > self.left:
            raise ValueError(f"{name}: {data.nbytes} bytes more than its declared size allows")
        self.handle.write(data)
        self.left -= data.nbytes
        while self.pending and self.left == 0:
            self.pending.pop(0)
            self.left = self.pending[0][2] if self.pending else 0

    def close(self) -> None:
        if self.pending:
            raise ValueError(f"{self.pending[0][0]}: {self.left} bytes were never written")


def stream_tensors(
    target: str | Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    fill: Callable[[TensorStream], object],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file atomically through `fill(stream)`, which writes every declared tensor."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            stream = TensorStream(handle, specs, metadata)
            fill(stream)
            stream.close()

    return atomic_write(target, write)
