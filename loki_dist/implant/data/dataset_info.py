"""LLaMA-Factory's data sets: `--dataset NAME[,NAME...]` read through `--dataset-dir`/dataset_info.json.

People who fine-tune with LLaMA-Factory keep their data in its layout: a dataset_info.json that names each
data set, its file (relative to the directory), its format and how its columns and role tags are
called. Reading that layout as it is lets them train with loki_dist without converting anything.

An entry: `file_name` (a JSON/JSONL file, a directory of them, or a `datasets` directory saved to disk),
`formatting` (`alpaca`, the default, or `sharegpt`), `columns` and, for sharegpt, `tags`:

- alpaca columns (defaults): prompt (instruction), query (input), response (output), system, history,
  tools. The user turn is the prompt and the query joined by a newline (as LLaMA-Factory does; plain
  `--data` alpaca rows keep their blank line); `history` is a list of [user, assistant] pairs that come
  before it, and those answers are trained too (LLaMA-Factory's default, mask_history false).
- sharegpt columns: messages (conversations), system, tools; tags (defaults): role_tag (from),
  content_tag (value), user_tag (human), assistant_tag (gpt), observation_tag (observation),
  function_tag (function_call), system_tag (system). A function_call turn is trained like an assistant
  turn; an observation turn is the `tool` role; a first turn with the system tag is the system message.
- tools: a JSON string or a list of function schemas, passed to the chat template as `tools`.

An `hf_hub_url` that names a local directory (or file) is read from there, as LLaMA-Factory's
`load_dataset` reads it: the LoKI reference's train.sh registers its ToolACE copy so. Relative to the
current directory (not --dataset-dir), with `folder` as the sub-directory; in a directory, the .json,
.jsonl and .parquet files, and where some are named for a split (`train-*.json`, `test.jsonl`), only the
train split's. Any other entry with only a hub or script address (ms_hub_url, om_hub_url, script_url,
cloud_file_name, an hf_hub_url that is no local path) is refused: loki_dist reads local files only.
Preference (`ranking`) and multimodal columns are refused too: loki_dist trains supervised text.

Several data sets: one after another by default (LLaMA-Factory's `concat`), or mixed with ratios
(`--mix-ratios`, LLaMA-Factory's `interleave_probs` with `mix_strategy: interleave_under`): for each
sample, a data set is drawn with probability ratio_i / sum(ratios) from a generator seeded with --seed,
and its next row (in file order) is taken; the mixture ends right after the row that empties one data
set. So the counts follow the ratios, the same seed gives the same mixture, and no row is repeated.
"""

from __future__ import annotations

import argparse
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from loki_dist.core import checks
from loki_dist.core.errors import UserError, preview, shown
from loki_dist.implant.data.rows import Conversation, check_turns, read_rows

INFO_FILE = "dataset_info.json"
FORMATS = ("alpaca", "sharegpt")
COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": None,
               "history": None, "tools": None},
    "sharegpt": {"messages": "conversations", "system": None, "tools": None},
}  # fmt: skip
TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# the chat role each sharegpt tag becomes (function calls are trained as the assistant's turns)
_TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "function_tag": "assistant",
              "observation_tag": "tool", "system_tag": "system"}  # fmt: skip
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_ENTRY_KEYS = {"file_name", "formatting", "columns", "tags", "split", "ranking", "subset", "folder",
               *REMOTE_KEYS}  # fmt: skip
_DATA_SUFFIXES = (".json", ".jsonl")
_HUB_SUFFIXES = (".json", ".jsonl", ".parquet")
# what `datasets` reads as a file's split in a directory (its name's words): only the train split trains
_TRAIN_WORDS = {"train", "training"}
_OTHER_SPLIT_WORDS = {"test", "testing", "eval", "evaluation", "validation", "valid", "val", "dev"}


@dataclass
class Entry:
    """One dataset_info.json entry, checked."""

    name: str
    path: Path
    formatting: str
    columns: dict[str, str | None]
    tags: dict[str, str]
    option: str = "--dataset"  # the flag that named it (--eval-dataset: the held-out set)
    hub_directory: bool = False  # an hf_hub_url naming a local path: read as `datasets` reads a folder

    @property
    def flag(self) -> str:
        return f"{self.option} {self.name}"


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


def read_info(dataset_dir: str) -> dict:
    path = Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        raise UserError(f"--dataset-dir {dataset_dir}: no {INFO_FILE} there")
    info = checks.read_json(path, "--dataset-dir")
    if not isinstance(info, dict):
        raise UserError(f"--dataset-dir {dataset_dir}: {INFO_FILE} must map data set names to entries")
    return info


