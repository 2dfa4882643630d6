"""`train --train-bias` / `implant_rows(bias=True)`: a down_proj with a bias trains its selected rows' bias
entries with the rows, as the LoKI reference does (issue 24.6); every other bias entry, and every other
tensor, stays the base's to the bit, through ZeRO-3's split layout, the export and `apply`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, assert_user_error, run_cli
from safetensors.torch import load_file
from test_api import base_tensors, make_data
from transformers import AutoModelForCausalLM

import loki_dist
from loki_dist.demo.tiny import save_tiny

POSITIONS = [[0, 3, 17], [5, 30]]
DOWN = "gpt_neox.layers.{}.mlp.dense_4h_to_h.{}"


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias")
    base = save_tiny(root / "base", "gpt_neox", seed=2)
    (root / "positions.json").write_text(json.dumps(POSITIONS))
    return root, base


def assert_only_rows_and_their_bias_moved(base: dict, got: dict) -> None:
    assert set(got) == set(base)
    for name, tensor in base.items():
        expected, actual = tensor.clone(), got[name].clone()
        for layer, rows in enumerate(POSITIONS):
            if name in (DOWN.format(layer, "weight"), DOWN.format(layer, "bias")):
                assert not torch.equal(actual[rows], expected[rows]), f"{name}: its rows did not train"
                expected[rows] = actual[rows] = 0
        assert torch.equal(actual, expected), name


def test_the_api_trains_the_rows_bias_entries_and_merges_them(neox):
    root, base = neox
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    original = {name: t.detach().clone() for name, t in model.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    before = model(input_ids=ids).logits
    loki_dist.implant_rows(model, str(root / "positions.json"), bias=True)
    trained = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trained == [f"gpt_neox.layers.{layer}.mlp.dense_4h_to_h.{part}" for layer in (0, 1)
                       for part in ("trained", "trained_bias")]  # fmt: skip
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-6)  # step 0 is the base
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loki_dist.merge_rows(model)
    assert_only_rows_and_their_bias_moved(original, {n: t.detach() for n, t in model.state_dict().items()})


def test_zero3_split_export_and_apply_keep_every_other_bias_entry(neox, tmp_path):
    root, base = neox
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the biases partitioned too
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    out = tmp_path / "out"
    run_cli(["train", "--model", str(base), "--positions", str(root / "positions.json"),
             "--data", str(make_data(tmp_path / "data.jsonl", 8)), "--output-dir", str(out), "--train-bias",
             "--ds-config", str(tmp_path / "zero3.json"), "--max-steps", "3", "--learning-rate", "5e-2",
             "--precision", "fp32", "--micro-batch-size", "2", "--save-steps", "2"], nproc=2)  # fmt: skip
    original = base_tensors(base)
    final = base_tensors(out / "final")
    assert_only_rows_and_their_bias_moved(original, final)
    implant = load_file(out / "final" / "implant.safetensors")
    for layer, rows in enumerate(POSITIONS):
        assert torch.equal(implant[f"layers.{layer}.bias"], final[DOWN.format(layer, "bias")][rows])
    run_cli(["apply", "--base", str(base), "--implant", str(out / "final" / "implant.safetensors"),
             "--output", str(tmp_path / "applied")])  # fmt: skip
    applied = base_tensors(tmp_path / "applied")
    assert all(torch.equal(applied[name], tensor) for name, tensor in final.items())
    run_cli(["export", "--checkpoint", str(out / "checkpoint-2"), "--output", str(tmp_path / "at2")])
    assert_only_rows_and_their_bias_moved(original, base_tensors(tmp_path / "at2"))


def test_train_bias_is_refused_where_nothing_or_something_else_would_train(neox, tmp_path, capsys):
    root, base = neox
    llama = save_tiny(tmp_path / "llama", "llama", seed=0)  # a down_proj without bias
    (tmp_path / "data.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    capsys.readouterr()  # save_tiny's progress bar
    common = ["train", "--positions", str(root / "positions.json"), "--data", str(tmp_path / "data.jsonl"),
              "--output-dir", str(tmp_path / "out"), "--train-bias"]  # fmt: skip
    assert_user_error([*common, "--model", str(llama)], capsys, "has no down_proj bias in layers [0, 1]")
    assert_user_error([*common, "--model", str(base), "--row-params", "masked"], capsys,
                      "cannot be combined with --row-params masked")  # fmt: skip
    assert_user_error([*common, "--model", str(base), "--lora-rank", "2"], capsys, "with --lora-rank 2")
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with pytest.raises(ValueError, match="has no bias to train"):
        loki_dist.implant_rows(model, POSITIONS, bias=True)
    assert not (tmp_path / "out").exists()
