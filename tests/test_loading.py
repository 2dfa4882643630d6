"""Loading under ZeRO-3: each rank reads only its share of the weight files, nothing moves between ranks,
and what it holds is exactly what transformers' own whole-model load reads from the same files.

A real 2-rank torchrun job (tests/zero3_load_check.py) loads each model with metering on; the bound
on what a rank may read is computed here from the files' headers alone: a parameter of n elements over
W ranks is a partition of ceil(n / W) elements, read as the whole rows (of its first dimension) that
cover it, so at most one partial row more at each end. Every loaded parameter is compared bit for bit
with `from_pretrained`'s.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port
from transformers import AutoModelForCausalLM

from loki_dist.core import checks
from loki_dist.demo.tiny import build_tokenizer, save_tiny, tiny_config

WORLD = 2
_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}


def read_bound(model_dir: Path) -> tuple[int, int]:
    """(most bytes one rank may read, bytes of the whole model) from the safetensors headers."""
    bound = whole = 0
    for shard in model_dir.glob("*.safetensors"):
        for name, entry in checks.read_safetensors_header(shard)[2].items():
            if name == "__metadata__":
                continue
            shape, size = entry["shape"], _BYTES[entry["dtype"]]
            numel, row = math.prod(shape), math.prod(shape[1:]) if len(shape) > 1 else 1
            bound += min(numel, math.ceil(numel / WORLD) + 2 * row) * size
            whole += numel * size
    return bound, whole


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("loading")
    models = {
        # several shards, as big models come, and a layer wide enough that rows matter in the bound
        "llama": save_tiny(root / "llama", "llama", seed=1, max_shard_size="20KB", intermediate_size=96),
        "gpt_neox": save_tiny(root / "gpt_neox", "gpt_neox", seed=2),  # its head is stored as embed_out
        "gemma2": save_tiny(root / "gemma2", "gemma2", seed=3),
    }
    config = tiny_config("llama")  # an output embedding tied to the input one: stored once
    config.tie_word_embeddings = True
    torch.manual_seed(4)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "tied")
    build_tokenizer().save_pretrained(root / "tied")
    models["tied"] = root / "tied"
    out = root / "results.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    script = [*launcher, str(REPO / "tests" / "zero3_load_check.py"), str(out), *map(str, models.values())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOKI_DIST_METER": str(root / "meter")}
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(WORLD)]
    return {name: {"dir": path, "ranks": [r[str(path)] for r in ranks]} for name, path in models.items()}


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "tied"])
def test_every_parameter_is_what_transformers_reads(loaded, family):
    for rank, result in enumerate(loaded[family]["ranks"]):
        assert result["differ"] == [], (family, rank, result["differ"])


def test_a_tied_head_stays_tied(loaded):
    assert all(result["tied"] for result in loaded["tied"]["ranks"])


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "tied"])
def test_each_rank_reads_its_share_and_receives_nothing(loaded, family):
    bound, whole = read_bound(loaded[family]["dir"])
    reads = [result["read"] for result in loaded[family]["ranks"]]
    for rank, result in enumerate(loaded[family]["ranks"]):
        # no broadcast from rank 0, no gather: the values come from the files on every rank
        assert result["received"] == 0, (family, rank, result)
        assert result["read"] <= bound, (family, rank, result["read"], bound)
    assert sum(reads) >= whole  # every byte of the model was read by some rank
    assert max(reads) < 0.75 * whole  # not one reader: at 2 ranks about half each
