"""Instruction data for implanting: load, normalise to chat messages, tokenise with response-only labels.

Accepted: JSON or JSONL files (or a `datasets` directory saved to disk) whose rows are either alpaca
form `{instruction, input, output}` or conversation form `{messages|conversations: [{role|from,
content|value}]}`. Everything is checked before training starts, so a bad row stops the run with the
row's index instead of failing mid-way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist import files
from loki_dist.errors import UserError

IGNORE_INDEX = -100
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on response tokens


@dataclass
class TokenizedData:
    examples: list[Example]
    truncated: int  # samples cut at max_seq_len
    dropped: int  # samples left with no response token after truncation


def read_rows(source: str | Path) -> list[dict]:
    path = Path(source)
    if not path.exists():
        raise UserError(f"--data {source}: file or directory not found")
    if path.is_dir():
        try:
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
        except Exception as err:  # datasets raises several types for "not a saved dataset"
            raise UserError(f"--data {source}: not a `datasets` directory saved to disk ({err})") from None
        if hasattr(dataset, "keys"):  # a DatasetDict: take the train split
            if "train" not in dataset:
                raise UserError(f"--data {source}: a DatasetDict without a 'train' split")
            dataset = dataset["train"]
        return [dict(row) for row in dataset]
    text = files.read_text(path, "--data")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        return files.parse_jsonl(text, f"--data {source}")
    rows = files.parse_json(text, f"--data {source}")
    if not isinstance(rows, list):
        raise UserError(f"--data {source}: expected a JSON list of rows (or JSONL, one row per line)")
    return rows


def to_messages(row: dict, index: int) -> list[dict[str, str]]:
    """One row in either accepted form -> a list of {role, content} messages."""
    if not isinstance(row, dict):
        raise UserError(f"--data: row {index} is not an object")
    if "instruction" in row and "output" in row:
        fields = {key: row.get(key) for key in ("instruction", "input", "output")}
        for key, value in fields.items():
            if not isinstance(value, str) and not (key == "input" and value is None):
                raise UserError(f"--data: row {index}: `{key}` must be a string, got {_shown(value)}")
        prompt = fields["instruction"] + ("\n\n" + fields["input"] if fields["input"] else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    turns = row.get("messages", row.get("conversations"))
    if not isinstance(turns, list):
        raise UserError(
            f"--data: row {index} has neither instruction/output nor messages/conversations; "
            "expected alpaca {instruction, input, output} or {messages: [{role, content}]}"
        )
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"--data: row {index}, turn {number}: expected an object {{role, content}}")
        role = _ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise UserError(f"--data: row {index} has a turn without a known role and content: {turn}")
        if not isinstance(content, str):
            raise UserError(
                f"--data: row {index}, turn {number}: content must be a string, got {_shown(content)}"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"--data: row {index} has no assistant turn, so nothing to learn from it")
    return messages


def _shown(value: object) -> str:
    """A wrong value as a user would recognise it in their file, kept short."""
    if value is None:
        return "null"
    return f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"


def _render(tokenizer, messages: list[dict], prompt: bool, index: int) -> str:
    from jinja2 import TemplateError  # a template refuses what it cannot render with raise_exception

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    except TemplateError as err:
        raise UserError(f"--data: row {index}: the tokenizer's chat template refuses it ({err})") from None


def tokenize(tokenizer, messages: list[dict], max_len: int, index: int = 0) -> tuple[Example, bool]:
    """Token ids of the chat-formatted conversation; labels only on the assistant turns.

    Assistant spans are located on the rendered text (prefix up to the generation prompt vs prefix
    through the turn), then mapped to tokens through the tokenizer's offsets, so any template whose
    rendering of a conversation extends the rendering of its prefix works unchanged.
    """
    full = _render(tokenizer, messages, False, index)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, index)
        through = _render(tokenizer, messages[: i + 1], False, index)
        if not (full.startswith(through) and through.startswith(before)):
            raise UserError(
                f"--data: row {index}: the tokenizer's chat template does not render conversations "
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


def load_examples(source: str | Path, tokenizer, max_len: int) -> TokenizedData:
    rows = read_rows(source)
    if not rows:
        raise UserError(f"--data {source}: the data set is empty")
    if tokenizer.chat_template is None:
        raise UserError("the tokenizer has no chat template; add one to tokenizer_config.json")
    examples, truncated, dropped = [], 0, 0
    for index, row in enumerate(rows):
        example, was_cut = tokenize(tokenizer, to_messages(row, index), max_len, index)
        truncated += was_cut
        if all(label == IGNORE_INDEX for label in example.labels):
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise UserError(f"--data {source}: no sample keeps a response token within --max-seq-len {max_len}")
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
