"""`loki-dist evaluate`: multiple-choice accuracy (MMLU layout) or perplexity, data-parallel.

LoKI's claim is "learn the task, forget almost nothing", so both sides must be measurable with the same
prompts that attribution used: a question is scored with docs/method.md's prompt (mmlu.py, chat template,
k-shot from dev), and the model's answer is the letter A-D whose token has the highest log-likelihood
right after the prompt (ties: the earlier letter).

Each rank scores a contiguous block of the samples (sharding.py), so the per-sample results,
gathered in rank order, are in data order. What is summed over ranks is exact whatever the world size:
integer counts for accuracy; for perplexity each document's NLL is a float64 computed on one rank alone,
gathered, and summed in data order on every rank, so 1 and N ranks add the same numbers in the same order.

With `--ds-config` (a ZeRO-3 inference config, ds_configs/zero3_infer.json) the model is sharded over the
ranks instead of loaded whole on each, so a model larger than one device can be evaluated. ZeRO-3 gathers
every layer's parameters collectively during a forward, so then all ranks make the same number of model
calls: they agree on the most batches any rank has (an all-reduce MAX), and a rank with fewer runs
one-token dummy forwards whose outputs are discarded. The batches themselves may differ in shape between
ranks (the gathering depends only on the order of the calls), and the results are those of the whole
model. The forwards that score, and keep the ranks in that lockstep: scoring.py.

A results file holds `scores`, {benchmark name: value}, read by `loki-dist forgetting`: accuracy in
percent under the --name (default `mmlu`) and, with --scores-per-subject, one `NAME/subject` entry per
subject; perplexity under --name (default `perplexity`), listed in `lower_is_better`. Tasks `completion`
(plain facts) and `retention` (a folder of retention probes, a score per file): retention.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from loki_dist.attribution.mmlu import QuestionSettings, add_question_arguments
from loki_dist.core import checks, files, flags, hubdata, metering
from loki_dist.core.errors import UserError
from loki_dist.core.modeling import add_inference_arguments, read_inference_config, torch_dtype
from loki_dist.core.sharding import block_sizes, my_block
from loki_dist.evaluation.scoring import (
    document_nll,
    letter_logprobs,
    letter_token_ids,
)
from loki_dist.evaluation.settings import EvaluateSettings

log = logging.getLogger("loki_dist.evaluate")

TASKS = ("multiple_choice", "perplexity", "completion", "retention")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument(
        "--data",
        required=True,
        help="multiple_choice: MMLU-layout data (as for attribute); perplexity: a .txt file (one "
        "document per non-empty line) or JSON/JSONL/parquet rows with a --text-field; completion: rows of "
        "{prompt, answer}; retention: a folder of prose.jsonl, questions.json, facts.jsonl (the demo's)",
    )
    p.add_argument("--output", required=True, help="results file to write (JSON)")
    p.add_argument("--task", choices=TASKS, default="multiple_choice")
    p.add_argument(
        "--name",
        default=None,
        help="benchmark name in the results' `scores` (default: mmlu or perplexity); "
        "`loki-dist forgetting` compares scores by this name",
    )
    p.add_argument(
        "--scores-per-subject",
        action="store_true",
        help="multiple_choice: also list each subject as a benchmark `NAME/subject` in `scores`",
    )
    add_question_arguments(
        p,
        split_help="split to evaluate (default: test)",
        per_subject=0,
        per_subject_help="first N questions per subject (0: all)",
    )
    p.add_argument("--text-field", default="text", help="perplexity: the text column (default: text)")
    flags.add_max_seq_len(p, 1024, "perplexity reads a longer document in windows of this many")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward per rank (default 8)")
    add_inference_arguments(p)


# ---------------------------------------------------------------------------------------------- data


def _read_documents(settings: EvaluateSettings) -> list[str]:
    from loki_dist.attribution import mmlu

    source, asked = settings.data, settings.questions
    if Path(source).suffix.lower() == ".txt":
        return read_text_lines(source)
    _, rows = mmlu.pick_split(mmlu.read_splits(source, asked.data_config), asked.split, source)
    return documents_from_rows(rows, source, settings.text_field)


def read_text_lines(source: str) -> list[str]:
    """A .txt file's documents: one per non-empty line."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--data {source}: file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise UserError(f"--data {source}: not UTF-8 text ({err})") from None
    return [line for line in text.splitlines() if line.strip()]


def documents_from_rows(rows: list, source: str, text_field: str, hint: str = "--text-field") -> list[str]:
    """The `text_field` column of every row (each must have it); hint says where the name comes from."""
    texts = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise UserError(f"--data: row {index} has no string column {text_field!r} ({hint})")
        texts.append(row[text_field])
    if not texts:
        raise UserError(f"--data {source}: no documents")
    return texts


def read_settings(args: argparse.Namespace) -> EvaluateSettings:
    """The parsed flags as the run's settings, their values checked (the command line stops here)."""
    values = vars(args)
    return flags.to_settings(EvaluateSettings, values, questions=flags.to_settings(QuestionSettings, values))


def _validate(settings: EvaluateSettings) -> dict | None:
    """Everything checked before any work; returns the --ds-config (None: the model whole per rank)."""
    from loki_dist.core.families import FAMILIES, read_config, spec_from_config
    from loki_dist.core.modeling import check_known_to_transformers, check_weights

    model = settings.model
    config = read_config(model)  # any causal LM; the shapes are checked where LoKI knows the family
    known = config.get("model_type") in FAMILIES
    source = f"--model {Path(model) / 'config.json'}"
    check_known_to_transformers(config, source)
    check_weights(model, spec=spec_from_config(config, source) if known else None)
    # an existing results file is replaced (atomically), as an evaluation is cheap to redo
    checks.refuse_output_over_inputs("--output", settings.output, {"--model": model, "--data": settings.data})
    checks.check_writable("--output", settings.output)
    if not settings.ds_config:
        return None
    return read_inference_config(settings.ds_config, torch_dtype(settings.dtype))


