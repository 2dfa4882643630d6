"""Instruction data for implanting, tokenised: chat-formatted conversations with labels on the response
tokens only, and the micro-batches made of them.

The conversations come from the data flags (sources.py: a file's rows, rows.py, or LLaMA-Factory's data
sets, dataset_info.py); they are rendered through the chat template (chat_templates.py) and every one is
checked before training starts, so a bad sample stops the run with its index instead of failing mid-way.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist.core.errors import UserError
from loki_dist.implant.data.chat_templates import describe, render
from loki_dist.implant.data.rows import Conversation
from loki_dist.implant.data.sources import read_conversations

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on response tokens


@dataclass
class TokenizedData:
    examples: list[Example]
    truncated: int  # samples cut at max_seq_len
    dropped: int  # samples left with no response token after truncation


def check_tools(tokenizer, conversation: Conversation) -> None:
    """Refuse tools that the chat template would drop without a word: a template that does not use
    `tools` renders a conversation the same with and without them."""
    probe = [{"role": "user", "content": "?"}]
    with_tools = render(tokenizer, probe, conversation.where, prompt=True, tools=conversation.tools)
    if with_tools == render(tokenizer, probe, conversation.where, prompt=True):
        raise UserError(
            f"{conversation.where} has tools, but the chat template renders nothing of them (they would be "
            "dropped); use a template that renders `tools` (the model's own or --chat-template FILE), or "
            "put them in the system message"
        )


def tokenize(
    tokenizer,
    messages: list[dict],
    max_len: int,
    index: int = 0,
    tools: list | None = None,
    where: str | None = None,
) -> tuple[Example, bool]:
    """Token ids of the chat-formatted conversation; labels only on the assistant turns.

    Assistant spans are located on the rendered text (prefix up to the generation prompt vs prefix
    through the turn), then mapped to tokens through the tokenizer's offsets, so any template whose
    rendering of a conversation extends the rendering of its prefix works unchanged.
    """
    where = where or f"--data: row {index}"
    full = render(tokenizer, messages, where, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], where, prompt=True, tools=tools)
        through = render(tokenizer, messages[: i + 1], where, tools=tools)
        if not _shows(through[len(os.path.commonprefix([before, through])) :], message["content"]):
            raise UserError(
                f"{where}: {describe(tokenizer)} renders nothing of the assistant's text (turn {i}); a "
                "template that drops the assistant's turns leaves nothing to train on"
            )
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(
                f"{where}: the chat template does not render conversations "
                "incrementally, so assistant tokens cannot be located"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [
        tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for tok, (start, _) in zip(ids, offsets, strict=True)
    ]
    truncated = len(ids) > max_len
    return Example(ids[:max_len], labels[:max_len]), truncated


def _shows(rendered: str, content: str) -> bool:
    """Whether a turn's rendering holds any word of its content (a template may trim it, escape it,
    move reasoning out of it, but one that writes none of it has dropped it). Content without a word
    (blank, only symbols) cannot be looked for, and passes."""
    words = set(re.findall(r"\w+", content.lower()))
    return not words or not words.isdisjoint(re.findall(r"\w+", rendered.lower()))


def load_examples(
    source: str | Path | list[Conversation], tokenizer, max_len: int, name: str | None = None
) -> TokenizedData:
    """Tokenise a --data file, or conversations already read (read_conversations; `name` says which)."""
    if isinstance(source, list):
        conversations = source
    else:
        conversations, name = read_conversations(
            argparse.Namespace(data=source, dataset=None, max_samples=None)
        )
    if tokenizer.chat_template is None:
        raise UserError(
            "the tokenizer has no chat template: pass --chat-template (a Jinja file or a built-in: "
            "llama3, chatml, mistral, gemma, phi3) or add one to tokenizer_config.json"
        )
    with_tools = next((c for c in conversations if c.tools), None)
    if with_tools is not None:
        check_tools(tokenizer, with_tools)
    examples, truncated, dropped = [], 0, 0
    for conversation in conversations:
        example, was_cut = tokenize(
            tokenizer, conversation.messages, max_len, tools=conversation.tools, where=conversation.where
        )
        truncated += was_cut
        if all(label == IGNORE_INDEX for label in example.labels):
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise UserError(f"{name}: no sample keeps a response token within --max-seq-len {max_len}")
    return TokenizedData(examples, truncated, dropped)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; pads are masked out of attention and of the loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def num_targets(example: Example) -> int:
    """Tokens that count in the loss: response labels, less the first position (nothing predicts it)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])
