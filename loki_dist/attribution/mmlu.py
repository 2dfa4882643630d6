"""General-knowledge prompts for attribution: MMLU-layout data, loaded, checked and turned into token ids.

Attribution asks "which down_proj rows matter least for what the model already knows", so its prompts
are multiple-choice questions in the MMLU layout (`question`, `subject`, `choices` (4 strings), `answer`
(0-3)). The prompt text is fixed by DESIGN.md; any change to it changes every score, so it lives here and
nowhere else. Every row is checked before a model is loaded, so a bad file fails in a second with the
row's index instead of after an hour of scoring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from loki_dist.core.errors import UserError, preview

log = logging.getLogger(__name__)

COLUMNS = ("question", "subject", "choices", "answer")
LETTERS = "ABCD"
EVAL_SPLIT, SHOT_SPLIT = "test", "dev"


def add_question_arguments(
    parser: argparse.ArgumentParser, *, split_help: str, per_subject: int, per_subject_help: str
) -> None:
    """Which questions of an MMLU-layout --data are read: declared once for `attribute` and `evaluate`,
    so the two commands cannot drift apart; only what they mean differently (the split's verb, how
    many questions per subject by default) is theirs to say."""
    group = parser.add_argument_group("MMLU-layout questions")
    group.add_argument("--data-config", default=None, help="hub data set configuration (e.g. `all`)")
    group.add_argument("--split", default=EVAL_SPLIT, help=split_help)
    group.add_argument("--per-subject", type=int, default=per_subject, help=per_subject_help)
    group.add_argument("--shots", type=int, default=0, help="k-shot examples from the dev split (default 0)")
    group.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")


@dataclass(frozen=True)
class QuestionSettings:
    """The values of add_question_arguments' flags: which questions of an MMLU-layout --data are read.

    One typed group for both commands that read questions (the flags are declared once above, so is
    what they hold); each command checks the bounds it allows (attribute and evaluate differ on
    --per-subject 0).
    """

    data_config: str | None  # --data-config: the hub data set's configuration (e.g. `all`); None: its default
    split: str  # --split: the split whose questions are scored (test by default)
    per_subject: int  # --per-subject: the first N questions of each subject, in data order
    shots: int  # --shots: k-shot examples from the dev split put before each question
    subjects: str | None  # --subjects as given, comma-separated (recorded so); None: every subject

    @property
    def subject_names(self) -> list[str] | None:
        """--subjects as a list of names (blanks dropped), or None for all."""
        if not self.subjects:
            return None
        return [s.strip() for s in self.subjects.split(",") if s.strip()]


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


@dataclass
class PromptSet:
    """The attribution samples, in data order, with what is needed to reproduce them."""

    questions: list[Question]
    input_ids: list[list[int]]
    chat_template: bool
    settings: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of all prompts' token ids: changes with the data, shots, template and tokenizer."""
        digest = hashlib.sha256()
        for ids in self.input_ids:
            digest.update(json.dumps(ids).encode())
            digest.update(b"\n")
        return digest.hexdigest()


def subject_title(subject: str) -> str:
    """`high_school_biology` -> `High School Biology`."""
    return subject.replace("_", " ").title()


def prompt_text(q: Question) -> str:
    """The user message of DESIGN.md, ending with a newline after `Answer: `."""
    lines = [
        f"There is a single choice question about {subject_title(q.subject)}. "
        "Answer the question by replying A, B, C or D.",
        f"Question: {q.question}",
        "Choices:",
        *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True)),
        "Answer: ",
    ]
    return "\n".join(lines) + "\n"


def messages_for(q: Question, shots: list[Question]) -> list[dict[str, str]]:
    """k-shot: each dev example as a user turn answered by an assistant turn holding the letter."""
    messages = []
    for shot in shots:
        messages.append({"role": "user", "content": prompt_text(shot)})
        messages.append({"role": "assistant", "content": LETTERS[shot.answer]})
    messages.append({"role": "user", "content": prompt_text(q)})
    return messages


