"""The one reader of a user's YAML file: `--config` of every command, the pipeline's, a LLaMA-Factory YAML.

yaml.safe_load builds nothing but plain data, yet it still trusts the file in ways this reader does not:

- Aliases. `&a [lol, ...]`, then `&b [*a, *a, ...]` nine levels deep is a 400-byte "billion laughs"
  whose value holds 9^9 strings. PyYAML builds it in no time as a graph that shares its lists, but
  whatever walks it afterwards (a message's repr(), str(), a JSON dump) never ends. Here each alias
  adds what it stands for, every node under its anchor, to a count that may not pass MAX_ALIASED;
  an alias inside its own anchor (a cycle) is refused, and so is nesting deeper than MAX_DEPTH,
  aliases expanded (PyYAML composes recursively, and so does everything after it).
- A key given twice in one mapping: PyYAML keeps the last value, silently. Refused, naming both
  lines, as LLaMA-Factory's own reader (OmegaConf's loader) refuses it. Keys merged in with `<<:`
  may be overridden, as YAML intends.
- `1e-4`, `5e-5`, `1E+3`, `1.0e4`: YAML 1.1 wants a dot and a signed exponent in a float, so PyYAML
  reads these as strings; LLaMA-Factory (OmegaConf) reads them as numbers, and so does this reader,
  so that a learning rate written so is one.

A file of more than MAX_BYTES is not read at all: PyYAML reads some 150 KB a second, and settings are
small (a data file given by mistake would take minutes to be found wrong).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from loki_dist.core import checks
from loki_dist.core.errors import UserError

MAX_BYTES = 2**20  # settings, not data: PyYAML reads about a megabyte in 6 s
MAX_ALIASED = 10_000  # nodes that aliases may add in all: far more than a config's shared blocks
MAX_DEPTH = 100
_MERGE = "tag:yaml.org,2002:merge"
# the exponent forms YAML 1.1 leaves as strings (OmegaConf's addition to PyYAML's float resolver)
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Refused(yaml.YAMLError):
    """What this reader refuses in a file PyYAML would read."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts what aliases expand to, bounds nesting and refuses repeated keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliased = 0
        self._open: set[str] = set()  # anchors whose node is being composed
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes in it, its depth), expanded

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(f"the alias *{event.anchor} (line {_line(event)}) is inside its own anchor")
            node = super().compose_node(parent, index)
            count, depth = self._size(node)
            self._aliased += count
            if self._aliased > MAX_ALIASED:
                raise _Refused(
                    f"its aliases expand to more than {MAX_ALIASED:,} values (line {_line(event)}); "
                    "write the values out, or share fewer"
                )
            self._deeper(self._depth + depth, event)
            return node
        self._depth += 1
        self._deeper(self._depth, event)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.discard(anchor)
            self._depth -= 1

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        lines: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:
                line = key.start_mark.line + 1
                if (key.tag, key.value) in lines:
                    first = lines[key.tag, key.value]
                    raise _Refused(f"`{key.value[:80]}` given twice (lines {first} and {line}); keep one")
                lines[key.tag, key.value] = line
        return node

    def _size(self, node: yaml.Node) -> tuple[int, int]:
        """(nodes under `node`, aliases expanded; its depth), each node counted once per place."""
        known = self._sizes.get(id(node))
        if known is None:
            children = (
                [x for pair in node.value for x in pair]
                if isinstance(node, yaml.MappingNode)
                else (node.value if isinstance(node, yaml.SequenceNode) else [])
            )
            sizes = [self._size(child) for child in children]  # at most MAX_DEPTH deep: bounded
            known = (1 + sum(s[0] for s in sizes), 1 + max((s[1] for s in sizes), default=0))
            self._sizes[id(node)] = known
        return known

    def _deeper(self, depth: int, event) -> None:
        if depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels (line {_line(event)})")


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _line(event) -> int:
    return event.start_mark.line + 1


def parse(text: str, source: str):
    """The YAML document in `text` as plain data; what is wrong with it is one UserError naming `source`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _Refused as err:
        raise UserError(f"{source}: {err}") from None
    except yaml.MarkedYAMLError as err:  # what is wrong, and where (its context comes first in str())
        where = f"line {err.problem_mark.line + 1}: " if err.problem_mark else ""
        raise UserError(f"{source}: not valid YAML ({where}{err.problem or err.context})") from None


def read(path: str | Path, flag: str):
    """A user's YAML file (`flag PATH` in messages): read_text's checks, then parse's."""
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if size > MAX_BYTES:
        raise UserError(
            f"{flag} {path}: {size:,} bytes; a settings file is at most 1 MiB (is it the right file?)"
        )
    return parse(checks.read_text(path, flag), f"{flag} {path}")
