"""The checks every command makes before any work, in one place so that they say the same thing everywhere.

An output that would write over one of the command's inputs (`refuse_output_over_inputs`), an output
that cannot be written (`check_writable`), and files that cannot be read as what they should be
(`read_text`, `read_json`, `parse_jsonl`, `safetensors_header`): each is one line naming the flag, the
file and, where there is one, the line, not a traceback from deep inside the work. The work reads what
it was given through the same readers (a model's config, a shard's safetensors header). The one reader
of a torch.save pickle (`read_torch_pickle`) builds tensors and plain containers only, never code.

Writing a file, atomically, is files.py's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from loki_dist.core.errors import UserError
from loki_dist.core.files import is_real_dir, temporary_name


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def refuse_output_over_inputs(
    output_flag: str,
    output: str | Path,
    inputs: dict[str, str | Path | None],
    replaced: Iterable[str | Path] | None = None,
) -> None:
    """Refuse an output that would write over one of the command's inputs, seen through symlinks.

    An input is written over when the output is that same file or directory; when the output lies
    inside an input directory (a file written there changes what the next run reads: a model, a data
    folder); or when the input lies inside what the output replaces: `replaced`, by default the output
    itself (an output directory is replaced whole), for a training run its final/, runs/ and
    checkpoints. Inputs that do not exist (a hub name, an optional flag) cannot be written over.
    """
    out = Path(output).resolve()
    wiped = [Path(p).resolve() for p in ([output] if replaced is None else replaced)]
    for flag, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if out == source:
            raise UserError(f"{output_flag} {output}: is {flag} {value}; writing it would destroy that input")
        if source.is_dir() and _inside(out, source):
            raise UserError(
                f"{output_flag} {output}: is inside {flag} {value}; writing there would change that input"
            )
        if any(_inside(source, place) for place in wiped):
            raise UserError(
                f"{output_flag} {output}: holds {flag} {value}; replacing it would destroy that input"
            )


def check_writable(flag: str, path: str | Path, directory: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written where it is asked for.

    `path` is a file (or, with `directory`, a directory) to be created or replaced. What exists of it must
    be of that kind, and the nearest existing directory above it must be one that this process can
    create files in: tried for real with a temporary file of ours, since permission bits do not tell
    (root, ACLs, read-only mounts, network file systems). Missing directories in between are fine:
    every writer creates them.
    """
    path = Path(path)
    if path.exists() and is_real_dir(path.resolve()) != directory:
        expected = "a directory" if directory else "a file name"
        raise UserError(
            f"{flag} {path}: is {'a directory' if path.is_dir() else 'a file'}; expected {expected}"
        )
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    probe = temporary_name(parent / path.name)
    try:
        probe.touch(exist_ok=False)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({err.strerror or err})") from None
    probe.unlink(missing_ok=True)


def read_text(path: str | Path, flag: str) -> str:
    """A UTF-8 text file; a missing, unreadable or non-UTF-8 one is a UserError naming its line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{flag} {path}: is a directory; expected a file") from None
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{flag} {path}: not UTF-8 text (line {line}: {err.reason})") from None


# no file loki_dist reads nests deeper than this (a DeepSpeed config: 3, a data row with tools: ~10)
MAX_JSON_DEPTH = 100


def read_json(path: str | Path, flag: str):
    """A JSON file of settings, or a UserError naming the line and column where it stops being JSON.
    A key given twice in one object is refused too (DeepSpeed's own reader of its configs does so)."""
    return parse_json(read_text(path, flag), f"{flag} {path}", unique_keys=True)


def parse_json(text: str, source: str, unique_keys: bool = False):
    """A JSON value nested at most MAX_JSON_DEPTH deep (too_deep), or a one-line UserError."""
    try:
        value = json.loads(text, object_pairs_hook=_unique if unique_keys else None)
    except _GivenTwice as err:
        raise UserError(f"{source}: key {json.dumps(str(err)[:80])} given twice in one object") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"{source}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})"
        ) from None
    except RecursionError:  # deeper than the decoder recurses (some hundreds of levels)
        raise _too_deep(source) from None
    except ValueError as err:  # an integer of more digits than Python converts (4300)
        raise UserError(f"{source}: not valid JSON ({_first_words(err)})") from None
    if too_deep(value):
        raise _too_deep(source)
    if _SURROGATE.search(text) and not _is_unicode(value):
        raise _not_unicode(source)
    return value


