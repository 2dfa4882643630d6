"""Small MMLU-layout data made in code: several subjects, questions of very different lengths."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ("abstract_algebra", "high_school_biology", "world_religions")
_WORDS = [
    "the",
    "of",
    "cell",
    "energy",
    "group",
    "ring",
    "god",
    "faith",
    "number",
    "prime",
    "protein",
    "water",
    "light",
    "field",
    "root",
]


def make_rows(per_subject: int, seed: int = 0, subjects=SUBJECTS) -> list[dict]:
    """Subjects interleaved, question lengths from 1 to 40 words."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {"question": words(1, 40) + "?", "subject": subject, "choices": [words(1, 4) for _ in range(4)],
         "answer": rng.randint(0, 3)}
        for _ in range(per_subject)
        for subject in subjects
    ]  # fmt: skip


def write_mmlu(directory: Path, per_subject: int = 4, dev_per_subject: int = 2) -> Path:
    """A folder with test.jsonl and dev.jsonl, as `--data` takes it."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("test", per_subject, 0), ("dev", dev_per_subject, 1)):
        lines = [json.dumps(row) for row in make_rows(n, seed)]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory
