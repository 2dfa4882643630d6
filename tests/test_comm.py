"""What a ZeRO-3 rank gathers, counted (never timed): attribution's chunks gather their own layers only.

A real 2-rank `loki-dist attribute` under zero3_infer with metering on (LOKI_DIST_METER) reports, per
phase, the bytes each kind of collective left on the rank. The expected volumes are computed here from
the model's safetensors headers alone: the prompt pass gathers the whole model once per batch, and a
chunk whose rows start at layer a gathers layers a..L-1 and the output head, forward and backward. A
change that makes every chunk run (and gather) the whole model again multiplies the chunk volume by
about 2L / (L + 1) and fails here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import run_cli
from mmlu_fixture import write_mmlu

from loki_dist.attribution.chunks import gathered_elements, uniform_chunks
from loki_dist.core import checks
from loki_dist.demo.tiny import save_tiny

LAYERS, BATCH, STEPS, WORLD = 6, 2, 7, 2
_BYTES = {"F32": 4, "BF16": 2, "F16": 2}


def parameter_bytes(model_dir: Path) -> tuple[dict[int, int], int, int]:
    """({layer: bytes of its weights}, bytes of the output head, bytes of the whole model)."""
    layers, head, total = dict.fromkeys(range(LAYERS), 0), 0, 0
    for shard in model_dir.glob("*.safetensors"):
        for name, entry in checks.read_safetensors_header(shard)[2].items():
            if name == "__metadata__":
                continue
            size = math.prod(entry["shape"]) * _BYTES[entry["dtype"]]
            total += size
            found = re.match(r"model\.layers\.(\d+)\.", name)
            if found:
                layers[int(found.group(1))] += size
            elif name == "lm_head.weight":
                head += size
    return layers, head, total


@pytest.fixture(scope="module")
def attribution(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("comm")
    model = save_tiny(
        root / "model", "llama", seed=0, num_layers=LAYERS, hidden_size=64, intermediate_size=192
    )
    data = write_mmlu(root / "mmlu")
    meter = root / "meter"
    run_cli(["attribute", "--model", str(model), "--data", str(data), "--output", str(root / "a.safetensors"),
             "--ds-config", "zero3_infer", "--batch-size", str(BATCH), "--max-rows", str(STEPS * BATCH)],
            nproc=WORLD, env={"LOKI_DIST_METER": str(meter)})  # fmt: skip
    ranks = [json.loads((meter / f"rank{r}.json").read_text())["phases"] for r in range(WORLD)]
    return {"model": model, "ranks": ranks}


def test_the_prompt_pass_gathers_the_model_once_per_batch(attribution):
    _, _, model_bytes = parameter_bytes(attribution["model"])
    for phases in attribution["ranks"]:
        batches = phases["attribute_prefix"]["calls"]
        gathered = phases["attribute_prefix"]["received_by"]["all_gather"] / batches
        assert model_bytes * 0.95 <= gathered <= model_bytes * 1.1, (gathered, model_bytes)


def test_each_chunk_gathers_its_layers_and_the_head_not_the_model(attribution):
    layers, head, model_bytes = parameter_bytes(attribution["model"])
    # --max-rows 7*B: one layer's m rows per sample per chunk, so chunk a starts at layer a
    per_batch = sum(2 * (sum(layers[i] for i in range(first, LAYERS)) + head) for first in range(LAYERS))
    whole_model_per_chunk = 2 * LAYERS * model_bytes
    assert per_batch < 0.65 * whole_model_per_chunk  # what this test tells apart
    # estimate-time's count (chunks.gathered_elements) is this one, in elements of 4 bytes
    plan = uniform_chunks(LAYERS * STEPS, BATCH, STEPS * BATCH)
    counted = gathered_elements(layers[0] // 4, head // 4, model_bytes // 4, plan, STEPS, LAYERS)
    assert 4 * counted - model_bytes == pytest.approx(per_batch, rel=0.02)
    for phases in attribution["ranks"]:
        chunk = phases["attribute_chunk"]
        batches = chunk["calls"] // LAYERS
        gathered = chunk["received_by"]["all_gather"] / batches
        assert per_batch * 0.95 <= gathered <= per_batch * 1.1, (gathered, per_batch)
