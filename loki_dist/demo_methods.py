"""The demo's in-process training: teaching general knowledge, then one task by four methods.

Every method runs through the same loop (AdamW, no weight decay, constant rate, same batch size, same
loss: the mean cross-entropy of the assistant turn, i.e. the answer letter and the end-of-turn tokens,
after DESIGN.md's prompt; `loki-dist train` minimises the same on the same chat data, so the production
path is this loop's twin). Methods differ only in what may move: all weights (full fine-tuning), LoRA
adapters on down_proj, or the selected down_proj rows (LoKI, or the random-rows control). Rows are
trained by zeroing the gradient of every other row; with no weight decay Adam then leaves the others
bit-identical, which the demo checks. Training stops at the target task accuracy or at the step cap, so
methods are compared at equal task skill where they reach it, and the steps each one took are reported.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch

from loki_dist.data import Example, collate, tokenize
from loki_dist.evaluation import letter_logprobs
from loki_dist.mmlu import Question, answered_messages, encode


@dataclass
class Encoded:
    """Questions with their prompt token ids (to score) and answered turns (to train on)."""

    questions: list[Question]
    input_ids: list[list[int]]
    turns: list[Example]

    @classmethod
    def of(cls, tokenizer, questions: list[Question]) -> Encoded:
        turns = [tokenize(tokenizer, answered_messages(q), max_len=1 << 20)[0] for q in questions]
        return cls(questions, [encode(tokenizer, q, []) for q in questions], turns)

    def subset(self, keep: list[int]) -> Encoded:
        return Encoded(*([items[i] for i in keep] for items in (self.questions, self.input_ids, self.turns)))

    def accuracy(self, model, letters: list[int], batch_size: int = 8) -> float:
        was_training = model.training
        model.eval()
        chosen = letter_logprobs(model, self.input_ids, letters, 0, batch_size).argmax(dim=-1)
        model.train(was_training)
        return sum(int(c == q.answer) for c, q in zip(chosen.tolist(), self.questions, strict=True)) / len(
            self.questions
        )

    def subject_accuracy(self, model, letters: list[int]) -> dict[str, float]:
        """Accuracy per subject: each subject is one benchmark of the forgetting score."""
        out = {}
        for subject in dict.fromkeys(q.subject for q in self.questions):
            part = self.subset([i for i, q in enumerate(self.questions) if q.subject == subject])
            out[subject] = part.accuracy(model, letters)
        return out


@dataclass
class Budget:
    lr: float
    max_steps: int
    batch_size: int
    target: float = 1.0  # stop when task accuracy reaches this (checked every eval_every steps)
    eval_every: int = 10


def train_letters(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    data: Encoded,
    letters: list[int],
    budget: Budget,
    seed: int,
    desc: str,
) -> tuple[int, float]:
    """Train `params` on the answered turns of `data`; returns (steps taken, final accuracy on data)."""
    from tqdm import tqdm

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.0)
    order: list[int] = []
    model.train()
    accuracy = data.accuracy(model, letters)
    bar = tqdm(total=budget.max_steps, desc=desc, unit="step", dynamic_ncols=True, leave=True)
    step = 0
    while step < budget.max_steps and accuracy < budget.target:
        if len(order) < budget.batch_size:
            order += rng.sample(range(len(data.questions)), len(data.questions))
        picked, order = order[: budget.batch_size], order[budget.batch_size :]
        loss = model(**collate([data.turns[i] for i in picked], pad_id=0)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % budget.eval_every == 0 or step == budget.max_steps:
            accuracy = data.accuracy(model, letters)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}")
        bar.update(1)
    bar.close()
    model.eval()
    return step, accuracy


# ------------------------------------------------------------------------------------------- methods


@dataclass
class Trained:
    model: torch.nn.Module
    trainable: int
    steps: int
    task_accuracy: float
    seconds: float


def _down_projections(model) -> list[torch.nn.Linear]:
    from loki_dist.adapters import down_projections

    return down_projections(model)


def full_finetune(base, task: Encoded, letters, budget: Budget, seed: int) -> Trained:
    model = copy.deepcopy(base).requires_grad_(True)
    params = list(model.parameters())
    return _timed(model, params, sum(p.numel() for p in params), task, letters, budget, seed, "full FT")


def rows_finetune(base, positions: list[list[int]], task, letters, budget: Budget, seed: int, desc: str):
    """Only the listed down_proj rows move: the gradient of every other row is zeroed by a hook."""
    model = copy.deepcopy(base).requires_grad_(False)
    params, trainable = [], 0
    for layer, projection in enumerate(_down_projections(model)):
        rows = positions[layer]
        if not rows:
            continue
        mask = torch.zeros_like(projection.weight)
        mask[rows] = 1.0
        projection.weight.requires_grad_(True)
        projection.weight.register_hook(lambda grad, mask=mask: grad * mask)
        params.append(projection.weight)
        trainable += len(rows) * projection.weight.shape[1]
    return _timed(model, params, trainable, task, letters, budget, seed, desc)


def lora_finetune(base, rank: int, task, letters, budget: Budget, seed: int) -> Trained:
    """LoRA (peft) on every down_proj, merged back afterwards so the result is a plain model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["down_proj"])
    model = get_peft_model(copy.deepcopy(base), config)
    params = [p for p in model.parameters() if p.requires_grad]
    trained = _timed(
        model, params, sum(p.numel() for p in params), task, letters, budget, seed, f"LoRA r={rank}"
    )
    trained.model = model.merge_and_unload()
    return trained


def lora_rank_for(trainable: int, base) -> int:
    """The LoRA rank on down_proj whose parameter count is closest to `trainable`."""
    per_rank = sum(p.weight.shape[0] + p.weight.shape[1] for p in _down_projections(base))
    return max(1, round(trainable / per_rank))


def _timed(model, params, trainable, task, letters, budget, seed, desc) -> Trained:
    start = time.perf_counter()
    steps, accuracy = train_letters(model, params, task, letters, budget, seed, desc)
    return Trained(model, trainable, steps, accuracy, time.perf_counter() - start)


def frozen_weights_moved(base, tuned, positions: list[list[int]]) -> int:
    """Elements outside the selected down_proj rows that differ from the base (LoKI promises 0)."""
    moved = 0
    selected = {id(p.weight): rows for p, rows in zip(_down_projections(tuned), positions, strict=True)}
    for (_, before), after in zip(base.named_parameters(), tuned.parameters(), strict=True):
        changed = before.detach() != after.detach()
        if id(after) in selected:
            changed[selected[id(after)]] = False
        moved += int(changed.sum())
    return moved
