"""`loki-dist demo`: LoKI's trade-off, offline, on a tiny model that first learns some "general knowledge".

1. Build a tiny Llama and a tokenizer in code; teach it the toy world of toyworld.py (clans, homes,
   trades, colours, asked as four-way questions with DESIGN.md's prompt) until it answers most of it.
2. Run the real stages on it, each as its own `loki-dist` process (under torchrun when --nproc > 1):
   `attribute` on the general set, `select --quota Q` (layer-balanced) and `select --strategy random`.
3. Implant a new task (every person's pet) four ways through one training loop (demo_methods.py):
   LoKI rows, random rows (the control), full fine-tuning, LoRA of about LoKI's trainable size (peft,
   optional). Each trains until the target task accuracy or the step cap.
4. Print and save a table (task accuracy, general accuracy, forgetting score over the general subjects,
   trainable parameters, steps, wall time) as JSON, and a trade-off plot (matplotlib, optional); check
   that LoKI moved no weight outside its rows.

What it cannot show: a tiny model's memorised toy facts are not Llama-3.1-8B's knowledge; the numbers are
whatever this run measures, with fixed seeds, and say nothing about any real model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from loki_dist.errors import UserError, require_at_least
from loki_dist.pipeline import run_stage

# Per method, the better of two rates tried on the default toy world, judged by forgetting at 90% task
# accuracy (rows: 1e-2 and 2e-3 forgot the same, 1e-2 in 4x fewer steps; full: 1e-3 -> 58%, 2e-4 -> 40%;
# LoRA: 1e-2 -> 75%, 2e-3 -> 73%). A tiny sweep, not a tuning: README says so.
LEARNING_RATES = {"teach": 3e-3, "rows": 1e-2, "full": 2e-4, "lora": 2e-3}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="loki_demo", help="where the demo writes everything")
    p.add_argument("--nproc", type=int, default=min(2, os.cpu_count() or 1), help="ranks of attribute")
    p.add_argument("--quota", type=float, default=25.0, help="percent of down_proj rows per layer to train")
    p.add_argument(
        "--people", type=int, default=60, help="invented people (3 general facts and 1 task fact each)"
    )
    p.add_argument("--hidden-size", type=int, default=64, help="model width (4 layers, 4 heads)")
    p.add_argument(
        "--teach-steps", type=int, default=1500, help="step cap for teaching the general knowledge"
    )
    p.add_argument("--task-steps", type=int, default=300, help="step cap of each method on the new task")
    p.add_argument("--target", type=float, default=0.9, help="task accuracy at which a method stops")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --output-dir")


def _validate(args: argparse.Namespace) -> Path:
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--output-dir {out}: already exists and is not empty (pass --overwrite)")
    require_at_least(("--nproc", args.nproc, 1), ("--people", args.people, 4),
                     ("--teach-steps", args.teach_steps, 0), ("--task-steps", args.task_steps, 1),
                     ("--batch-size", args.batch_size, 1))  # fmt: skip
    if args.hidden_size < 8 or args.hidden_size % 4:
        raise UserError(f"--hidden-size {args.hidden_size}: expected a multiple of 4, at least 8")
    if not 0 < args.quota <= 100:
        raise UserError(f"--quota {args.quota:g}: must be in (0, 100]")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _teach_base(args, out: Path, world):
    """The tiny model, taught the general knowledge, saved as a Hugging Face directory."""
    from loki_dist.demo_methods import Budget, Encoded, train_letters
    from loki_dist.evaluation import letter_token_ids
    from loki_dist.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(vocab_size=1024, corpus=world.corpus())
    model = build_model(
        "llama", seed=args.seed, vocab_size=1024, num_layers=4, hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4, num_heads=4, num_kv_heads=2,
    )  # fmt: skip
    general, task = (Encoded.of(tokenizer, qs) for qs in (world.general, world.task))
    letters = letter_token_ids(tokenizer)
    budget = Budget(LEARNING_RATES["teach"], args.teach_steps, args.batch_size, target=0.98, eval_every=25)
    model.requires_grad_(True)
    started = time.perf_counter()
    steps, accuracy = train_letters(
        model, list(model.parameters()), general, letters, budget, args.seed, "teach"
    )
    model.requires_grad_(False)
    print(f"taught the general knowledge: {100 * accuracy:.1f}% after {steps} steps "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    model.save_pretrained(out / "base", safe_serialization=True)
    tokenizer.save_pretrained(out / "base")
    return model, general, task, letters


def _select_rows(args, out: Path, base_dir: Path) -> tuple[dict[str, list[list[int]]], dict[str, float]]:
    """The real stages: attribute on the general set, then layer-balanced and random selection."""
    attribution = out / "attribution.safetensors"
    files = {"LoKI": out / "positions.json", "random rows": out / "positions_random.json"}
    stages = {
        "attribute": (args.nproc, ["attribute", "--model", base_dir, "--data", out / "general.json",
                                   "--output", attribution, "--per-subject", args.people]),
        "select": (1, ["select", "--attribution", attribution, "--quota", f"{args.quota:g}",
                       "--output", files["LoKI"]]),
        "select random": (1, ["select", "--attribution", attribution, "--quota", f"{args.quota:g}",
                              "--strategy", "random", "--seed", args.seed, "--output", files["random rows"]]),
    }  # fmt: skip
    times = {name: run_stage(name, [str(a) for a in argv], nproc) for name, (nproc, argv) in stages.items()}
    return {label: json.loads(path.read_text()) for label, path in files.items()}, times


def _methods(args, base, positions, task, letters):
    """Each method's trained model: LoKI rows, random rows, full fine-tuning, LoRA (if peft is there)."""
    from loki_dist import demo_methods as m

    def budget(kind: str) -> m.Budget:
        return m.Budget(LEARNING_RATES[kind], args.task_steps, args.batch_size, target=args.target)

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


