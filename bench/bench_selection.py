"""The selection study (issues 15, 25, 28): does KVA's choice of rows matter, at equal task skill, at any
learning rate, and is the choice stable?

Every arm implants the same new knowledge into SmolLM2-135M-Instruct (the demo's assets) and the damage
to what the model already knew is measured with measures sensitive enough to see it. If attribution-chosen
rows damage no less than random rows, LoKI's attribution cost buys nothing on this model and task; the
study reports whatever it finds.

Arms (docs/method.md's selections through loki_dist.selection.strategies, the rows trained through the
Python API `loki_dist.implant_rows` / `merge_rows`, the production path of `loki-dist train`'s split
layout):
- KVA layer-balanced lowest (LoKI) at q = 10 and q = 25, by signed score (the paper's rule) and by
  |score| (`select --rule magnitude`, issue 28);
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

Fronts, not points (issue 25.2): every arm runs at each of the four rates of its kind's grid, with every
seed, and every run is measured. A run trains until the held-out accuracy reaches --target (checked every
--eval-every steps) or --cap steps, so a rate too low to learn the task ends below the target and a rate
that learns it stops there rather than training on. The fronts (retention against held-out skill over
the rates, mean ± sd over seeds) and how they are compared: bench/selection_fronts.py. The table at equal
skill keeps, per arm, the rate whose seeds all reach the target in the fewest steps (ties: the lower
rate; if no rate's seeds all reach it, the highest mean skill).

General knowledge, measured on the base once (cached in memory) and on every trained model:
- perplexity of held-out English prose: the worked explanations of MMLU's dev questions (lm-eval's flan
  chain-of-thought files, as the demo), the first of each subject, truncated to --prose-tokens tokens;
- the mean log-probability of the correct letter of MMLU dev questions in docs/method.md's prompt (continuous,
  where a 135M model's accuracy sits at chance): the second question of each subject, the
  --mmlu-questions shortest prompts of those (the third of each subject is attribution's: no overlap);
- a probe set of plain facts written for this study (PROBES: capitals, chemical symbols, authors, ...):
  the ones the base completes correctly, greedily, token for token, are kept, and each model is scored
  by the share of those it still completes correctly.
Attribution runs once per data set (`loki-dist attribute --save-scores`), cached under --cache-dir by a
fingerprint of its inputs: the arms' (the demo's data: the third dev question of each subject, 57), and
the pool, every MMLU dev question no retention measure reads (200), for the stability curve
(bench/selection_stability.py: overlap of the chosen rows against the number of prompts). With
--arms-attribution pool the arms select from the pool instead.

Sizes: 24 people (48 training samples, 48 held-out prompts), batch 16, target 90% held-out accuracy,
checked every 5 steps, cap 60 steps, 4 rates per arm, 3 seeds, 10 arms: 120 runs, each measured. The
single-rate study measured on 2026-11-30 (the 2-core machine): attribution of 57 prompts 128 s on 2 ranks,
setup and the base's measures about 80 s, a rows or LoRA step about 2 s with its evaluations, a full
fine-tuning step about 2.2 s, the measures about 20 s a model (a timing of the pieces on 2026-12-07 agreed,
in CPU seconds). With the steps its sweep took at each rate (rates it stopped early taken to need 30-60
steps), this design comes to about 90 min of training, 36 min of measures and 10 min of attribution (57
and 200 prompts, cached after): 2-2.5 hours alone on that machine. --seeds 2, a lower --cap or fewer
--arms shorten it. Each run is kept in <out>/runs.json as it is measured: the same command again
continues where a sitting stopped. --tiny runs the same code on a tiny model built in code
(tests/test_bench_selection.py runs it in CI).

What it cannot show: one 135M model and one small synthetic task; the answers to "which rows" on an 8B
model and a real task (the paper's setting) may differ. The numbers are whatever the run measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import selection_fronts  # bench/, beside this script (as the two below)
import selection_stability
import torch
from selection_report import comparisons, markdown_sweep
from selection_setup import TINY, Setup, Sizes, real_setup, tiny_setup

from loki_dist.core import files, provenance
from loki_dist.demo.methods import Budget, lora_rank_for, run_once
from loki_dist.demo.report import plot, table_section
from loki_dist.demo.task import (
    HELD_OUT_PHRASINGS,
    TRAIN_PHRASINGS,
    held_out_accuracy,
    keep_known,
)
from loki_dist.selection import strategies

# ------------------------------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # rows, lowrank (LoKI*), lora, full
    strategy: str = ""  # rows, lowrank: layer_balanced, layer_balanced_highest, global_lowest, random
    quota: int = 10
    rule: str = "signed"  # rows: what each prompt ranks (strategies.RULES)
    rank: int = 0  # lowrank: r of W_S0 + A B


ARMS = (
    Arm("LoKI q=10", "rows", "layer_balanced", 10),
    Arm("LoKI q=25", "rows", "layer_balanced", 25),
    Arm("LoKI magnitude q=10", "rows", "layer_balanced", 10, "magnitude"),
    Arm("LoKI magnitude q=25", "rows", "layer_balanced", 25, "magnitude"),
    Arm("KVA highest q=10", "rows", "layer_balanced_highest", 10),
    Arm("random rows q=10", "rows", "random", 10),
    Arm("global lowest q=10", "rows", "global_lowest", 10),
    Arm("LoKI* q=30 r=8", "lowrank", "layer_balanced", 30, rank=8),
    Arm("LoRA down_proj", "lora"),
    Arm("full fine-tuning", "full"),
)
# Learning-rate grids per kind, four half-decades around a common rate for that kind of update (rows:
# LoKI's own range; full: a small model's usual fine-tuning rates; LoRA: peft's usual range; lowrank:
# LoRA's range one half-decade up, since LoKI* has no alpha/r = 2 factor on its update), reaching from a
# rate that learns the task slowly to one past the fastest of the single-rate study.
LR_GRIDS = {
    "rows": (1e-3, 3e-3, 1e-2, 3e-2),
    "lowrank": (1e-3, 3e-3, 1e-2, 3e-2),
    "lora": (3e-4, 1e-3, 3e-3, 1e-2),
    "full": (1e-5, 3e-5, 1e-4, 3e-4),
}


def positions_for(arm: Arm, tensors: dict, seed: int) -> list[list[int]]:
    """The rows of a rows arm, from loki_dist.selection.strategies (the `loki-dist select` code)."""
    return strategies.select(tensors, Fraction(arm.quota), arm.strategy, seed, arm.rule)


# ------------------------------------------------------------------------------------------------ study


# --tiny's rate grids (two per kind: the code path, not a front)
TINY_LRS = {"rows": (3e-2, 1e-1), "lowrank": (3e-2, 1e-1), "lora": (1e-2, 3e-2), "full": (1e-2, 3e-2)}


class RunLog:
    """The runs measured so far, kept in `<out>/runs.json` after each one, so that a study interrupted (or
    spread over several sittings: it takes hours) continues where it stopped. Runs are reused only under
    the same settings (sizes, rate grids, attribution file, threads); each keeps the commit and date it
    was measured at, and the report names every commit its runs come from."""

    def __init__(self, path: Path, settings: dict):
        # the code this process runs is the checkout's when it started (later edits do not reach it)
        self.path, self.settings, self.runs, self.commit = path, settings, {}, provenance.commit()
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") == settings:
                self.runs = saved["runs"]
                print(f"{len(self.runs)} runs reused from {path}", flush=True)
            else:
                print(f"{path} was made under other settings: starting over (it is replaced)", flush=True)

    def get(self, key: str) -> dict | None:
        return self.runs.get(key)

    def add(self, key: str, run: dict) -> None:
        self.runs[key] = {**run, "commit": self.commit, "date": str(datetime.date.today())}
        files.write_json(self.path, {"settings": self.settings, "runs": self.runs})

    def commits(self) -> list[str]:
        return sorted({r["commit"] for r in self.runs.values()})


def run_arm(arm: Arm, setup: Setup, tensors: dict, sizes: Sizes, grid, lora_rank: int, log: RunLog,
            on_run: Callable):  # fmt: skip
    """Every rate of the arm's grid with every seed, each run measured (or taken from the log when an
    earlier sitting measured it); (per rate its runs, chosen rate)."""
    rates = []
    for lr in sorted(grid):
        runs = []
        for seed in range(sizes.seeds):
            key = f"{arm.name} | lr={lr!r} | seed={seed}"
            if log.get(key) is None:
                result, model = one_run(arm, setup, tensors, sizes, lr, seed, lora_rank)
                result.measures = setup.measure(model)
                log.add(key, asdict(result))
                del model
                on_run()
            runs.append(log.get(key))
        rates.append({"lr": lr, "runs": runs})
    return rates, chosen_rate(rates)


def chosen_rate(rates: list[dict]) -> float:
    """The equal-skill table's rate: every seed reaching the target in the fewest mean steps (ties: the
    lower rate); if at no rate every seed reaches it, the highest mean held-out accuracy (ties: lower)."""

    def mean(runs: list[dict], key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    reached = [r for r in rates if all(run["reached"] for run in r["runs"])]
    if reached:
        return min(reached, key=lambda r: (mean(r["runs"], "steps"), r["lr"]))["lr"]
    return min(rates, key=lambda r: (-mean(r["runs"], "held_out_accuracy"), r["lr"]))["lr"]


def one_run(arm, setup: Setup, tensors, sizes: Sizes, lr: float, seed: int, lora_rank: int):
    """One training run of an arm; (its result, the trained model merged into a plain HF model). Every
    tensor of a rows (or lowrank) arm's merged model is compared with the base's, bit for bit, outside
    the rows."""
    task, pad = setup.task, setup.pad_id
    result, model = run_once(
        arm.name, arm.kind, setup.base, task.train, lambda m: held_out_accuracy(m, task, pad),
        Budget(lr, sizes.cap, sizes.target, sizes.batch_size, sizes.eval_every), seed, pad,
        positions=positions_for(arm, tensors, seed) if arm.kind in ("rows", "lowrank") else None,
        lora_rank=arm.rank if arm.kind == "lowrank" else lora_rank,
        train_skill=lambda m: held_out_accuracy(m, task, pad, held_out=False),
    )  # fmt: skip
    print(f"  {result.seconds:.0f} s (cpu {result.cpu_seconds:.0f} s)", flush=True)
    return result, model


# --------------------------------------------------------------------------------------------- report


def markdown(result: dict, command: str, plots: dict[str, str]) -> str:
    """The report; `plots`: the names of the plots drawn ("fronts", "stability")."""
    sizes = result["sizes"]
    lines = [
        "# Selection study: does KVA's choice of rows matter, at equal task skill, at any rate? Is the "
        "choice stable?",
        "",
        provenance.measured(command, result.get("date"), result.get("commit"), result.get("machine"))
        + f" The whole run took {result['total_seconds'] / 60:.1f} min.",
        "",
        f"Model: {result['model']}. Task: toyworld's pets, {sizes['people']} invented people, trained on "
        f"{len(TRAIN_PHRASINGS)} phrasings, skill measured on {len(HELD_OUT_PHRASINGS)} held-out phrasings; "
        f"each run stops at {100 * sizes['target']:.0f}% held-out accuracy (checked every "
        f"{sizes['eval_every']} steps) or {sizes['cap']} steps; batch {sizes['batch_size']}; "
        f"{sizes['seeds']} seeds; every rate of each kind's grid ({_grids(result)}). The arms select from "
        f"{result['arms_attribution']}. How and why: the docstring of `bench/bench_selection.py`.",
        "",
        f"Retention: prose perplexity ({len(result['prose_docs'])} explanations x {sizes['prose_tokens']} "
        f"tokens), MMLU gold log-prob ({sizes['mmlu_questions']} dev questions), facts kept "
        f"({result['probes_kept_by_base']} of {result['probes_written']} probes the base completes "
        "correctly). Mean ± sd over seeds.",
        "",
        *selection_stability.section(result["stability"], plots.get("stability")),
        *selection_fronts.section(result, plots.get("fronts")),
        "## At equal skill: each arm at the rate that reaches the target fastest",
        "",
        *table_section(result, None, "Runs at that rate short of the target"),
        *comparisons(result),
        "",
    ]
    lines += [
        "## What it cannot show",
        "",
        "One 135M model and one small synthetic task (8 clan-to-pet facts asked about invented people): "
        "the paper's claim is about an 8B model and real tasks, where the answer may differ. Three seeds "
        "give a rough spread, not a significance test. Four rates per arm draw a front coarsely: two "
        "fronts that cross between two rates may cross elsewhere.",
        "",
    ]
    return "\n".join(lines)


def _grids(result: dict) -> str:
    return "; ".join(
        f"{kind}: {', '.join(f'{lr:g}' for lr in grid)}" for kind, grid in result["lr_grids"].items()
    )


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
    stability = selection_stability.curve(setup.pool, setup.attribution, sizes.draws)
    tensors, _ = strategies.load_attribution(str(setup.attribution))
    loki_count = sum(map(len, positions_for(ARMS[0], tensors, 0))) * setup.base.config.intermediate_size
    lora_rank = lora_rank_for(loki_count, setup.base)
    arms = [a for a in ARMS if not args.arms or a.name in args.arms]
    grids = {**(TINY_LRS if args.tiny else LR_GRIDS), **{k: tuple(v) for k, v in (args.lrs or {}).items()}}
    threads = torch.get_num_threads()
    settings = {"sizes": asdict(sizes), "lr_grids": {k: list(v) for k, v in grids.items()},
                "attribution": setup.attribution.name, "lora_rank": lora_rank, "threads": threads,
                "tiny": bool(args.tiny)}  # fmt: skip
    log = RunLog(out / "runs.json", settings)
    done = [0]

    def on_run() -> None:
        done[0] += 1
        print(f"--- {done[0]} runs, {time.perf_counter() - started:.0f} s so far", flush=True)

    result_arms = []
    for arm in arms:
        rates, lr = run_arm(arm, setup, tensors, sizes, grids[arm.kind], lora_rank, log, on_run)
        name = f"LoRA down_proj r={lora_rank}" if arm.kind == "lora" else arm.name
        result_arms.append({"name": name, "kind": arm.kind, "strategy": arm.strategy, "quota": arm.quota,
                            "rule": arm.rule, "lr": lr, "rates": rates,
                            "runs": next(r["runs"] for r in rates if r["lr"] == lr)})  # fmt: skip
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
        "arms_attribution": f"the pool ({stability['pool_size']} prompts)"
        if args.arms_attribution == "pool"
        else f"the demo's {stability['arms_prompts']} prompts (the third dev question of each subject)",
        "attribution_seconds": attribution_seconds,  # when each was made (a cached file is reused)
        "stability": stability,
        "arms": result_arms,
        "total_seconds": time.perf_counter() - started,
        # the runs' commits and this sitting's (its base measures and stability curve)
        "commit": ", ".join(dict.fromkeys([*log.commits(), log.commit])),
        "machine": provenance.machine(),
        "threads": threads,
        "date": str(datetime.date.today()),
        "command": "python bench/bench_selection.py " + " ".join(sys.argv[1:]),
    }
    markdown_path = Path(args.markdown) if args.markdown else out / "selection.md"
    files.write_json(markdown_path.with_suffix(".json"), result)
    report(result, markdown_path)
    return result


def report(result: dict, markdown_path: Path) -> None:
    """The plots and the report of a run's results (also re-rendered from its JSON: --report-from)."""
    title, png = f"Selection study ({result['model']})", markdown_path.with_suffix(".png")
    if "rates" not in result["arms"][0]:  # a run from before the fronts (selection_report.py)
        text = markdown_sweep(result, result["command"], png.name if plot(result, png, title) else None)
    else:
        curve, plots = markdown_path.with_name(markdown_path.stem + "_stability.png"), {}
        if selection_fronts.plot(result, png, title):
            plots["fronts"] = png.name
        if selection_stability.plot(result["stability"], curve, title):
            plots["stability"] = curve.name
        text = markdown(result, result["command"], plots)
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
    p.add_argument(
        "--arms-attribution",
        choices=("demo", "pool"),
        default="demo",
        help="the arms select from the demo's 57 prompts or from the stability curve's whole pool",
    )
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