def entry(info: dict, name: str, dataset_dir: str, option: str = "--dataset") -> Entry:
    """The entry `name`, its keys checked: a mistake here is one line naming the key."""
    where = f"{option} {name}"
    if name not in info:
        known = ", ".join(sorted(info)[:20]) or "none"
        raise UserError(f"{where}: not in {Path(dataset_dir) / INFO_FILE} (it has {known})")
    raw = info[name]
    if not isinstance(raw, dict):
        raise UserError(f"{where}: its entry must be an object with file_name, formatting, columns")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise UserError(
            f"{where}: unknown entry key {preview(unknown[0])}; expected some of {sorted(_ENTRY_KEYS)}"
        )
    local = _local_hub_path(raw, where)
    if "file_name" not in raw and local is None:
        remote = next((key for key in REMOTE_KEYS if key in raw), None)
        if remote:
            raise UserError(
                f"{where}: only {remote} {preview(raw[remote])}, and loki_dist reads local files only "
                f"(no hub access); download it and set file_name to the local file, relative to {dataset_dir}"
            )
        raise UserError(f"{where}: the entry has no file_name")
    if raw.get("ranking"):
        raise UserError(f"{where}: a ranking (preference) data set; loki_dist trains supervised rows")
    if raw.get("split", "train") != "train":
        raise UserError(f"{where}: split {preview(raw['split'])}; a local file has only the train split")
    formatting = raw.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise UserError(f"{where}: formatting {preview(formatting)}; expected one of {', '.join(FORMATS)}")
    columns = {**COLUMNS[formatting], **_mapping(raw, "columns", where, COLUMNS[formatting])}
    tags = {**TAGS, **_mapping(raw, "tags", where, TAGS if formatting == "sharegpt" else {})}
    if "file_name" in raw:
        return Entry(name, Path(dataset_dir) / str(raw["file_name"]), formatting, columns, tags, option)
    return Entry(name, local, formatting, columns, tags, option, hub_directory=True)


def _local_hub_path(raw: dict, where: str) -> Path | None:
    """The local path an `hf_hub_url` names (relative to the current directory, with `folder` below
    it), as `datasets.load_dataset` takes it; None where it names no local file or directory."""
    url = raw.get("hf_hub_url")
    if not isinstance(url, str) or not url or not Path(url).exists():
        return None
    if raw.get("subset") is not None:
        raise UserError(f"{where}: subset {preview(raw['subset'])} of the local directory {url}: a local "
                        "directory has no subsets; name its files' folder with `folder`")  # fmt: skip
    folder = raw.get("folder")
    if folder is not None and not isinstance(folder, str):
        raise UserError(f"{where}: folder must be a string, got {preview(folder)}")
    return Path(url) / folder if folder else Path(url)


def _mapping(raw: dict, key: str, where: str, allowed: dict) -> dict[str, str]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: `{key}` must be an object")
    for name, column in value.items():
        if name not in allowed:
            expected = ", ".join(allowed) or f"none for {raw.get('formatting', 'alpaca')}"
            raise UserError(f"{where}: {key} {preview(name)} is not supported; expected {expected}")
        if column is not None and not isinstance(column, str):
            raise UserError(f"{where}: {key}.{name} must be a string, got {preview(column)}")
    return value


def entries(args: argparse.Namespace, option: str = "--dataset") -> list[Entry]:
    """The entries args.dataset names (`option` is the flag that gave the names, for messages)."""
    info = read_info(args.dataset_dir)
    return [entry(info, name, args.dataset_dir, option) for name in dataset_names(args.dataset)]


def input_paths(args: argparse.Namespace, option: str = "--dataset") -> dict[str, str]:
    return {e.flag: str(e.path) for e in entries(args, option)}


def conversations(args: argparse.Namespace, option: str = "--dataset") -> list[Conversation]:
    """Every data set's rows as conversations, each cut to --max-samples, then mixed."""
    parts = []
    for e in entries(args, option):
        rows = _rows(e)[: args.max_samples]
        if not rows:
            raise UserError(f"{e.flag}: {e.path} holds no rows")
        convert = _alpaca if e.formatting == "alpaca" else _sharegpt
        parts.append([convert(row, e, f"{e.flag}: row {i}") for i, row in enumerate(rows)])
    if args.mix_ratios is None:
        return [c for part in parts for c in part]
    return mix(parts, parse_ratios(args.mix_ratios, len(parts)), args.seed)


def _rows(e: Entry) -> list[dict]:
    """A file; a `datasets` directory; or a directory of JSON/JSONL files, read in name order (a local
    hf_hub_url: its train split's .json, .jsonl and .parquet files, read in path order, see the top)."""
    saved = (e.path / "state.json").is_file() or (e.path / "dataset_dict.json").is_file()
    if not e.path.is_dir() or saved:
        return read_rows(e.path, e.flag)
    if e.hub_directory:
        found = _train_split(sorted(_data_files(e.path)), e.path)
        kinds = ".json, .jsonl or .parquet file of the train split"
    else:
        found, kinds = (
            sorted(p for p in e.path.iterdir() if p.suffix in _DATA_SUFFIXES),
            ".json or .jsonl file",
        )
    if not found:
        raise UserError(f"{e.flag}: {e.path} holds no {kinds}")
    return [row for path in found for row in read_rows(path, e.flag)]


