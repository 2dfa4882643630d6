"""The plan of a `loki-dist train` run: everything settled and checked before any heavy work, and what the
row trainer reads from it (the numbers of a step, the data, the layout, where results go).

The command (implant/train.py) builds it from its flags (train.plan_run) and hands it down; the recipe,
schedule, model, resume and monitor read it. It lives here, below all of them, so that the engine never
imports its command.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from loki_dist.core import distributed, flags
from loki_dist.core.families import ModelSpec
from loki_dist.implant.data.examples import Example
from loki_dist.implant.trainer import runlock


@dataclass
class Inputs:
    """What the forgetting monitor scores (monitor.read_inputs, at planning): this rank's block of each
    evaluation set, tokenised, and a fingerprint of the whole sets."""

    fingerprint: str
    task: list[Example] | None = None
    documents: list[list[int]] | None = None  # perplexity form
    prompts: list[list[int]] | None = None  # multiple-choice form
    answers: list[int] = field(default_factory=list)
    letters: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """Everything validated and settled before any heavy work."""

    args: argparse.Namespace
    spec: ModelSpec
    positions: list[list[int]]
    examples: list[Example]
    micro: int
    accum: int
    bf16: bool
    max_grad_norm: float
    ds_config: dict | None
    out: Path
    resume_from: Path | None
    base_print: str
    data_print: str
    world: distributed.World
    pad_id: int
    log: list[str] = field(default_factory=list)
    lock: runlock.RunLock | None = None  # the output directory's, held by rank 0 (resume.find_resume)
    evals: Inputs | None = None  # this rank's share of --eval-data / --general-data

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world.size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch

    @property
    def total_steps(self) -> int:
        """--max-steps, or the epochs' steps, a fractional last epoch rounded up (as HF's Trainer)."""
        return self.args.max_steps or math.ceil(self.args.epochs * self.steps_per_epoch)

    def every(self, flag_value: int | float) -> int:
        """A steps flag (--save-steps, --logging-steps, --warmup-steps) in steps of this run."""
        return flags.steps_of(flag_value, self.total_steps)