def question_rows(questions: list[Question]) -> list[dict]:
    """Questions as rows in the MMLU layout that `--data` reads (a JSON list of these is a data file)."""
    return [
        {"subject": q.subject, "question": q.question, "choices": list(q.choices), "answer": q.answer}
        for q in questions
    ]


def answered_messages(q: Question) -> list[dict[str, str]]:
    """The 0-shot prompt answered by its letter: one chat example to train on."""
    return [*messages_for(q, []), {"role": "assistant", "content": LETTERS[q.answer]}]


def encode(tokenizer, q: Question, shots: list[Question], where: str = "--data") -> list[int]:
    """Token ids of one prompt; the last id is the attributed position t. `where`: the prompt, for
    the one line that says what the chat template did wrong with it."""
    if tokenizer.chat_template:
        from loki_dist.implant.data.chat_templates import render

        text = render(tokenizer, messages_for(q, shots), where, prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{prompt_text(s)}{LETTERS[s.answer]}\n\n" for s in shots) + prompt_text(q)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


# ---------------------------------------------------------------------------------------------- reading


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text()
        from loki_dist.core.checks import parse_json, parse_jsonl

        if suffix == ".jsonl" or not text.lstrip().startswith("["):
            return parse_jsonl(text, f"--data {path}")  # names the broken line
        return parse_json(text, f"--data {path}")
    except UserError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"--data {path}: cannot read it as {suffix.lstrip('.') or 'JSON'} ({err})") from None
    except Exception as err:  # pyarrow raises its own types for a corrupted parquet file
        raise UserError(f"--data {path}: cannot read it ({type(err).__name__}: {err})") from None


def _split_of(relative: Path) -> str:
    """MMLU file names carry their split (`test-00000-of-00001.parquet`, `dev/x.jsonl`); others are test."""
    words = set()
    for part in (*relative.parts[:-1], relative.name.split(".")[0]):
        for word in part.lower().split("-"):
            words.update({word, word.rsplit("_", 1)[-1]})
    for split in (SHOT_SPLIT, "validation", "auxiliary_train", EVAL_SPLIT):
        if split in words:
            return split
    return EVAL_SPLIT


def _from_saved_dataset(path: Path) -> dict[str, list[dict]]:
    from datasets import Dataset, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for "not a saved dataset"
        raise UserError(f"--data {path}: not a `datasets` directory saved to disk ({err})") from None
    if isinstance(loaded, Dataset):
        return {EVAL_SPLIT: list(loaded)}
    return {name: list(split) for name, split in loaded.items()}


