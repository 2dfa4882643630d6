"""`loki-dist` / `python -m loki_dist`: one sub-command per stage.

Each stage module owns its command line through two functions per command, `add_<command>_arguments`
and `run_<command>`; this file only routes to them. Stage modules keep their heavy imports (DeepSpeed,
transformers) inside functions so that building the parser stays fast. A UserError becomes one line on
stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from loki_dist import __version__
from loki_dist.errors import UserError

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "attribute": ("loki_dist.attribution", "score every down_proj row on general-knowledge prompts (KVA)"),
    "select": ("loki_dist.selection", "choose the rows to train from an attribution file"),
    "train": ("loki_dist.training", "implant: train only the selected down_proj rows"),
    "export": ("loki_dist.export", "turn a training checkpoint into a Hugging Face model and an implant"),
    "apply": ("loki_dist.export", "merge an implant file into its base model"),
    "evaluate": (
        "loki_dist.evaluation",
        "multiple-choice accuracy (MMLU layout) or perplexity, data-parallel",
    ),
    "forgetting": ("loki_dist.forgetting", "the paper's forgetting score of tuned models against the base"),
    "pipeline": (
        "loki_dist.pipeline",
        "attribute -> select -> train from one YAML file, skipping current stages",
    ),
    "estimate-memory": (
        "loki_dist.memory",
        "per-GPU memory of LoKI, full fine-tuning and LoRA for a model, cluster size and ZeRO stage",
    ),
    "demo": (
        "loki_dist.demo",
        "the whole job offline, on SmolLM2-135M when installed or a built-in tiny model",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loki-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"loki_dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        function_name = name.replace("-", "_")
        getattr(module, f"add_{function_name}_arguments")(command)
        command.set_defaults(_run=getattr(module, f"run_{function_name}"))
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args._run(args)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake; say it once
            print(f"loki-dist {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
