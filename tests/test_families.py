"""Every supported model family trains: two steps of `loki-dist train` (one plain process, fp32) on its
tiny model move the selected down_proj rows and leave every other row and tensor bit-identical.

The rest of the training suite runs on Llama; this is the cheap check that the other families' layer
and down_proj names, configs and tied or untied heads go through the same path.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from loki_dist.core.families import FAMILIES, spec_from_dir
from loki_dist.demo.tiny import save_tiny

POSITIONS = [[0, 3, 17, 31], [5, 6]]  # rows of down_proj per layer (hidden 32)


def _data(path):
    rows = [
        {"instruction": f"What is {a} plus {a + 3}?", "input": "", "output": f"{2 * a + 3}."}
        for a in range(8)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_only_the_selected_rows(tmp_path, family):
    base = save_tiny(tmp_path / "base", family, seed=1, num_layers=2)
    positions = tmp_path / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    out, data = tmp_path / "out", _data(tmp_path / "data.jsonl")
    run_cli(["train", "--model", str(base), "--positions", str(positions), "--data", str(data),
             "--output-dir", str(out), "--ds-config", "none", "--max-steps", "2", "--learning-rate", "1e-2",
             "--warmup-ratio", "0", "--save-steps", "0", "--logging-steps", "1"])  # fmt: skip
    spec = spec_from_dir(base)
    before, after = (
        load_file(str(base / "model.safetensors")),
        load_file(str(out / "final" / "model.safetensors")),
    )
    assert before.keys() == after.keys()
    trained = 0
    for name, tensor in before.items():
        layer = spec.layer_of(name)
        if layer is None:
            assert torch.equal(tensor, after[name]), f"{name} moved"
            continue
        selected = torch.zeros(tensor.shape[0], dtype=torch.bool)
        selected[POSITIONS[layer]] = True
        assert torch.equal(tensor[~selected], after[name][~selected]), f"{name}: an unselected row moved"
        assert (tensor[selected] != after[name][selected]).any(dim=1).all(), f"{name}: a selected row stayed"
        trained += 1
    assert trained == spec.num_layers
