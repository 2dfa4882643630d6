"""`loki-dist demo`: the whole LoKI job, offline, on a built-in tiny model and made-up data.

It writes a tiny Llama and its tokenizer, a general-knowledge set in the MMLU layout and a new task in
alpaca form, then runs the real stages one after another, each as its own `loki-dist` process (under
torchrun when --nproc > 1), exactly as a user would: attribute -> select -> train (DeepSpeed ZeRO-3) ->
apply. At the end it checks the promise LoKI makes (every weight outside the selected rows is the base
model's, bit for bit) and reports the task loss before and after.

What it does not show: whether attribution keeps more general knowledge than other choices of rows.
A random tiny model has no knowledge to keep; that comparison needs a model that knows something.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

from loki_dist.errors import UserError
from loki_dist.pipeline import run_stage

_NAMES = ["Zorvan", "Telmira", "Quessa", "Baldric", "Onyxa", "Prenn", "Valto", "Ismere", "Kadrun", "Liora"]
_THINGS = {"colour": ["red", "blue", "green", "amber"], "home": ["Esk", "Mardo", "Ultha", "Brin"],
           "trade": ["smith", "baker", "scribe", "pilot"]}  # fmt: skip


def general_knowledge(seed: int) -> list[dict]:
    """Four-way multiple-choice questions about invented people, in the MMLU layout."""
    rng = random.Random(seed)
    rows = []
    for name in _NAMES:
        for relation, options in _THINGS.items():
            answer = rng.randrange(4)
            rows.append({"subject": f"invented_{relation}s", "question": f"What is the {relation} of {name}?",
                         "choices": list(options), "answer": answer})  # fmt: skip
    return rows


def new_task(seed: int, n: int = 64) -> list[dict]:
    """A task the base model cannot do: spell a number's digits backwards."""
    rng = random.Random(seed + 1)
    rows = []
    for _ in range(n):
        number = str(rng.randint(100, 99999))
        rows.append({"instruction": f"Reverse the digits of {number}.", "input": "", "output": number[::-1]})
    return rows


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="loki_demo", help="where the demo writes everything")
    p.add_argument("--nproc", type=int, default=min(2, os.cpu_count() or 1), help="ranks per stage")
    p.add_argument("--quota", type=float, default=25.0, help="percent of rows per layer to train")
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --output-dir")


def run_demo(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    from loki_dist.tiny import save_tiny

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--output-dir {out}: already exists and is not empty (pass --overwrite)")
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: expected at least 1")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = save_tiny(
        out / "base", "llama", seed=args.seed, num_layers=4, hidden_size=64, intermediate_size=172
    )
    (out / "general.json").write_text(json.dumps(general_knowledge(args.seed)))
    (out / "task.json").write_text(json.dumps(new_task(args.seed)))
    print(f"built-in tiny Llama (4 layers, hidden 64, intermediate 172) and data in {out}", flush=True)

    attribution, positions_file, run = out / "attribution.safetensors", out / "positions.json", out / "run"
    stages = {
        "attribute": (args.nproc, ["attribute", "--model", base, "--data", out / "general.json",
                                   "--output", attribution, "--per-subject", 10]),
        "select": (1, ["select", "--attribution", attribution, "--quota", f"{args.quota:g}",
                       "--output", positions_file]),
        "train": (args.nproc, ["train", "--model", base, "--positions", positions_file, "--data",
                               out / "task.json", "--output-dir", run, "--max-steps", args.steps,
                               "--learning-rate", 1e-2, "--warmup-ratio", 0.1, "--micro-batch-size", 4,
                               "--gradient-accumulation", max(1, 2 // args.nproc), "--logging-steps", 10,
                               "--save-steps", 20]),
        "apply": (1, ["apply", "--base", base, "--implant", run / "final" / "implant.safetensors",
                      "--output", out / "merged"]),
    }  # fmt: skip
    times = {name: run_stage(name, [str(a) for a in argv], nproc) for name, (nproc, argv) in stages.items()}

    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(out / "merged" / "model.safetensors"))
    positions = json.loads(positions_file.read_text())
    moved_elsewhere, rows_trained = 0, 0
    for name, tensor in before.items():
        changed = tensor != after[name]
        if ".mlp.down_proj." in name:
            selected = torch.zeros(tensor.shape[0], dtype=torch.bool)
            selected[positions[int(name.split(".")[2])]] = True
            moved_elsewhere += int(changed[~selected].sum())
            rows_trained += int(selected.sum())
        else:
            moved_elsewhere += int(changed.sum())
    total = sum(t.numel() for t in before.values())
    trainable = rows_trained * 172
    summary = json.loads((run / "train_summary.json").read_text())
    print("\n=== summary")
    print(f"trainable parameters: {trainable} of {total} ({100 * trainable / total:.2f}%), "
          f"{rows_trained} down_proj rows at quota {args.quota:g}%")  # fmt: skip
    print(f"weights outside the selected rows that changed: {moved_elsewhere} (LoKI promises 0)")
    print(
        f"task loss on the first batch: {summary['probe_loss_at_start']:.4f} before training, "
        f"{summary['probe_loss']:.4f} after"
    )
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    print(f"merged model (loads with AutoModelForCausalLM.from_pretrained): {out / 'merged'}")
    if moved_elsewhere:
        raise UserError("frozen weights moved: this is a bug, please report it")
