"""The suppression check (the paper's Table 5a) on SmolLM2-135M: does attribution find the rows that matter?

    python bench/bench_suppression.py --markdown bench/suppression.md     # --tiny: the code path in seconds

In every layer the q% rows most often ranked lowest (S-L) or highest (S-H) by the attribution are zeroed,
by signed score (the paper's rule, `select`'s default) and by |score| (`--rule magnitude`, issue 28), at
q = 1 and 5, beside as many random rows (3 draws); each copy is made by the production command
(`loki-dist suppress`) and measured with the selection study's retention measures (selection_setup.py:
prose perplexity, MMLU gold-letter log-probability, the share of the known facts kept). The attribution is
the study's (`attribute --save-scores` on the demo's 57 general prompts, cached under --cache-dir).

If attribution finds what matters, zeroing the rows it ranks most important costs far more than zeroing
random rows, and those it ranks least important cost less. What it cannot show: one 135M model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from selection_setup import TINY, Sizes, real_setup, tiny_setup  # noqa: E402

QUOTAS = (1, 5)
TINY_QUOTAS = (10, 25)  # the tiny model's 40 rows a layer: q = 1 selects none
DRAWS = 3
# (label, --which, --rule)
ARMS = (
    ("lowest signed score (LoKI's rule)", "lowest", "signed"),
    ("highest signed score", "highest", "signed"),
    ("lowest magnitude (absolute score)", "lowest", "magnitude"),
    ("highest magnitude (absolute score)", "highest", "magnitude"),
)
MEASURES = (("prose_perplexity", "prose ppl", "{:.4g}"), ("mmlu_gold_logprob", "gold", "{:.2f}"),
            ("probes_kept", "facts kept", "{:.0%}"))  # fmt: skip


def suppressed(setup, out: Path, quota: int, which: str, rule: str, seed: int = 0) -> dict:
    """`loki-dist suppress` of the base, then the copy's retention measures."""
    from transformers import AutoModelForCausalLM

    from loki_dist.pipeline.run import run_stage

    argv = ["suppress", "--model", str(setup.base_dir), "--output", str(out), "--quota", str(quota),
            "--which", which, "--rule", rule, "--seed", str(seed), "--overwrite"]  # fmt: skip
    if which != "random":
        argv += ["--attribution", str(setup.attribution)]
    run_stage("suppress", argv)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).requires_grad_(False).eval()
    return setup.measure(model)


def run(args) -> dict:
    sizes = TINY if args.tiny else Sizes()
    setup, _ = tiny_setup(args, sizes) if args.tiny else real_setup(args, sizes)
    work = Path(args.out)
    results = {"base": setup.measure(setup.base), "quotas": {}}
    for quota in args.quotas or (TINY_QUOTAS if args.tiny else QUOTAS):
        rows = {label: suppressed(setup, work / "copy", quota, which, rule) for label, which, rule in ARMS}
        rows["random rows"] = [
            suppressed(setup, work / "copy", quota, "random", "signed", seed) for seed in range(DRAWS)
        ]
        results["quotas"][str(quota)] = rows
        print(f"q={quota} done", flush=True)
    return results


def _cells(measures: dict) -> str:
    return " / ".join(fmt.format(measures[key]) for key, _, fmt in MEASURES)


def markdown(results: dict, command: str, stamp: str) -> str:
    quotas = list(results["quotas"])
    heading = " / ".join(name for _, name, _ in MEASURES)
    lines = ["# Suppression: zeroing the rows attribution ranks, against random rows", "", stamp, "",
             f"Command: `{command}`. Each cell: {heading} after zeroing, in every layer, the rows named "
             "(the base first; random rows: each of 3 draws).", "",
             "| rows zeroed per layer | " + " | ".join(f"q={q}" for q in quotas) + " |",
             "|---|" + "---|" * len(quotas),
             f"| none (base) | {_cells(results['base'])} |" + " |" * (len(quotas) - 1)]  # fmt: skip
    for label, _, _ in ARMS:
        cells = [_cells(results["quotas"][q][label]) for q in quotas]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    draws = [", ".join(_cells(d) for d in results["quotas"][q]["random rows"]) for q in quotas]
    lines.append(f"| random rows ({DRAWS} draws) | " + " | ".join(draws) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from loki_dist.core import files, provenance

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="working folder (default: a temporary one)")
    p.add_argument("--markdown", help="the report to write; its .json goes beside it")
    p.add_argument(
        "--cache-dir", default=str(Path.home() / ".cache" / "loki_dist"), help="as bench_selection"
    )
    p.add_argument("--tiny", action="store_true", help="a tiny model built in code: the code path in seconds")
    p.add_argument("--quotas", type=int, nargs="+", help=f"percent of rows zeroed (default {QUOTAS})")
    args = p.parse_args(argv)
    args.out = args.out or tempfile.mkdtemp(prefix="loki_suppression_")
    args.arms_attribution = "arms"
    results = run(args)
    command = "python bench/bench_suppression.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, command, provenance.measured(command))
    print(text)
    target = Path(args.markdown) if args.markdown else Path(args.out) / "suppression.md"
    files.write_text(target, text)
    files.write_json(target.with_suffix(".json"), results)


if __name__ == "__main__":
    main()