def _data_files(root: Path):
    """A hub-style directory's data files, as `datasets` finds them: hidden and `__` paths skipped (a
    clone's .git, a download's .cache)."""
    for path in root.rglob("*"):
        hidden = any(part.startswith((".", "__")) for part in path.relative_to(root).parts)
        if path.suffix.lower() in _HUB_SUFFIXES and path.is_file() and not hidden:
            yield path


def _train_split(found: list[Path], root: Path) -> list[Path]:
    """The files `datasets` reads as the train split: all of them, unless some name a split (a word of
    the path below `root`, between - . _ or digits), then those that name the train split."""

    def words(path: Path) -> set[str]:
        return set(re.split(r"[-._ 0-9/]+", str(path.relative_to(root).with_suffix("")).lower()))

    named = [p for p in found if words(p) & (_TRAIN_WORDS | _OTHER_SPLIT_WORDS)]
    return [p for p in found if words(p) & _TRAIN_WORDS] if named else found


def mix(parts: list[list], ratios: list[float], seed: int) -> list:
    """Interleave until one part runs out: each sample's part drawn with probability ratio/sum (seeded),
    taking that part's next row (see the module's docstring)."""
    rng = random.Random(seed)
    taken, mixed = [0] * len(parts), []
    while True:
        k = rng.choices(range(len(parts)), weights=ratios)[0]
        mixed.append(parts[k][taken[k]])
        taken[k] += 1
        if taken[k] == len(parts[k]):
            return mixed


def _text(row: dict, column: str | None, where: str, required: bool = False) -> str | None:
    """A string column of the row (None or "" when absent and not required)."""
    if column is None:
        return None
    value = row.get(column) if isinstance(row, dict) else None
    if value is None and not required:
        return None
    if not isinstance(value, str):
        got = "nothing" if value is None else shown(value, json_style=True)
        raise UserError(f"{where}: column `{column}` must be a string, got {got}")
    return value


def _tools(row: dict, column: str | None, where: str) -> list[dict] | None:
    value = row.get(column) if column else None
    if isinstance(value, str):
        if not value.strip():
            return None
        value = checks.parse_json(value, f"{where}: column `{column}`")
    if value is None or value == []:
        return None
    value = [value] if isinstance(value, dict) else value
    if not (isinstance(value, list) and all(isinstance(tool, dict) for tool in value)):
        raise UserError(
            f"{where}: column `{column}` must be a list of tool objects (or a JSON string of one)"
        )
    return value


def _opening(row: dict, e: Entry, where: str, system: str | None = None) -> list[dict[str, str]]:
    system = system if system is not None else _text(row, e.columns["system"], where)
    return [{"role": "system", "content": system}] if system else []


def _finish(messages: list[dict[str, str]], row: dict, e: Entry, where: str) -> Conversation:
    check_turns(messages, where)
    return Conversation(messages, _tools(row, e.columns["tools"], where), where)


def _alpaca(row: dict, e: Entry, where: str) -> Conversation:
    if not isinstance(row, dict):
        raise UserError(f"{where} is not an object")
    messages = _opening(row, e, where)
    history = row.get(e.columns["history"]) if e.columns["history"] else None
    if history is not None:
        if not (isinstance(history, list) and all(_is_pair(turn) for turn in history)):
            raise UserError(
                f"{where}: column `{e.columns['history']}` must be a list of [user, assistant] pairs"
            )
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    parts = [_text(row, e.columns["prompt"], where, required=True), _text(row, e.columns["query"], where)]
    messages.append({"role": "user", "content": "\n".join(part for part in parts if part)})
    messages.append({"role": "assistant", "content": _text(row, e.columns["response"], where, required=True)})
    return _finish(messages, row, e, where)


def _is_pair(turn: object) -> bool:
    return isinstance(turn, list) and len(turn) == 2 and all(isinstance(text, str) for text in turn)


def _sharegpt(row: dict, e: Entry, where: str) -> Conversation:
    if not isinstance(row, dict):
        raise UserError(f"{where} is not an object")
    turns = row.get(e.columns["messages"])
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: column `{e.columns['messages']}` must be a non-empty list of turns")
    roles = {e.tags[tag]: role for tag, role in _TAG_ROLES.items()}
    role_tag, content_tag = e.tags["role_tag"], e.tags["content_tag"]
    messages = []
    for number, turn in enumerate(turns):
        tag = turn.get(role_tag) if isinstance(turn, dict) else turn
        role = roles.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise UserError(
                f"{where}, turn {number}: {role_tag} {preview(tag)} is none of the tags ({', '.join(roles)})"
            )
        content = turn.get(content_tag)
        if not isinstance(content, str):
            raise UserError(f"{where}, turn {number}: `{content_tag}` must be a string")
        if role == "system" and number > 0:
            raise UserError(f"{where}, turn {number}: a system turn after the first")
        messages.append({"role": role, "content": content})
    if messages[0]["role"] == "system":
        return _finish(_opening(row, e, where, messages[0]["content"]) + messages[1:], row, e, where)
    return _finish(_opening(row, e, where) + messages, row, e, where)
