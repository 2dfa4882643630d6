"""The sandbox chat templates are rendered in (chat_templates.render), with bounds on work, size and time.

A chat template is a program: the tokenizer's own (from a model directory someone else wrote) or a
`--chat-template` file. Jinja's sandbox keeps it from reaching Python's internals, but not from
running without end (`{% for a in range(100000) %}{% for b in range(100000) %}`), from building
gigabytes (`{{ 'x' * 2000000000 }}`, which then brings tokenizers down with a Rust backtrace) or from
raising any Python error (`1 // 0`, a macro that calls itself). So templates are rendered in an
environment configured as transformers configures its own (chat_template_utils: trim_blocks,
lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`, a guarded `namespace` and
`dict`; the text is the same, tests compare them), with these bounds per rendering:

- work: every loop iteration, call, filter and arithmetic operator is a step; a million at most;
- size: every value the template builds (what a call, filter or operator returns, a literal list or
  dict, each `~` and each output) is charged at its full size, nested values counted as often as they
  are repeated, against 16 Mi characters plus 8 times the conversation's own size; and the operations
  that can make one huge value at once (`*`, `**`, `%`, the width, indent and replace of filters and
  string methods) are checked before they run;
- time: a deadline, checked at every step, for the costs that no count sees.

template_bounds keeps the meter and predicts the sizes; here is where the template meets them: the
environment's calls, filters and operators, and its syntax tree, rewritten so that loops, macros, `~`
and literal lists and dicts go through the meter too.

A bound reached is a TemplateLimit; chat_templates.render makes it, and whatever else a template
raises, one line naming the row and the template. The bounds are counted, not timed, except for the
deadline: ranks that render the same data agree on them.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from loki_dist.implant.data.template_bounds import (
    binop_size,
    bounded_filter,
    charge,
    checked_args,
    spend,
    step,
)

# ------------------------------------------------------------------ the environment


def _raise(message: object):
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """As transformers' (no HTML escaping; its options)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Dict:
    """`dict(...)` without the class itself (whose attributes lead out of the sandbox)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(Namespace):
    """`namespace(...)` that takes no underscore names (a way to CPython's internals)."""

    def __init__(*args, **kwargs) -> None:  # noqa: N805 - Jinja's own signature, so that `self=` works
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _Namespace._check(name)
        Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: object) -> None:
        _Namespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace takes no underscore-prefixed name ({name!r})")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text so): its body, as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Environment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with every step counted and every value charged."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # the ones that can grow a value

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols], finalize=charge
        )
        del self.globals["lipsum"]  # n paragraphs of up to max words each: no chat template writes prose
        self.globals.update(
            raise_exception=_raise, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: bounded_filter(name, f) for name, f in self.filters.items()}

    def call(self, context, obj, /, *args, **kwargs):  # every call the template makes
        step()
        method = getattr(obj, "__wrapped__", obj)  # str.format comes wrapped by the sandbox
        if isinstance(getattr(method, "__self__", None), str):
            args = checked_args(method.__self__, getattr(method, "__name__", ""), args, kwargs)
        return charge(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        step()
        binop_size(operator, left, right)
        return charge(super().call_binop(context, operator, left, right))

    def loki_items(self, iterable, literal: int):
        """The items of a `for` loop, each a step that writes up to `literal` characters of its body."""
        for item in iterable:
            step()
            spend(literal)
            yield item

    def loki_literal(self, literal: int) -> str:
        """Charges a macro's literal text at each call."""
        spend(literal)
        return ""

    def loki_value(self, value: object) -> object:
        """A literal list, tuple or dict (`call` charges it)."""
        return value

    def loki_concat(self, *values) -> str:
        """`a ~ b ~ c`, charged before it is joined."""
        for value in values:
            charge(value)
        return charge("".join(map(str, values)))


class _Bounds(NodeTransformer):
    """The template's syntax tree with its loops, macro bodies, `~` and literal lists and dicts going
    through the environment's counting methods (loki_items, loki_literal, loki_concat, loki_value)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = _call("loki_items", [node.iter, nodes.Const(_literal(node.body))], node)
        return node

    def visit_Macro(self, node: nodes.Macro) -> nodes.Macro:
        self.generic_visit(node)
        node.body.insert(0, nodes.Output([_call("loki_literal", [nodes.Const(_literal(node.body))], node)]))
        return node

    visit_CallBlock = visit_Macro

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return _call("loki_concat", node.nodes, node)

    def visit_literal(self, node: nodes.Expr) -> nodes.Expr:
        self.generic_visit(node)
        return node if getattr(node, "ctx", "load") != "load" else _call("loki_value", [node], node)

    visit_List = visit_Dict = visit_Tuple = visit_literal


def _call(method: str, args: list, where: nodes.Node) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(method), args, [], None, None, lineno=where.lineno)


def _literal(body: list) -> int:
    """Characters of literal text in a body: an upper bound of what one pass through it writes."""
    found = [n for node in body for n in node.find_all((nodes.TemplateData, nodes.Const))]
    return sum(
        len(n.data) if isinstance(n, nodes.TemplateData) else len(n.value)
        for n in found
        if isinstance(n, nodes.TemplateData) or isinstance(n.value, str)
    )


_ENV = _Environment()


@lru_cache(maxsize=16)
def compiled(text: str):
    """The template, its syntax tree rewritten by _Bounds (as transformers caches its compiled ones)."""
    tree = _Bounds().visit(_ENV.parse(text))
    tree.set_environment(_ENV)
    return _ENV.from_string(tree)
