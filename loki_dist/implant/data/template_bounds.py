"""The bounds on one rendering of a chat template: a meter of steps, size and time, and the sizes that
the operations able to make a huge value in one go would build, known before they run.

template_sandbox's environment calls these at every step it counts: a loop iteration, a call, a filter,
an arithmetic operator (`step`); with every value it builds, charged at its full size (`charge`: nested
values counted as often as they are repeated, a container walked once); and before an operation whose
result can be huge (`binop_size`, `checked_args` of a string method, a `bounded_filter`).
Outside `bounds()` (at compile time, when Jinja folds constants) nothing is metered, but a predicted
size is still held to the base bound.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps

from jinja2.utils import Namespace

MAX_STEPS = 1_000_000
BASE_SIZE = 16 * 2**20
SIZE_PER_INPUT = 8
DEADLINE_S = 10.0
MAX_INT_BITS = 4096  # an integer a chat template builds: far beyond any count it needs


class TemplateLimit(Exception):
    """A bound of this module reached inside a rendering: the template's fault, not the data's."""


@dataclass
class _Meter:
    """What one rendering may still do."""

    steps: int
    size: int
    deadline: float

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateLimit(f"does more than {MAX_STEPS:,} loop iterations, calls and operations")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"runs longer than {DEADLINE_S:g} s")

    def spend(self, size: int) -> None:
        self.size -= size
        if self.size < 0:
            raise TemplateLimit("builds more than 16 Mi characters plus 8 times the conversation's size")


_METER: contextvars.ContextVar[_Meter | None] = contextvars.ContextVar("template_meter", default=None)


def _room() -> int:
    """What the running rendering may still build (outside one, at compile time: the base bound)."""
    meter = _METER.get()
    return BASE_SIZE if meter is None else meter.size


def ensure(predicted: int) -> None:
    """Refuse, before it runs, an operation whose result would not fit."""
    if predicted > _room():
        raise TemplateLimit(f"would build a value of {predicted:,} characters or items")


def step() -> None:
    meter = _METER.get()
    if meter is not None:
        meter.step()


def spend(size: int) -> None:
    meter = _METER.get()
    if meter is not None:
        meter.spend(size)


def _inside(item: object) -> list | None:
    """What a container holds (None for a leaf)."""
    if isinstance(item, dict):
        return [x for pair in item.items() for x in pair]
    if isinstance(item, (list, tuple, set, frozenset)):
        return list(item)
    if isinstance(item, Namespace):
        return list(item._Namespace__attrs.values())
    return None


def size_of(value: object, cap: int | None = None) -> tuple[int, int]:
    """(items and characters in `value` through every level, its depth): what str() or tojson of it
    writes, a list that holds one list 100 times counting it 100 times (each container is walked once,
    so a value that repeats itself costs its distinct parts, not its expansion). Stops past `cap`."""
    cap = _room() if cap is None else cap
    known: dict[int, tuple[int, int]] = {}
    stack: list[tuple[object, list | None]] = [(value, None)]
    while stack:
        item, held = stack.pop()
        if held is None:  # first visit
            if id(item) in known:
                continue
            held = _inside(item)
            if not held:
                known[id(item)] = (1 + (len(item) if isinstance(item, str) else 0), 1)
                continue
            known[id(item)] = (cap + 1, 1)  # until it is summed: an item inside itself is too big
            stack.append((item, held))
            stack.extend((x, None) for x in held if id(x) not in known)
        else:
            parts = [known[id(x)] for x in held]
            known[id(item)] = (1 + sum(p[0] for p in parts), 1 + max(p[1] for p in parts))
            if known[id(item)][0] > cap:
                return known[id(item)]
    return known[id(value)]


def charge(value: object) -> object:
    meter = _METER.get()
    if meter is not None:
        meter.spend(1 + len(value) if isinstance(value, str) else size_of(value, meter.size)[0])
    return value


# ------------------------------------------------------------------ sizes predicted before an operation


def _text_len(value: object) -> int:
    return len(value) if isinstance(value, str) else size_of(value)[0]


def _printf(fmt: str, args: object) -> int:
    """What `fmt % args` may write: the format, the arguments, and every width or precision in it."""
    found = re.findall(r"%[#0 +\-]*(\d*)(?:\.(\d*))?", fmt)
    widths = [int(number) for pair in found for number in pair if number]
    if "*" in fmt:
        widths += [a for a in (args if isinstance(args, tuple) else (args,)) if type(a) is int]
    return len(fmt) + _text_len(args) + sum(abs(w) for w in widths)


def _format_spec(fmt: str, args: tuple, kwargs: dict) -> int:
    """What `fmt.format(...)` may write: digits in a replacement field are widths, and so are ints given."""
    fields = re.findall(r"\{[^{}]*\}", fmt)
    widths = [int(n) for field in fields for n in re.findall(r"\d+", field.split(":", 1)[-1])]
    given = [a for a in (*args, *kwargs.values()) if type(a) is int]
    return len(fmt) + size_of((args, kwargs))[0] + sum(widths) + sum(abs(a) for a in given)


def _joined(sep: object, items: object) -> int:
    return size_of(items)[0] + len(str(sep)) * max(_text_len(items) - 1, 0)


def _replaced(text: object, old: object, new: object, count: object = -1) -> int:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    times = len(text) + 1 if old == "" else text.count(old)
    if type(count) is int and count >= 0:
        times = min(times, count)
    return len(text) + times * len(new)


def _width(text: object, width: object = 0, *_: object) -> int:
    return max(_text_len(text), width if type(width) is int else 0)


def _indented(text: object, width: object = 4, *_: object, **__: object) -> int:
    text = str(text)
    per_line = width if type(width) is int else len(str(width))
    return len(text) + (text.count("\n") + 1) * per_line


def _serialized(value: object, indent: object = None, *_: object, **__: object) -> int:
    size, depth = size_of(value)
    return size * (1 + (indent if type(indent) is int else len(str(indent or ""))) * depth)


# filter name -> the size its result may have, from its arguments (the value first)
_FILTER_SIZES = {
    "center": _width,
    "indent": _indented,
    "replace": _replaced,
    "join": lambda value, d="", *_, **__: _joined(d, value),
    "format": lambda value, *args, **kwargs: _printf(str(value), kwargs or args),
    "wordwrap": lambda s, width=79, brk=True, wrapstring=None, *_: (
        len(str(s)) * (2 + len(wrapstring or "\n"))
    ),
    "tojson": _serialized,
    "pprint": lambda value, *_: _serialized(value, 1),
    "batch": lambda value, linecount=1, *_: _text_len(value) + (linecount if type(linecount) is int else 0),
    "slice": lambda value, slices=1, *_: _text_len(value) + (slices if type(slices) is int else 0),
    "sum": lambda value, attribute=None, start=0: (
        _text_len(value) ** 2 if isinstance(start, (list, tuple)) else 0
    ),
}
# str method -> the size its result may have, from the string and the arguments
_METHOD_SIZES = {
    "center": _width,
    "ljust": _width,
    "rjust": _width,
    "zfill": _width,
    "expandtabs": lambda text, tabsize=8: (
        len(text) + text.count("\t") * (tabsize if type(tabsize) is int else 0)
    ),
    "replace": _replaced,
    "join": _joined,
}


def binop_size(operator: str, left: object, right: object) -> None:
    """Refuse, before it runs, `left OP right` that would build too much: a repeated sequence, an
    integer of more than MAX_INT_BITS, a `%` format with a huge width."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and type(times) is int:
                ensure(size_of(seq)[0] * max(times, 0))
        if type(left) is int and type(right) is int and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimit(f"multiplies integers beyond {MAX_INT_BITS} bits")
    elif operator == "**" and type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
        if left.bit_length() * right > MAX_INT_BITS:
            raise TemplateLimit(f"raises an integer to a power beyond {MAX_INT_BITS} bits")
    elif operator == "%" and isinstance(left, str):
        ensure(_printf(left, right))


