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
        _check_syntax(text, value)
        return text
    name = ALIASES.get(value.lower(), value.lower())
    if name in BUILTIN:
        return BUILTIN[name]
    if path.suffix or "/" in value:
        raise UserError(f"--chat-template {value}: file not found")
    raise UserError(f"--chat-template {value}: neither a file nor a built-in template ({names()})")


def _check_syntax(text: str, value: str) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # the environment transformers renders chat templates in
        ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(text)
    except TemplateSyntaxError as err:
        raise UserError(
            f"--chat-template {value}: not a valid Jinja template (line {err.lineno}: {err})"
        ) from None


def apply(tokenizer, value: str | None):
    """Give the tokenizer the template `value` names (None: keep its own); returns the tokenizer."""
    if value:
        tokenizer.chat_template = resolve(value)
    return tokenizer
