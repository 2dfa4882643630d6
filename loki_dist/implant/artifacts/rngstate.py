"""Each rank's random number generator state in a checkpoint, stored as data: nothing in it can run.

A resume restores Python's `random`, torch's CPU generator and, on a GPU, CUDA's, so that everything
drawn after it (dropout) is what an uninterrupted run draws. A checkpoint directory may be writable by
others (output directories on a cluster often are group-writable), so a resume must not execute what it
finds there: the state is a small safetensors file, and reading one checks that it holds exactly what
`save` writes, by restoring it into throwaway generators. Anything else is a damaged file.

rng_state_<rank>.safetensors: tensors `torch` (uint8, torch.get_rng_state()), `python` (int64 [625]: the
624 words of Python's Mersenne Twister and its position), `cuda` (uint8, on GPUs); metadata `format`,
`python_version` and `python_gauss_next` (JSON: null or a number), the rest of random.getstate().

Checkpoints of loki_dist 0.1 hold rng_state_<rank>.pt instead, a torch.save pickle. Those are read only
with torch's weights_only unpickler, which builds tensors and plain containers and nothing else, and only
under torch >= 2.6 (before, a crafted file could get around it: CVE-2025-32434); under an older torch the
run resumes with fresh RNG state and a warning.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist.core import checks, files

FORMAT = "loki_dist.rng/1"
MAX_BYTES = 64 << 10  # what we write is about 10 KB; a larger file is not ours, and is not read at all
_MT_WORDS = 624  # Python's Mersenne Twister state: 624 words and a position in [0, 624]
_NAMED = re.compile(r"rng_state_(0|[1-9][0-9]{0,8})\.(safetensors|pt)")


def file_name(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def legacy_name(rank: int) -> str:
    return f"rng_state_{rank}.pt"


class LegacyNotRead(ValueError):
    """An rng_state_<rank>.pt that this torch cannot read safely: resumed without it, with a warning."""


@dataclass(frozen=True)
class RngState:
    python: tuple
    torch: torch.Tensor
    cuda: torch.Tensor | None


def capture() -> RngState:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return RngState(random.getstate(), torch.get_rng_state(), cuda)


def restore(state: RngState) -> None:
    random.setstate(state.python)
    torch.set_rng_state(state.torch)
    if state.cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state.cuda)


def save(directory: Path, rank: int, state: RngState) -> Path:
    version, words, gauss_next = state.python
    tensors = {"python": torch.tensor(words, dtype=torch.int64), "torch": state.torch}
    if state.cuda is not None:
        tensors["cuda"] = state.cuda
    metadata = {"format": FORMAT, "python_version": str(version), "python_gauss_next": json.dumps(gauss_next)}
    return files.save_tensors(directory / file_name(rank), tensors, metadata)


def check_all(directory: Path, world_size: int) -> None:
    """Every RNG file a resume from `directory` may read is one that `read` takes: one per rank of the
    run that saved it (ValueError naming the first missing), and any other there too (a resume on more
    ranks reads rank r's file wherever it exists). A 0.1 file that this torch cannot read safely passes:
    the resume goes on without it, with a warning."""
    named = {p: int(m.group(1)) for p in directory.iterdir() if (m := _NAMED.fullmatch(p.name))}
    present = set(named.values())
    missing = next((rank for rank in range(world_size) if rank not in present), None)  # at most len + 1
    if missing is not None:
        raise ValueError(f"{file_name(missing)} is missing")
    for path in sorted(named, key=lambda p: (named[p], p.name)):
        if not path.is_file():  # a directory, or a pipe that would block the reader
            raise ValueError(f"{path.name} is not a file")
        with contextlib.suppress(LegacyNotRead):
            read(path)


def find(directory: Path, rank: int) -> Path | None:
    """The RNG file of `rank` in a checkpoint directory: ours, else a loki_dist 0.1 one, else None."""
    for name in (file_name(rank), legacy_name(rank)):
        if (directory / name).is_file():
            return directory / name
    return None


def read(path: Path) -> RngState:
    """The state in `path`, checked to be one that `restore` takes; a ValueError naming the file (and
    LegacyNotRead for a 0.1 file this torch cannot read safely) for anything else."""
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{path.name} is {size} bytes, not an RNG state of loki_dist (at most {MAX_BYTES})")
    state = _read_legacy(path) if path.suffix == ".pt" else _read_safetensors(path)
    try:  # what restore() would do, on generators of our own: the global ones stay as they are
        random.Random().setstate(state.python)
        torch.Generator().set_state(state.torch)
    except (ValueError, TypeError, OverflowError, RuntimeError) as err:
        raise ValueError(f"{path.name} does not hold an RNG state that can be restored ({err})") from None
    return state


def _read_safetensors(path: Path) -> RngState:
    from safetensors.torch import load

    try:
        header = checks.read_safetensors_header(path)[2]
        tensors = load(path.read_bytes())
    except checks.DamagedSafetensors as err:
        raise ValueError(f"{path.name}: {err}") from None
    except Exception as err:  # safetensors raises its own error types for what it cannot parse
        raise ValueError(f"{path.name}: not a safetensors file ({type(err).__name__})") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path.name} has format {metadata.get('format')!r}, expected {FORMAT}")
    if not {"python", "torch"} <= set(tensors) <= {"python", "torch", "cuda"}:
        raise ValueError(f"{path.name} holds tensors {sorted(tensors)}, expected python, torch (and cuda)")
    try:
        gauss_next = json.loads(metadata.get("python_gauss_next", ""))
        ours = metadata.get("python_version") == str(random.Random.VERSION)
    except (ValueError, RecursionError):
        ours = False
    if not ours:
        raise ValueError(f"{path.name}: its Python RNG metadata is not what loki_dist writes")
    words = tensors["python"]
    if words.dtype != torch.int64 or tuple(words.shape) != (_MT_WORDS + 1,):
        raise ValueError(f"{path.name}: `python` is {words.dtype} {list(words.shape)}, expected int64 [625]")
    python = (random.Random.VERSION, tuple(words.tolist()), gauss_next)
    return _checked(path, python, tensors["torch"], tensors.get("cuda"))


def _read_legacy(path: Path) -> RngState:
    try:
        saved = checks.read_torch_pickle(path, "cpu")
    except checks.UnsafeTorchLoad as err:
        raise LegacyNotRead(f"{path.name} not read: {err}; resuming with fresh random generators") from None
    except ValueError as err:
        raise ValueError(f"{path.name} is not an RNG state of loki_dist: {err}") from None
    if not isinstance(saved, dict) or not {"python", "torch"} <= set(saved) <= {"python", "torch", "cuda"}:
        raise ValueError(f"{path.name} does not hold the dict of RNG states loki_dist saves")
    python = saved["python"]
    if not (isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple)):
        raise ValueError(f"{path.name}: its Python RNG state is not what random.getstate() gives")
    return _checked(path, python, saved["torch"], saved.get("cuda"))


def _checked(path: Path, python: tuple, cpu: object, cuda: object) -> RngState:
    """The parts checked for what restore() cannot check on a throwaway generator: their types, that the
    Mersenne Twister words are 32-bit (Python would truncate larger ones), the CUDA state's kind."""
    version, words, gauss_next = python
    if (
        type(version) is not int
        or version != random.Random.VERSION
        or len(words) != _MT_WORDS + 1
        or not all(type(w) is int and 0 <= w < 2**32 for w in words)
        or not (gauss_next is None or type(gauss_next) is float)
    ):
        raise ValueError(f"{path.name}: its Python RNG state is not what random.getstate() gives")
    for name, tensor in (("torch", cpu), ("cuda", cuda)):
        if tensor is not None and not (
            isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8 and tensor.dim() == 1
        ):
            raise ValueError(f"{path.name}: `{name}` is not a generator state (a 1-D uint8 tensor)")
    return RngState((version, tuple(words), gauss_next), cpu, cuda)