# ----------------------------------------------------------------------------------------------- run


def _gather(local: torch.Tensor, n: int, world) -> torch.Tensor:
    """Per-sample results of every rank, in data order, on the CPU."""
    from loki_dist.core.collectives import all_gather_varlen

    return all_gather_varlen(local.contiguous(), block_sizes(n, world.size)).cpu()


def multiple_choice_results(questions, predictions: torch.Tensor, name: str, per_subject: bool) -> dict:
    """Accuracy per subject and overall from predicted letter indices in data order."""
    subjects: dict[str, dict[str, float]] = {}
    for q, chosen in zip(questions, predictions.tolist(), strict=True):
        entry = subjects.setdefault(q.subject, {"correct": 0, "total": 0})
        entry["correct"] += int(chosen == q.answer)
        entry["total"] += 1
    for entry in subjects.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    correct = sum(e["correct"] for e in subjects.values())
    scores = {name: 100 * correct / len(questions)}
    if per_subject:
        scores.update({f"{name}/{s}": 100 * e["accuracy"] for s, e in subjects.items()})
    return {
        "task": "multiple_choice",
        "accuracy": correct / len(questions),
        "correct": correct,
        "total": len(questions),
        "subjects": subjects,
        "predictions": predictions.tolist(),
        "scores": scores,
        "lower_is_better": [],
    }


def _multiple_choice_inputs(settings: EvaluateSettings, tokenizer) -> Callable:
    """Read and encode the questions (every input error before the model loads); returns the scorer."""
    from loki_dist.attribution import mmlu

    asked = settings.questions
    questions, shot_map = mmlu.load_questions(
        settings.data,
        asked.per_subject or sys.maxsize,
        asked.shots,
        asked.subject_names,
        asked.split,
        asked.data_config,
    )
    prompts = mmlu.build_prompts(tokenizer, questions, shot_map)
    letters = letter_token_ids(tokenizer)

    def evaluate(world, loaded) -> dict:
        mine = my_block(len(questions), world)
        ids = [prompts.input_ids[i] for i in mine]
        model = loaded.model
        scores = letter_logprobs(model, ids, letters, _pad_id(model), settings.batch_size, loaded.sharded)
        local = scores.argmax(dim=-1)
        predictions = _gather(local, len(questions), world)
        name, per_subject = settings.name or "mmlu", settings.scores_per_subject
        result = multiple_choice_results(questions, predictions, name, per_subject)
        return {**result, "shots": asked.shots, "chat_template": prompts.chat_template}

    return evaluate


def _perplexity_inputs(settings: EvaluateSettings, tokenizer) -> Callable:
    """Read the documents before the model loads; returns the scorer."""
    from loki_dist.core.distributed import agreement

    texts = _read_documents(settings)
    name = settings.name or "perplexity"

    def evaluate(world, loaded) -> dict:
        mine = my_block(len(texts), world)
        documents = [tokenizer(texts[i], add_special_tokens=True)["input_ids"] for i in mine]
        model = loaded.model
        nll, count = document_nll(
            model, documents, settings.max_seq_len, _pad_id(model), settings.batch_size, loaded.sharded
        )
        nll, count = (_gather(t, len(texts), world) for t in (nll, count))
        total_nll, tokens = math.fsum(nll.tolist()), int(count.sum())
        with agreement(world):  # every rank holds the same sums: one line, not one per rank
            if tokens == 0:
                raise UserError(f"--data {settings.data}: no document has 2 or more tokens")
        perplexity = math.exp(total_nll / tokens)
        return {
            "task": "perplexity",
            "perplexity": perplexity,
            "nll_sum": total_nll,
            "tokens": tokens,
            "documents": len(texts),
            "max_seq_len": settings.max_seq_len,
            "scores": {name: perplexity},
            "lower_is_better": [name],
        }

    return evaluate


def _pad_id(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def task_inputs(settings: EvaluateSettings, tokenizer) -> Callable:
    """The --task's inputs read before the model loads, as its scorer."""
    from loki_dist.evaluation import retention

    scorers = {
        "multiple_choice": _multiple_choice_inputs,
        "perplexity": _perplexity_inputs,
        "completion": retention.completion_inputs,
    }
    if settings.task == "retention":
        return retention.retention_inputs(settings, tokenizer, scorers)
    return scorers[settings.task](settings, tokenizer)


def run_evaluate(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from loki_dist.core.distributed import agreement, shutdown, world_from_env
    from loki_dist.core.modeling import load_for_inference, load_tokenizer, torch_dtype

    world = world_from_env()
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    with agreement(world):  # every input read and checked on every rank before the model loads
        settings = read_settings(args)
        ds_config = _validate(settings)
    # a hub data set: fetched once, by rank 0, for every rank
    data = hubdata.command_data(settings.data, settings.questions.data_config, settings.output, world)
    with agreement(world):
        tokenizer = load_tokenizer(settings.model, chat_template=settings.chat_template)
        evaluate = task_inputs(dataclasses.replace(settings, data=data), tokenizer)
    dtype = torch_dtype(settings.dtype)
    loaded = load_for_inference(settings.model, world, dtype, ds_config, settings.batch_size)
    with metering.phase("evaluate"):
        result = evaluate(world, loaded)
    result.update(model=str(settings.model), data=str(settings.data), world_size=world.size)
    if world.is_main:
        output = Path(settings.output)
        files.write_json(output, result)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result["scores"].items() if "/" not in k)
        log.info(f"{settings.task}: {shown} -> {output}")
    shutdown()
