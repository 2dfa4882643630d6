"""The settings of one `loki-dist attribute` run: typed, checked once, the single source of what it does.

The command (attribute.py) reads its flags once, at its boundary, into an AttributeSettings, and hands
that, or the values it needs, to what runs: the scoring loop, the chunk planner and the writer of the
file (output.py). None of them sees the parsed command line, so what each depends on is in its
signature, and a test can run any of them on settings it builds. The checks that need only the values
are made here, when the settings are made (every rank makes them, inside the command's agreement);
those that read files (the model, the outputs) are the command's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from loki_dist.attribution.mmlu import QuestionSettings
from loki_dist.core.errors import UserError, require_at_least

# the default chunk budget: this share of the GPU memory free once the model is loaded, or on CPU this
# many GiB (host memory is shared by the ranks of a node, and by whatever else runs there)
CUDA_BUDGET_SHARE, CPU_DEFAULT_GB = 0.8, 2.0


@dataclass(frozen=True)
class AttributeSettings:
    """What `loki-dist attribute` was asked to do, one field per flag (the question flags as a group)."""

    model: str  # the Hugging Face model directory whose down_proj rows are scored
    data: str  # the MMLU-layout data as given: a local file or folder, or a hub name (recorded as given)
    output: str  # the attribution file to write (.safetensors)
    questions: QuestionSettings  # which questions of --data are scored, and with how many shots
    steps: int  # Riemann steps m of the integrated gradients, from the zero row to the real one
    batch_size: int  # prompts per batch; ranks score whole batches, so results do not depend on them
    algorithm: str  # `fast` (shared prefix KV cache, packed rows) or `reference` (the slow, exact oracle)
    max_rows: int  # `fast`: packed (layer, step) rows per forward; 0: planned from the memory budget
    chunk_memory_gb: float | None  # memory budget of one forward, GiB; None: most of the free GPU memory
    save_scores: bool  # also store the per-sample scores [N, L, D] (what some selections read)
    checkpoint_every: int  # save the partial statistics every N samples per rank; 0: never by count
    checkpoint_minutes: float  # also save them every N minutes of scoring; 0: no clock
    checkpoint_dir: str | None  # where the partial statistics go; None: OUTPUT.partial
    resume: bool  # continue from the partial statistics of an earlier run of the same command
    overwrite: bool  # replace an existing output, and discard partial statistics not resumed
    dtype: str  # the precision the model is loaded in (either spelling; auto: bf16 on GPU, fp32 on CPU)
    ds_config: str | None  # a ZeRO-3 inference config to shard the model with; None: whole on each rank
    chat_template: str | None  # a Jinja file or built-in template name for the prompts; None: the tokenizer's

    def __post_init__(self) -> None:
        require_at_least(
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--max-rows", self.max_rows, 0),
            ("--checkpoint-every", self.checkpoint_every, 0),
        )
        # nan or inf was a traceback once the model had loaded
        if self.chunk_memory_gb is not None and not 0 < self.chunk_memory_gb < math.inf:
            raise UserError(f"--chunk-memory-gb {self.chunk_memory_gb}: must be a positive finite number")
        if not 0 <= self.checkpoint_minutes < math.inf:
            raise UserError(f"--checkpoint-minutes {self.checkpoint_minutes}: must be 0 (no clock) or more")

    @property
    def progress_dir(self) -> Path:
        """Where this run's partial statistics live: --checkpoint-dir, or beside the output."""
        return Path(self.checkpoint_dir or f"{self.output}.partial")
