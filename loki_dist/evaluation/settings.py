"""The settings of one `loki-dist evaluate` run: typed, checked once, the single source of what it does.

The command (evaluate.py) reads its flags once, at its boundary, into an EvaluateSettings and hands it to
each task's input reader (its own, retention.py's); none of them sees the parsed command line. A
retention folder scores each of its files as a task of its own: the same settings with that file's
data, task and name (dataclasses.replace). The checks that need only the values are made here, when the
settings are made; those that read files (the model, the output) are the command's.
"""

from __future__ import annotations

from dataclasses import dataclass

from loki_dist.attribution.mmlu import QuestionSettings
from loki_dist.core.errors import require_at_least


@dataclass(frozen=True)
class EvaluateSettings:
    """What `loki-dist evaluate` was asked to do, one field per flag (the question flags as a group)."""

    model: str  # the Hugging Face model directory to evaluate
    data: str  # what the task reads: MMLU-layout data, documents, facts, or a folder of retention probes
    output: str  # the results file to write (JSON), replaced if it exists
    task: str  # multiple_choice, perplexity, completion or retention
    name: str | None  # the benchmark's name in the results' `scores`; None: the task's own (mmlu, ...)
    scores_per_subject: bool  # multiple_choice: also one `NAME/subject` score per subject
    questions: QuestionSettings  # multiple_choice: which questions are asked (per_subject 0: all)
    text_field: str  # perplexity: the column of JSON/JSONL/parquet rows that holds a document
    max_seq_len: int  # perplexity: tokens per window; a longer document is read in windows of this many
    batch_size: int  # prompts (documents, facts) per forward on each rank
    dtype: str  # the precision the model is loaded in (either spelling; auto: bf16 on GPU, fp32 on CPU)
    ds_config: str | None  # a ZeRO-3 inference config to shard the model with; None: whole on each rank
    chat_template: str | None  # a Jinja file or built-in template name for the prompts; None: the tokenizer's

    def __post_init__(self) -> None:
        require_at_least(
            ("--batch-size", self.batch_size, 1),
            ("--max-seq-len", self.max_seq_len, 2),
            ("--per-subject", self.questions.per_subject, 0),
            ("--shots", self.questions.shots, 0),
        )