def _implant_with_trainer(args, out: Path, world, trained, task, letters):
    """The LoKI rows once more, through the real distributed trainer: `loki-dist train` (DeepSpeed
    ZeRO-3, split rows, --nproc ranks) on the task as chat data, then `loki-dist apply`, for as many steps
    as the in-process LoKI run took, with the same rate, batch and loss (constant rate, no clipping). The
    two differ in the order of samples only, so their rows should agree closely; a standard HF directory
    comes out.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from loki_dist.demo_methods import Trained
    from loki_dist.mmlu import answered_messages

    chat = [{"messages": answered_messages(q)} for q in world.task]
    (out / "task_chat.json").write_text(json.dumps(chat))
    run, merged = out / "implant", out / "merged"
    train = {
        "--model": out / "base", "--positions": out / "positions.json", "--data": out / "task_chat.json",
        "--output-dir": run, "--max-steps": max(1, trained["LoKI"].steps), "--warmup-ratio": 0,
        "--lr-scheduler": "constant", "--max-grad-norm": 0, "--seed": args.seed,
        "--learning-rate": LEARNING_RATES["rows"], "--save-steps": 0, "--logging-steps": 25,
        "--micro-batch-size": max(1, min(args.batch_size, len(chat)) // args.nproc),
    }  # fmt: skip
    apply = {"--base": out / "base", "--implant": run / "final" / "implant.safetensors", "--output": merged}
    started = time.perf_counter()
    run_stage("train", ["train", *[str(x) for pair in train.items() for x in pair]], args.nproc)
    run_stage("apply", ["apply", *[str(x) for pair in apply.items() for x in pair]], 1)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    steps = json.loads((run / "train_summary.json").read_text())["steps"]
    seconds = time.perf_counter() - started
    return Trained(model, trained["LoKI"].trainable, steps, task.accuracy(model, letters), seconds)


def _table(base, general, task, letters, trained) -> list[dict]:
    """One row per model; "general kept" is its general accuracy as a share of the base model's."""
    from loki_dist.demo_methods import Trained
    from loki_dist.forgetting import Scores, forgetting_score

    base_subjects = general.subject_accuracy(base, letters)
    base_general = general.accuracy(base, letters)
    rows = []
    for label, result in {"base (taught)": Trained(base, 0, 0, 0.0, 0.0), **trained}.items():
        subjects = general.subject_accuracy(result.model, letters)
        general_accuracy = general.accuracy(result.model, letters)
        rows.append({
            "method": label,
            "task_accuracy": task.accuracy(result.model, letters),
            "general_accuracy": general_accuracy,
            "general_kept": general_accuracy / base_general,
            "forgetting": forgetting_score(
                Scores(base_subjects, frozenset()), Scores(subjects, frozenset()), list(base_subjects)
            ),
            "general_by_subject": subjects,
            "trainable_params": result.trainable,
            "steps": result.steps,
            "seconds": result.seconds,
        })  # fmt: skip
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


