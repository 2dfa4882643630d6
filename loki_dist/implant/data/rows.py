"""Rows of a training data file, as conversations: the lowest floor of the data.

`--data` is a JSON or JSONL file (or a `datasets` directory saved to disk, or parquet) whose rows are
either alpaca form `{instruction, input, output}` or conversation form `{messages|conversations:
[{role|from, content|value}]}`; each row becomes a Conversation, checked here so that a bad row stops the
run with the row's index instead of failing mid-way. dataset_info.py reads LLaMA-Factory's entries
through the same reader and the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loki_dist.core import checks
from loki_dist.core.errors import UserError, preview, shown

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
class Conversation:
    """One sample as chat messages, with the tool list its template renders (sharegpt `tools`) and
    where it came from, for error messages (`--data: row 3`, `--dataset toolace: row 3`)."""

    messages: list[dict[str, str]]
    tools: list[dict] | None = None
    where: str = "--data"


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