def parse_jsonl(text: str, source: str) -> list:
    """One JSON value per non-blank line, each nested at most MAX_JSON_DEPTH deep. Lines are split at
    newlines only: a JSON string may hold the other characters that str.splitlines breaks at (U+2028,
    form feed...)."""
    rows, numbers = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{source}: line {number} is not valid JSON (column {err.colno}: {err.msg})"
                ) from None
            except RecursionError:
                raise _too_deep(f"{source}: line {number}") from None
            except ValueError as err:
                raise UserError(f"{source}: line {number} is not valid JSON ({_first_words(err)})") from None
            numbers.append(number)
    if too_deep(rows, MAX_JSON_DEPTH + 1):  # the rows at once (fast), then which one
        number = next(n for n, row in zip(numbers, rows, strict=True) if too_deep(row))
        raise _too_deep(f"{source}: line {number}")
    if _SURROGATE.search(text) and not _is_unicode(rows):
        number = next(n for n, row in zip(numbers, rows, strict=True) if not _is_unicode(row))
        raise _not_unicode(f"{source}: line {number}")
    return rows


def too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a value read from JSON nests lists and dicts deeper than `limit`.

    Nesting is bounded where a file is read, so that nothing after it (DeepSpeed's deep copy of its
    config, a fingerprint's JSON dump, a chat template's tojson) meets a value it cannot recurse
    through. Level by level, without recursion: about a second for 100 MB of data rows, a quarter of
    what json.loads takes to read them.
    """
    level = [value] if type(value) in (list, dict) else []
    for _ in range(limit):
        if not level:
            return False
        held: list = []
        for item in level:
            held.extend(item.values() if type(item) is dict else item)
        level = [x for x in held if type(x) is list or type(x) is dict]
    return bool(level)


class _GivenTwice(Exception):
    """A key that one JSON object holds twice."""


def _unique(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _GivenTwice(key)
        seen.add(key)
    return dict(pairs)


def _first_words(err: Exception) -> str:
    return str(err).split(":")[0]


def _too_deep(source: str) -> UserError:
    return UserError(f"{source}: nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects")


# a \uD800-\uDFFF escape: JSON's way to write a character past U+FFFF as a pair; one alone is no
# character, and a string holding it cannot be encoded, so tokenizers fail on it (a TypeError)
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _is_unicode(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_unicode(source: str) -> UserError:
    return UserError(
        f"{source}: holds an unpaired surrogate escape (\\uD800-\\uDFFF alone), which is no character"
    )


class DamagedSafetensors(ValueError):
    """A safetensors file whose header does not describe its bytes (a copy cut short, a foreign file)."""


def read_safetensors_header(path: Path) -> tuple[int, bytes, dict]:
    """(where the data starts, the header's bytes, the header) of a file whose header covers exactly its
    size; OSError when it cannot be read, DamagedSafetensors when it is not whole.

    Reads the header alone (a few MB for a 70B model's shards), which is enough to find a truncated,
    damaged or foreign file before a command loads or copies anything.
    """

    def damaged(why: str) -> DamagedSafetensors:
        return DamagedSafetensors(f"truncated or damaged safetensors file ({why})")

    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else size
        if 8 + length > size:
            raise damaged(f"{size} bytes, cut short inside its header")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        end = max(ends, default=0)
        if not all(isinstance(e, int) and e >= 0 for e in ends):
            raise TypeError("offsets")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise damaged("unreadable header") from None
    if size != 8 + length + end:
        raise damaged(f"{size} bytes where its header says {8 + length + end}")
    return 8 + length, raw, header


def safetensors_header(path: str | Path, flag: str) -> tuple[int, dict]:
    """read_safetensors_header for a file the user named with `flag`: failures are one-line UserErrors."""
    path = Path(path)
    try:
        data_start, _, header = read_safetensors_header(path)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    except DamagedSafetensors as err:
        raise UserError(f"{flag} {path}: {err}") from None
    return data_start, header


class UnsafeTorchLoad(ValueError):
    """This torch has a known way around its weights_only unpickler: no pickle is read at all."""


def read_torch_pickle(path: Path, map_location: str) -> object:
    """A torch.save file read with torch's weights_only unpickler, which builds tensors and plain
    containers (dicts, lists, tuples, numbers, strings) and refuses everything else, so a crafted file
    cannot run code. UnsafeTorchLoad under torch < 2.6 (a crafted file could get around that unpickler
    there: CVE-2025-32434); a ValueError naming the error for a file it refuses or cannot read.
    `map_location="meta"` reads the structure and shapes, not the tensors' data."""
    import torch

    if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        raise UnsafeTorchLoad(f"torch {torch.__version__} cannot read a pickle safely (torch >= 2.6 can)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler's refusal, or a damaged zip: each with its own type
        raise ValueError(f"not a file of tensors ({type(err).__name__})") from None
