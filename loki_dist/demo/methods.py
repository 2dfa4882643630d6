"""The in-process training of the demo and the selection study: one loop, four kinds of update.

Every run goes through `train_until`: AdamW with no weight decay (so rows that do not train stay
bit-identical, which both check), a constant rate, no clipping, the same batches in the same seeded order,
and the same loss (the mean cross-entropy of the labelled tokens, as `loki-dist train`'s). Methods differ
only in what may move (`build_trainable`): the selected down_proj rows through the Python API
(`implant_rows` / `merge_rows`, the split layout `loki-dist train` uses), LoKI*'s low-rank update of
those rows (`implant_rows(..., rank=R)`, as `loki-dist train --lora-rank R`), all weights, or LoRA
adapters on down_proj (peft), merged back so that every result is a plain model. A run stops at a target skill
(checked every `eval_every` steps) or its step cap, so methods are compared at equal skill where they
reach it, and the steps each took are reported.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from loki_dist.implant.data.examples import IGNORE_INDEX, Example, collate

KINDS = ("rows", "lowrank", "full", "lora")  # lowrank: LoKI*, W_S0 + A B in the rows


@dataclass
class Budget:
    lr: float
    cap: int  # step cap
    target: float  # the skill that ends a run
    batch_size: int
    eval_every: int
    give_up_after: int | None = None  # a sweep run that cannot beat the best so far stops here


@dataclass
class RunResult:
    arm: str
    seed: int
    lr: float
    steps: int
    reached: bool
    stopped: str  # target, cap, beaten (a sweep run that could no longer win) or diverged
    held_out_accuracy: float
    train_accuracy: float
    seconds: float
    cpu_seconds: float
    trainable: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, skill)
    frozen_moved: int | None = None  # rows, lowrank: elements outside the rows that differ from the base
    measures: dict | None = None


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens (what `model(**batch).loss` is), with logits computed only
    at the positions that predict a labelled token in some row: the [B, T, vocab] logits and their
    gradient are most of a step's cost on short answers, and most positions need neither."""
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX
    )


def train_until(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    examples: list[Example],
    skill: Callable[[], float],
    budget: Budget,
    seed: int,
    pad_id: int,
    label: str,
) -> tuple[int, str, float, list[tuple[int, float]]]:
    """Train `params` on `examples` until `skill()` reaches the target (checked at step 0 and every
    eval_every steps), the cap, or give_up_after; returns (steps, why it stopped, skill, curve)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.0)
    limit = min(budget.cap, budget.give_up_after or budget.cap)
    order: list[int] = []
    step, curve = 0, []
    bar = tqdm(total=limit, desc=label, unit="step", dynamic_ncols=True, leave=False)
    model.train()
    while True:
        if step % budget.eval_every == 0 or step == limit:
            accuracy = skill()
            curve.append((step, accuracy))
            bar.set_postfix(skill=f"{accuracy:.2f}")
            if accuracy >= budget.target:
                stopped = "target"
                break
            if step >= limit:
                stopped = "cap" if step >= budget.cap else "beaten"
                break
        if len(order) < budget.batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        picked, order = order[: budget.batch_size], order[budget.batch_size :]
        loss = answer_loss(model, collate([examples[i] for i in picked], pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        if not math.isfinite(loss.item()):
            stopped, accuracy = "diverged", skill()
            curve.append((step, accuracy))
            break
    bar.close()
    model.eval()
    print(f"{label}: {stopped} after {step} steps, skill {100 * accuracy:.1f}%", flush=True)
    return step, stopped, accuracy, curve


def build_trainable(kind: str, base, positions: list[list[int]] | None, lora_rank: int, seed: int):
    """(a copy of `base` to train, its trainable parameters, finish): `finish` returns the plain model.
    `lora_rank`: LoRA's rank, or LoKI*'s (lowrank, whose B is drawn from `seed`)."""
    import loki_dist

    model = copy.deepcopy(base)
    if kind in ("rows", "lowrank"):
        loki_dist.implant_rows(model, positions, rank=lora_rank if kind == "lowrank" else 0, seed=seed)
        return model, [p for p in model.parameters() if p.requires_grad], loki_dist.merge_rows
    if kind == "full":
        model.requires_grad_(True)
        return model, list(model.parameters()), lambda m: m.requires_grad_(False)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' initialisation
    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=["down_proj"])
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad], lambda m: m.merge_and_unload()


def run_once(
    name: str, kind: str, base, examples, skill: Callable, budget: Budget, seed: int, pad_id: int, **how
) -> tuple[RunResult, torch.nn.Module]:
    """One run of one method; (its result, the trained model as a plain HF model). `how`: `positions`
    (rows, lowrank) and `lora_rank` (LoRA, lowrank); `train_skill(model)` when the result should say the
    training split's."""
    positions = how.get("positions")
    model, params, finish = build_trainable(kind, base, positions, how.get("lora_rank", 0), seed)
    wall, cpu = time.perf_counter(), time.process_time()
    label = f"{name} lr={budget.lr:g} seed={seed}"
    steps, stopped, accuracy, curve = train_until(
        model, params, examples, lambda: skill(model), budget, seed, pad_id, label
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainable = sum(p.numel() for p in params)
    model = finish(model)
    moved = frozen_weights_moved(base, model, positions) if positions is not None else None
    train_skill = how["train_skill"](model) if "train_skill" in how else float("nan")
    result = RunResult(name, seed, budget.lr, steps, stopped == "target", stopped, accuracy, train_skill,
                       wall, cpu, trainable, curve, moved)  # fmt: skip
    return result, model


def lora_rank_for(trainable: int, base) -> int:
    """The LoRA rank on down_proj whose parameter count is closest to `trainable`."""
    from loki_dist.core.families import down_projections

    per_rank = sum(p.weight.shape[0] + p.weight.shape[1] for p in down_projections(base))
    return max(1, round(trainable / per_rank))


def frozen_weights_moved(base, tuned, positions: list[list[int]]) -> int:
    """Elements outside the selected down_proj rows that differ from the base (LoKI promises 0)."""
    from loki_dist.core.families import down_projections

    moved = 0
    selected = {id(p.weight): rows for p, rows in zip(down_projections(tuned), positions, strict=True)}
    for (_, before), after in zip(base.named_parameters(), tuned.parameters(), strict=True):
        changed = before.detach() != after.detach()
        if id(after) in selected:
            changed[selected[id(after)]] = False
        moved += int(changed.sum())
    return moved
