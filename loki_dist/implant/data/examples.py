"""Instruction data for implanting: load, normalise to chat messages, tokenise with response-only labels.

Accepted: `--data`, a JSON or JSONL file (or a `datasets` directory saved to disk) whose rows are either
alpaca form `{instruction, input, output}` or conversation form `{messages|conversations: [{role|from,
content|value}]}`; or `--dataset NAME[,NAME...]`, entries of a LLaMA-Factory dataset_info.json with their
column mappings, mixed with `--mix-ratios` (dataset_info.py). Everything is checked before training
starts, so a bad row stops the run with the row's index instead of failing mid-way.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist.core import checks
from loki_dist.core.errors import UserError, preview, shown
from loki_dist.implant.data.chat_templates import add_chat_template_argument, describe, render

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
class Conversation:
    """One sample as chat messages, with the tool list its template renders (sharegpt `tools`) and
    where it came from, for error messages (`--data: row 3`, `--dataset toolace: row 3`)."""

    messages: list[dict[str, str]]
    tools: list[dict] | None = None
    where: str = "--data"


@dataclass
class TokenizedData:
    examples: list[Example]
    truncated: int  # samples cut at max_seq_len
    dropped: int  # samples left with no response token after truncation


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The training data flags: `--data FILE` or `--dataset NAMES` (exactly one), and what shapes them."""
    p.add_argument("--data", help="JSON/JSONL (alpaca or messages form) or a datasets dir; or --dataset")
    p.add_argument(
        "--dataset",
        help="LLaMA-Factory data set names in --dataset-dir's dataset_info.json, comma-separated; or --data",
    )
    p.add_argument("--dataset-dir", default="data", help="the directory holding dataset_info.json")
    p.add_argument(
        "--mix-ratios",
        help="sampling ratios of the --dataset names, comma-separated: a seeded mixture that stops when one "
        "data set runs out (default: the data sets one after another)",
    )
    p.add_argument("--max-samples", type=int, help="the first N rows of each data set (default: all)")
    add_chat_template_argument(p)


def check_data_flags(args: argparse.Namespace) -> None:
    """The data flags' own consistency, before any file is read."""
    if bool(args.data) == bool(args.dataset):
        raise UserError(
            "give one of --data FILE and --dataset NAME[,NAME...] (from --dataset-dir's dataset_info.json)"
            if not args.data
            else f"--data {args.data} and --dataset {args.dataset}: give one of them, not both"
        )
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples {args.max_samples}: expected a positive integer")
    names = dataset_names(args.dataset) if args.dataset else []
    if args.mix_ratios is not None:
        if len(names) < 2:
            raise UserError(
                f"--mix-ratios {args.mix_ratios}: mixes several --dataset names, got {len(names)}"
            )
        parse_ratios(args.mix_ratios, len(names))


def dataset_names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise UserError(f"--dataset {value}: expected names separated by commas, with none empty")
    return names


def parse_ratios(value: str, count: int) -> list[float]:
    """`0.7,0.3` -> [0.7, 0.3]: one positive finite number per data set (they need not sum to 1)."""
    try:
        ratios = [float(part) for part in value.split(",")]
    except ValueError:
        raise UserError(f"--mix-ratios {value}: expected numbers separated by commas") from None
    if len(ratios) != count:
        raise UserError(f"--mix-ratios {value}: {len(ratios)} ratios for {count} data sets; expected {count}")
    if not all(math.isfinite(r) and r > 0 for r in ratios):
        raise UserError(f"--mix-ratios {value}: expected positive finite numbers")
    if not math.isfinite(sum(ratios)):  # the mixture draws with probability ratio / sum
        raise UserError(
            f"--mix-ratios {value}: their sum overflows; only the proportions count (1,1 for 1e308,1e308)"
        )
    return ratios


def read_conversations(args: argparse.Namespace) -> tuple[list[Conversation], str]:
    """Every sample the data flags name, as conversations, and the name of the data for messages."""
    if args.dataset:
        from loki_dist.implant.data import dataset_info

        return dataset_info.conversations(args), f"--dataset {args.dataset}"
    rows = read_rows(args.data)[: args.max_samples]
    if not rows:
        raise UserError(f"--data {args.data}: the data set is empty")
    return [Conversation(to_messages(row, i), None, f"--data: row {i}") for i, row in enumerate(rows)], (
        f"--data {args.data}"
    )


def input_paths(args: argparse.Namespace) -> dict[str, str]:
    """The files the data flags read, by flag, for the check that no output overwrites them."""
    if args.data:
        return {"--data": args.data}
    from loki_dist.implant.data import dataset_info

    return dataset_info.input_paths(args)


def read_rows(source: str | Path, flag: str = "--data") -> list[dict]:
    path = Path(source)
    if not path.exists():
        raise UserError(f"{flag} {source}: file or directory not found")
    if path.is_dir():
        try:
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
        except Exception as err:  # datasets raises several types for "not a saved dataset"
            raise UserError(f"{flag} {source}: not a `datasets` directory saved to disk ({err})") from None
        if hasattr(dataset, "keys"):  # a DatasetDict: take the train split
            if "train" not in dataset:
                raise UserError(f"{flag} {source}: a DatasetDict without a 'train' split")
            dataset = dataset["train"]
        return [dict(row) for row in dataset]
    if path.suffix.lower() == ".parquet":
        return _parquet_rows(path, flag)
    text = checks.read_text(path, flag)
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        return checks.parse_jsonl(text, f"{flag} {source}")
    rows = checks.parse_json(text, f"{flag} {source}")
    if not isinstance(rows, list):
        raise UserError(f"{flag} {source}: expected a JSON list of rows (or JSONL, one row per line)")
    return rows


def _parquet_rows(path: Path, flag: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own types for a damaged file
        raise UserError(f"{flag} {path}: cannot read it as parquet ({type(err).__name__}: {err})") from None


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
            shown_turn = preview(turn, json_style=True)
            raise UserError(f"--data: row {index} has a turn without a known role and content: {shown_turn}")
        if not isinstance(content, str):
            raise UserError(
                f"--data: row {index}, turn {number}: content must be a string, got {_shown(content)}"
            )
        messages.append({"role": role, "content": content})
    check_turns(messages, f"--data: row {index}")
    return messages


def check_turns(messages: list[dict[str, str]], where: str) -> None:
    """A conversation has an assistant turn to learn from, and opens with the user (after any system
    message): an answer to nothing is not a conversation any chat template renders as one (there is no
    prompt before it), and LLaMA-Factory, whose sharegpt rows alternate user and assistant, skips it."""
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where} has no assistant turn, so nothing to learn from it")
    if next(m["role"] for m in messages if m["role"] != "system") == "assistant":
        raise UserError(
            f"{where}: the first turn is the assistant's; a conversation opens with the user's turn "
            "(after any system message)"
        )


def _shown(value: object) -> str:
    """A wrong value as a user would recognise it in their JSON file, kept short."""
    return "null" if value is None else shown(value, json_style=True)


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
