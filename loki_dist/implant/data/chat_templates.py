"""`--chat-template`: a Jinja file, or a built-in template for the supported families.

A base model has no chat template, and LLaMA-Factory users name theirs (`template: llama3`) instead of
relying on the tokenizer's, so every command that formats a conversation (train, attribute, evaluate,
chat) takes one. The built-ins are written from each format's documented token strings and render
conversations incrementally (the rendering of a conversation extends the rendering of each of its
prefixes, with the generation prompt ending where the assistant's text begins), which is what
data.tokenize needs to put labels on the assistant's tokens only. None of them renders a `tools` list:
data that carries tools needs the model's own template (or a file) that does, and is refused otherwise
(data.check_tools). Differences from the models' own templates, deliberately: no default system message
is inserted (Qwen's inserts one), and where a format has no system role (Mistral, Gemma) the system
message opens the first user turn.

Every command renders through `render`, in template_sandbox's bounded environment (configured as
transformers' own), and names the template in its errors as the user knows it (`describe`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loki_dist.core import checks
from loki_dist.core.errors import UserError

_BOS = "{%- if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
# a system message is held and put before the first user turn, for formats without a system role
_HELD_SYSTEM = (
    "{%- set held = namespace(system='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% set held.system = message['content'] + '\\n\\n' %}"
)

BUILTIN: dict[str, str] = {
    # Llama 3 / 3.1 / 3.2 / 3.3: header-delimited turns; a tool's output is the `ipython` role
    "llama3": _BOS + "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    # ChatML (Qwen2, Qwen2.5, many others)
    "chatml": "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}",
    # Mistral instruct: [INST] user [/INST]answer</s>; tool output in [TOOL_RESULTS]
    "mistral": _BOS + _HELD_SYSTEM + "{%- elif message['role'] == 'user' %}"
    "{{- '[INST] ' + held.system + message['content'] + ' [/INST]' }}{% set held.system = '' %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS] ' + message['content'] + '[/TOOL_RESULTS]' }}"
    "{%- else %}{{ raise_exception('mistral has no role ' + message['role']) }}{% endif %}"
    "{%- endfor %}",
    # Gemma 1/2/3 (text): the assistant is `model`; no system or tool role
    "gemma": _BOS + _HELD_SYSTEM + "{%- elif message['role'] in ('user', 'assistant') %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{- '<start_of_turn>' + role + '\\n' + held.system + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- set held.system = '' %}"
    "{%- else %}{{ raise_exception('gemma has no role ' + message['role']) }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{% endif %}",
    # Phi-3 / Phi-3.5: <|role|> ... <|end|>
    "phi3": _BOS + "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{% endif %}",
}

# other names for the built-ins: the families' own, and LLaMA-Factory's `template:` names
ALIASES: dict[str, str] = {
    "llama3.1": "llama3",
    "qwen": "chatml",
    "qwen2": "chatml",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "phi": "phi3",
}


def names() -> str:
    """The accepted names, for help and error messages."""
    return ", ".join([*BUILTIN, *ALIASES])


def add_chat_template_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chat-template",
        help=f"a Jinja file, or a built-in template ({names()}), used instead of the tokenizer's "
        "(a base model has none); default: the tokenizer's own",
    )


def resolve(value: str) -> str:
    """The Jinja text that `--chat-template VALUE` names; its syntax checked here, not mid-run."""
    path = Path(value)
    if path.is_file():
        text = checks.read_text(path, "--chat-template")
        check(text, f"--chat-template {value}")
        return text
    name = ALIASES.get(value.lower(), value.lower())
    if name in BUILTIN:
        return BUILTIN[name]
    if path.suffix or "/" in value:
        raise UserError(f"--chat-template {value}: file not found")
    raise UserError(f"--chat-template {value}: neither a file nor a built-in template ({names()})")


def apply(tokenizer, value: str | None):
    """Give the tokenizer the template `value` names (None: keep its own); returns the tokenizer."""
    if value:
        tokenizer.chat_template = resolve(value)
        _NAMES[tokenizer.chat_template] = f"--chat-template {value}"
    return tokenizer


_NAMES: dict[str, str] = {}  # template text -> how the user gave it


def describe(tokenizer) -> str:
    """The template a tokenizer renders with, as the user knows it, for messages."""
    text = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return _NAMES.get(text) or f"the chat template of {tokenizer.name_or_path or 'the tokenizer'}"


MAX_TEMPLATE_CHARS = 2**20  # real ones are a few KB; a data file given by mistake is not compiled


def check(text: str, name: str) -> None:
    """Compile a template now, so that a broken one is one line before any work, not mid-run."""
    from jinja2 import TemplateSyntaxError

    from loki_dist.implant.data import template_sandbox

    if len(text) > MAX_TEMPLATE_CHARS:
        raise UserError(f"{name}: {len(text):,} characters; a chat template is at most 1 Mi (right file?)")
    try:
        template_sandbox.compiled(text)
    except TemplateSyntaxError as err:
        raise UserError(f"{name}: not a valid Jinja template (line {err.lineno}: {err})") from None
    except Exception as err:  # a literal Python cannot hold, nesting deeper than Python recurses
        raise UserError(f"{name}: cannot be compiled ({_first_line(err)})") from None


def render(
    tokenizer, messages: list[dict], where: str, prompt: bool = False, tools: list | None = None
) -> str:
    """The conversation as the tokenizer's chat template writes it (what transformers'
    apply_chat_template(tokenize=False) returns), within template_sandbox's bounds. Whatever goes
    wrong, a bound reached or any error the template raises, is one UserError naming `where` (the
    row) and the template. `prompt`: end with the generation prompt (the assistant's turn opening)."""
    from jinja2 import TemplateError

    from loki_dist.implant.data import template_bounds, template_sandbox

    name = describe(tokenizer)
    try:
        text = tokenizer.get_chat_template(None, tools)
    except ValueError as err:  # no template, or several named ones and none the default
        raise UserError(f"{where}: {name}: {str(err).split('!')[0][:200]}; pass --chat-template") from None
    check(text, name)
    try:
        with template_bounds.bounds(template_bounds.size_of((messages, tools), cap=2**62)[0]):
            rendered = template_sandbox.compiled(text).render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=prompt,
                **tokenizer.special_tokens_map,
            )
        rendered.encode("utf-8")  # a lone surrogate ('\ud800' in the template) is no text to tokenize
        return rendered
    except template_bounds.TemplateLimit as err:
        problem = str(err)
    except Exception as err:  # a template may raise anything Python can
        # raise_exception's own TemplateError: the template refuses the conversation, in its words
        problem = f"{'refuses' if type(err) is TemplateError else 'fails on'} it ({_first_line(err)})"
    raise UserError(f"{where}: {name} {problem}")


def _first_line(err: BaseException) -> str:
    from jinja2 import TemplateError

    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = text if len(text) <= 200 else text[:200] + "..."
    return text if type(err) is TemplateError else f"{type(err).__name__}: {text}"