def checked_args(text: str, method: str, args: tuple, kwargs: dict) -> tuple:
    """The arguments of a call of `text.method`, refused first if the result would be too big (a
    generator given to join: as a list, charged, so that its size is known)."""
    if method in ("format", "format_map"):
        ensure(_format_spec(text, args, kwargs))
    elif method in _METHOD_SIZES:
        args = (listed(args[0]), *args[1:]) if method == "join" and args else args
        ensure(_METHOD_SIZES[method](text, *args, **kwargs))
    return args


def listed(value: object) -> object:
    """An iterable as a list, charged, so that the size of what is made of it can be known first."""
    if isinstance(value, (str, list, tuple, dict)) or not hasattr(value, "__iter__"):
        return value
    return charge(list(value))


def bounded_filter(name: str, function):
    """A filter that steps, is checked before it runs where it can make a huge value, and is charged."""
    first = int(hasattr(function, "jinja_pass_arg"))  # where the value is: after Jinja's own argument
    predict = _FILTER_SIZES.get(name)

    @wraps(function)
    def bounded(*args, **kwargs):
        step()
        if predict is not None and len(args) > first:
            if name in ("join", "sum", "batch", "slice"):  # they take any iterable, a generator too
                args = (*args[:first], listed(args[first]), *args[first + 1 :])
            ensure(predict(*args[first:], **kwargs))
        return charge(function(*args, **kwargs))

    return bounded


@contextmanager
def bounds(input_size: int) -> Iterator[None]:
    """Renderings inside count against one meter: MAX_STEPS, the size bound for inputs of `input_size`
    (size_of the messages and tools), DEADLINE_S from now."""
    meter = _Meter(MAX_STEPS, BASE_SIZE + SIZE_PER_INPUT * input_size, time.monotonic() + DEADLINE_S)
    token = _METER.set(meter)
    try:
        yield
    finally:
        _METER.reset(token)