def read_splits(source: str, config: str | None = None) -> dict[str, list[dict]]:
    """Rows by split from a saved `datasets` dir, a parquet/JSON(L) file or folder, or a hub name (read
    by this process: with several ranks, hubdata.fetch_once first makes one copy for all)."""
    from loki_dist.core import hubdata

    path = Path(source)
    if hubdata.is_hub_name(source):
        return {split: list(rows) for split, rows in hubdata.download(source, config).items()}
    if not path.exists():
        raise UserError(f"--data {source}: file or directory not found")
    if path.is_dir() and any((path / marker).exists() for marker in ("dataset_dict.json", "state.json")):
        return _from_saved_dataset(path)
    files = (
        sorted(p for p in path.rglob("*") if p.suffix.lower() in (".parquet", ".json", ".jsonl"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise UserError(f"--data {source}: no .parquet, .json or .jsonl file in this folder")
    splits: dict[str, list[dict]] = {}
    for file in files:
        split = _split_of(file.relative_to(path) if path.is_dir() else Path(file.name))
        splits.setdefault(split, []).extend(_read_file(file))
    return splits


def _check_row(row: object, index: int, split: str) -> Question:
    where = f"--data: {split} row {index}"
    if not isinstance(row, dict):
        raise UserError(f"{where} is not an object with columns {', '.join(COLUMNS)}")
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise UserError(f"{where} lacks column(s) {', '.join(missing)}; the MMLU layout needs {COLUMNS}")
    choices = row["choices"]
    if not isinstance(choices, (list, tuple)) or len(choices) != 4:
        count = len(choices) if isinstance(choices, (list, tuple)) else type(choices).__name__
        raise UserError(f"{where}: `choices` must be a list of exactly 4 strings, got {count}")
    answer = row["answer"]
    if isinstance(answer, str) and answer.strip().upper() in LETTERS and len(answer.strip()) == 1:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
        raise UserError(f"{where}: `answer` must be 0-3 (or A-D), got {preview(row['answer'])}")
    return Question(str(row["subject"]), str(row["question"]), tuple(str(c) for c in choices), answer)


def pick_split(splits: dict[str, list[dict]], split: str, source: str) -> tuple[str, list[dict]]:
    """(name, rows) of the wanted split, or of the only one there is (a single file names none)."""
    if split not in splits:
        if len(splits) != 1:
            raise UserError(f"--data {source}: no {split!r} split (it has {', '.join(sorted(splits))})")
        split = next(iter(splits))
    return split, splits[split]


def load_questions(
    source: str,
    per_subject: int = 50,
    shots: int = 0,
    subjects: list[str] | None = None,
    split: str = EVAL_SPLIT,
    config: str | None = None,
) -> tuple[list[Question], dict[str, list[Question]]]:
    """The first `per_subject` questions of each subject in data order, and `shots` dev examples each.

    Returns (questions in data order, {subject: shot examples}). Every row of the used splits is
    checked, not only the kept ones: a broken file is better reported whole than half-used.
    """
    if per_subject < 1:
        raise UserError(f"--per-subject {per_subject}: must be at least 1")
    if shots < 0:
        raise UserError(f"--shots {shots}: must be 0 or more")
    return questions_from_splits(read_splits(source, config), source, per_subject, shots, subjects, split)


def questions_from_splits(
    splits: dict[str, list[dict]],
    source: str,
    per_subject: int,
    shots: int = 0,
    subjects: list[str] | None = None,
    split: str = EVAL_SPLIT,
) -> tuple[list[Question], dict[str, list[Question]]]:
    """load_questions on rows already read (read_splits): for a caller that looked at them first."""
    split, found = pick_split(splits, split, source)
    rows = [_check_row(row, i, split) for i, row in enumerate(found)]
    if not rows:
        raise UserError(f"--data {source}: the {split!r} split is empty")
    wanted = set(subjects) if subjects else None
    if wanted:
        unknown = wanted - {q.subject for q in rows}
        if unknown:
            raise UserError(f"--subjects: {', '.join(sorted(unknown))} not in --data {source}")
    kept, seen = [], {}
    for q in rows:
        if (wanted is None or q.subject in wanted) and seen.get(q.subject, 0) < per_subject:
            kept.append(q)
            seen[q.subject] = seen.get(q.subject, 0) + 1
    shot_map: dict[str, list[Question]] = {s: [] for s in seen}
    if shots:
        if SHOT_SPLIT not in splits:
            raise UserError(f"--shots {shots}: --data {source} has no {SHOT_SPLIT!r} split to draw them from")
        for i, row in enumerate(splits[SHOT_SPLIT]):
            q = _check_row(row, i, SHOT_SPLIT)
            if q.subject in shot_map and len(shot_map[q.subject]) < shots:
                shot_map[q.subject].append(q)
        short = sorted(s for s, got in shot_map.items() if len(got) < shots)
        if short:
            raise UserError(f"--shots {shots}: the {SHOT_SPLIT!r} split has too few examples for {short[0]}")
    return kept, shot_map


def build_prompts(tokenizer, questions: list[Question], shot_map: dict[str, list[Question]]) -> PromptSet:
    """Token ids for every question; says in the log when the tokenizer has no chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        log.warning("the tokenizer has no chat template: using the plain prompt text")
    ids = [
        encode(tokenizer, q, shot_map.get(q.subject, []), f"--data: prompt {i}")
        for i, q in enumerate(questions)
    ]
    too_short = next((i for i, x in enumerate(ids) if len(x) < 2), None)
    if too_short is not None:
        raise UserError(f"--data: prompt {too_short} encodes to fewer than 2 tokens")
    return PromptSet(questions, ids, has_template)
