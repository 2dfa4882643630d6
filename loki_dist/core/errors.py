"""The one exception type that means "the user asked for something we cannot do", and its multi-rank form.

The CLI turns a UserError into a single line on stderr and exit status 2, with no traceback; everything
else is a bug and keeps its traceback. With several ranks, a mistake may be seen by all of them (a bad
flag) or by some (a file missing on one node's disk): a command's checks end with every rank agreeing on
what each one found (`distributed.agreement`), and the outcome is a RankErrors that one rank prints.
"""

from __future__ import annotations

import json


class UserError(ValueError):
    """A mistake in the user's input: names the bad value and what is expected.

    A ValueError too, as the ecosystem's refusals are (PEFT, transformers, the LoKI reference): code
    written for them that catches ValueError around an API call catches ours. Inside loki_dist an
    `except ValueError` around code that can raise a UserError re-raises it first (export.py), so that
    no user mistake is swallowed or said as something else.
    """


class RankErrors(UserError):
    """What every rank's checks found, agreed by all ranks: {rank: (kind, message)} of the failing ones.

    kind is "user" (a UserError) or "crash" (any other exception; that rank printed its traceback
    before the agreement). Every rank raises the same RankErrors and rank 0 prints it, so a mistake
    that all ranks share is said once, and a rank-specific one is said with the ranks it concerns.
    """

    def __init__(self, failures: dict[int, tuple[str, str]], world_size: int):
        self.failures, self.world_size = failures, world_size
        super().__init__("; ".join(self.lines()))

    @property
    def crashed(self) -> bool:
        return any(kind == "crash" for kind, _ in self.failures.values())

    def lines(self) -> list[str]:
        """One line per distinct message; unprefixed when every rank failed with the same one."""
        by_message: dict[str, list[int]] = {}
        for rank in sorted(self.failures):
            kind, message = self.failures[rank]
            text = message if kind == "user" else f"crashed ({message}; traceback above)"
            by_message.setdefault(text, []).append(rank)
        if len(by_message) == 1 and len(self.failures) == self.world_size:
            return list(by_message)
        return [f"{rank_list(ranks)}: {text}" for text, ranks in by_message.items()]


def rank_list(ranks: list[int]) -> str:
    """`rank 3`, or `ranks 0-2,5` for several (sorted, consecutive runs collapsed)."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    spans = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"rank {spans}" if len(ranks) == 1 else f"ranks {spans}"


def require_at_least(*checks: tuple[str, float, float]) -> None:
    """(flag, value, lowest allowed) for each numeric flag: the first one below its bound is an error."""
    for flag, value, low in checks:
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")


def shown(value: object, limit: int = 60, json_style: bool = False) -> str:
    """`type value` for a message (preview)."""
    return f"{type(value).__name__} {preview(value, limit, json_style)}"


def preview(value: object, limit: int = 60, json_style: bool = False) -> str:
    """A value for a message, as repr() writes it but cut to about `limit` characters. Only that much
    of it is ever rendered: repr() of a value from a user's file may not end (a YAML alias that repeats
    a list nine levels deep is a list of 9^9 strings, though the file is 400 bytes). `json_style`:
    strings in double quotes, null, true and false, as a JSON file writes them."""
    parts: list[str] = []
    room = [limit]

    def put(text: str) -> bool:
        parts.append(text[: max(room[0], 0)])
        room[0] -= len(text)
        return room[0] >= 0

    def scalar(item: object) -> str:
        if isinstance(item, str):
            cut = item[: room[0] + 1]
            return json.dumps(cut, ensure_ascii=False) if json_style else repr(cut)
        if isinstance(item, int) and not isinstance(item, bool) and item.bit_length() > 64:
            return f"<an integer of {item.bit_length()} bits>"
        if json_style and (item is None or isinstance(item, bool)):
            return json.dumps(item)
        return repr(item) if isinstance(item, (int, float, bool, type(None))) else f"<{type(item).__name__}>"

    def walk(item: object) -> bool:
        if isinstance(item, dict):
            keys_and_values = (x for pair in item.items() for x in pair)
            return put("{") and _each(keys_and_values, walk, put, (": ", ", ")) and put("}")
        if isinstance(item, (list, tuple, set, frozenset)):
            opening, closing = "[]" if isinstance(item, (list, tuple)) else "{}"
            return put(opening) and _each(iter(item), walk, put, (", ",)) and put(closing)
        return put(scalar(item))

    walk(value)
    text = "".join(parts)
    return text if room[0] >= 0 else text + "..."


def _each(items, walk, put, separators: tuple[str, ...]) -> bool:
    """walk() each item, separators between them in turn; False as soon as the room is used up."""
    for number, item in enumerate(items):
        if number and not put(separators[(number - 1) % len(separators)]):
            return False
        if not walk(item):
            return False
    return True