def plot_trade_off(rows: list[dict], path: Path) -> bool:
    """Task accuracy against forgetting, one point per method; False (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'loki-dist[plot]')", flush=True)
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        x, y = row["forgetting"], 100 * row["task_accuracy"]
        ax.scatter([x], [y], s=40)
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("forgetting score over the general subjects (%, lower is better)")
    ax.set_ylabel("new-task accuracy (%)")
    ax.set_title("LoKI demo: learning the task vs forgetting the rest")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(args: argparse.Namespace) -> None:
    import torch

    from loki_dist.demo_methods import frozen_weights_moved
    from loki_dist.toyworld import ToyWorld, build_world

    out = _validate(args)
    # One thread: at this size a step is a few milliseconds of work, and a second OpenMP thread spinning
    # on a shared 2-core machine made steps 10x slower (measured), not faster.
    torch.set_num_threads(1)
    started = time.perf_counter()
    world = build_world(args.people, args.seed)
    (out / "general.json").write_text(json.dumps(ToyWorld.rows(world.general)))
    (out / "task.json").write_text(json.dumps(ToyWorld.rows(world.task)))
    print(f"toy world: {len(world.general)} general questions, {len(world.task)} task questions, in {out}")
    print(f"=== teach: a 4-layer Llama (hidden {args.hidden_size}) learns the general knowledge", flush=True)
    base, general, task, letters = _teach_base(args, out, world)
    positions, stage_times = _select_rows(args, out, out / "base")
    print("\n=== implant the new task (every person's pet) four ways", flush=True)
    trained = _methods(args, base, positions, task, letters)
    label = "LoKI via loki-dist train"
    print(f"\n=== {label}: DeepSpeed ZeRO-3 on {args.nproc} rank(s), then apply", flush=True)
    trained[label] = _implant_with_trainer(args, out, world, trained, task, letters)
    positions[label] = positions["LoKI"]
    for label in ("LoKI", "random rows", "LoKI via loki-dist train"):
        moved = frozen_weights_moved(base, trained[label].model, positions[label])
        print(f"{label}: weights outside the selected rows that changed: {moved} (LoKI promises 0)")
        if moved:
            raise UserError("frozen weights moved: this is a bug, please report it")
    rows = _table(base, general, task, letters, trained)
    print("\n=== summary (forgetting: the paper's Avg over the general subjects; lower is better)")
    print(format_rows(rows))
    result = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "learning_rates": LEARNING_RATES, "stage_seconds": stage_times, "rows": rows,
              "total_seconds": time.perf_counter() - started}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plotted = plot_trade_off(rows, out / "trade_off.png")
    print(f"table: {out / 'results.json'}" + (f", plot: {out / 'trade_off.png'}" if plotted else ""))
    print(f"total wall time: {result['total_seconds']:.0f} s")
