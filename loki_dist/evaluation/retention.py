"""`evaluate --task completion` (plain facts) and `--task retention` (a folder of retention probes).

LoKI's promise is read on what a model knew before: after an implant, a user wants to check that in
one command per model, offline, on probes that attribution never saw. The demo writes such a folder
(demo/task.py: write_retention), and anyone can write their own:

- `prose.jsonl`: rows `{"text": ...}`, held-out text -> perplexity (`prose_perplexity`, lower is better);
- `questions.json`: MMLU-layout questions -> accuracy in percent (`questions`), with the prompt that
  attribution and `--task multiple_choice` use;
- `facts.jsonl`: rows `{"prompt": ..., "answer": ...}`, plain text the model should complete ->
  the share completed exactly, in percent (`facts`).

`--task retention --data FOLDER` scores whichever of the three the folder holds, with one model load,
into one results file whose `scores` `loki-dist forgetting` compares; `--task completion --data FILE`
scores a facts file alone. The same files serve `train --general-data` (prose.jsonl, questions.json).

A fact is completed exactly when, after the prompt (tokenised as text, with the tokenizer's special
tokens), every token of the answer (tokenised alone, none added) is the model's most likely next token,
teacher-forced: what greedy decoding would write for the answer's length. Plain text, no chat template:
a fact is what the model completes, not what it is asked. Data-parallel as the other tasks: each rank
scores its block, the per-fact results are gathered in data order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from loki_dist.core.errors import UserError
from loki_dist.core.sharding import block_sizes, my_block
from loki_dist.evaluation.settings import EvaluateSettings

# file in the folder -> (the task that scores it, its name in `scores`)
FILES = {
    "prose.jsonl": ("perplexity", "prose_perplexity"),
    "questions.json": ("multiple_choice", "questions"),
    "facts.jsonl": ("completion", "facts"),
}
FACT = ("prompt", "answer")


@torch.no_grad()
def completion_results(
    model: Callable,
    probes: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    lockstep: bool = False,
) -> tuple[list[bool], list[float]]:
    """Per (prompt ids, answer ids): completed exactly (see the top), and the answer's log-probability.
    One teacher-forced forward per batch, right-padded. lockstep: ZeRO-3, as scoring.model_batches."""
    from loki_dist.evaluation.scoring import model_batches
    from loki_dist.implant.data.examples import IGNORE_INDEX, Example, collate

    device = next(model.parameters()).device
    correct, logprob = [], []
    for chunk in model_batches(model, list(probes), batch_size, lockstep):
        batch = collate([Example(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in chunk], pad_id)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        hits = (logp.argmax(-1) == targets) | ~mask
        correct += hits.all(dim=1).tolist()
        logprob += (picked * mask).sum(dim=1).tolist()
    return correct, logprob


def tokenize_facts(tokenizer, facts: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each (prompt, answer) text, as completion_results reads them."""
    return [
        (list(tokenizer(p)["input_ids"]), list(tokenizer(a, add_special_tokens=False)["input_ids"]))
        for p, a in facts
    ]


def read_facts(source: str) -> list[tuple[str, str]]:
    """(prompt, answer) of each row of a JSON or JSONL file of `{"prompt": str, "answer": str}`."""
    from loki_dist.implant.data.rows import read_rows

    rows = read_rows(source)
    for index, row in enumerate(rows):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) and row[k] for k in FACT)):
            raise UserError(f"--data {source}: row {index} is not a fact: expected a prompt and an answer")
    if not rows:
        raise UserError(f"--data {source}: no facts")
    return [(row["prompt"], row["answer"]) for row in rows]


def completion_inputs(settings: EvaluateSettings, tokenizer) -> Callable:
    """Read and tokenise the facts before the model loads; returns the scorer."""
    from loki_dist.core.collectives import all_gather_varlen

    facts = read_facts(settings.data)
    probes = tokenize_facts(tokenizer, facts)
    name = settings.name or "facts"

    def evaluate(world, loaded) -> dict:
        mine = [probes[i] for i in my_block(len(probes), world)]
        pad = loaded.model.config.pad_token_id or 0
        correct, logprob = completion_results(loaded.model, mine, pad, settings.batch_size, loaded.sharded)
        local = torch.tensor([correct, logprob], dtype=torch.float64).T.reshape(-1)  # [hit, logprob] each
        sizes = [2 * n for n in block_sizes(len(probes), world.size)]
        every = all_gather_varlen(local, sizes).cpu().reshape(-1, 2)
        completed = int(every[:, 0].sum())
        return {
            "task": "completion",
            "completed": completed,
            "total": len(probes),
            "answer_logprob": every[:, 1].tolist(),
            "predictions": [bool(c) for c in every[:, 0].tolist()],
            "scores": {name: 100 * completed / len(probes)},
            "lower_is_better": [],
        }

    return evaluate


def retention_inputs(settings: EvaluateSettings, tokenizer, scorers: dict[str, Callable]) -> Callable:
    """Every probe file of the --data folder read before the model loads (`scorers`: each task's input
    reader, evaluate's own); returns one scorer that runs them all on the loaded model."""
    folder = Path(settings.data)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: --task retention reads a folder of {', '.join(FILES)}")
    found = [name for name in FILES if (folder / name).is_file()]
    if not found:
        raise UserError(f"--data {folder}: holds none of {', '.join(FILES)}")
    parts = {}
    for file in found:
        task, name = FILES[file]
        part = dataclasses.replace(settings, data=str(folder / file), task=task, name=name)
        parts[file] = scorers[task](part, tokenizer)

    def evaluate(world, loaded) -> dict:
        results = {file: scorer(world, loaded) for file, scorer in parts.items()}
        scores = {name: value for result in results.values() for name, value in result["scores"].items()}
        lower = [name for result in results.values() for name in result["lower_is_better"]]
        return {"task": "retention", "parts": results, "scores": scores, "lower_is_better": lower}

    return evaluate
