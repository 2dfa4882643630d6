"""LoKI* (`train --lora-rank R`, `implant_rows(model, rows, rank=R)`): the selected rows trained as
W_S0 + A B, against an oracle written in plain PyTorch (test_training.py's, whose `parametrise` trains
A and B there: A zero, B drawn with torch's kaiming_uniform_ from the seed, rows = W_S0 + A B spliced
into the float64 base for each forward, torch.optim.AdamW decaying A and B).

Every configuration (ZeRO-3 on 1 and on 2 ranks with every tensor partitioned, ZeRO-2 on 2 ranks, one
plain process) must reproduce the oracle's rows, losses, gradient norms and rates within the tolerance of
the row layouts (test_training.FP32) and leave every other tensor, and every unselected row, bit-identical
to the base; a resume equals the uninterrupted run (bit for bit on the same world size, within
test_training.TOLERANCE on another); export and apply write the merged rows as plain rows.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from test_training import (
    FP32,
    ORACLE_RUN,
    POSITIONS,
    TOLERANCE,
    _config_variant,
    assert_equal_weights,
    assert_matches_oracle,
    assert_only_selected_rows_moved,
    final_weights,
    make_data,
    train,
    train_args,
    train_oracle,
)
from torch import nn
from transformers import AutoModelForCausalLM

import loki_dist
from loki_dist.core.errors import UserError
from loki_dist.demo.tiny import save_tiny

RANK = 2
# 4 steps at global batch 6 (rates 0, 5e-3, 1e-2, 5e-3), decay 0.1, no clipping, a checkpoint at steps 2, 4
LOWRANK_RUN = {**ORACLE_RUN, "--row-params": "split", "--lora-rank": RANK}
GLOBAL_BATCH = 6
CONFIGS = {
    # the shipped config: A and B are small enough to stay whole on every rank (persistent)
    "zero3-1rank": (1, "--micro-batch-size 2 --gradient-accumulation 3"),
    # every tensor partitioned: the ranks cut A [5, 2] and B [2, 48] inside their rows
    "zero3-2ranks": (2, "--ds-config {zero3_no_persist} --micro-batch-size 1 --gradient-accumulation 3"),
    "zero2-2ranks": (2, "--ds-config zero2 --micro-batch-size 3"),
    "plain": (1, "--ds-config none --micro-batch-size 2 --gradient-accumulation 3"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lowrank")
    (root / "positions.json").write_text(json.dumps(POSITIONS))
    return {
        "root": root,
        "base": save_tiny(root / "base", "llama", seed=1, num_layers=3),
        "positions": root / "positions.json",
        "data": make_data(root / "data.jsonl"),
        "zero3_no_persist": _config_variant(
            root, "zero3_no_persist", "zero3", {"stage3_param_persistence_threshold": 0}
        ),
    }


@pytest.fixture(scope="module")
def oracle(setup):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: two threads take longer on a busy machine
    try:
        return train_oracle(setup["base"], setup["data"], LOWRANK_RUN, GLOBAL_BATCH)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(setup):
    """trained(config) -> the LoKI* run of LOWRANK_RUN in that configuration, run once."""
    cache = {}

    def get(config: str):
        if config not in cache:
            nproc, extra = CONFIGS[config]
            out = setup["root"] / config
            args = [*extra.format(**setup).split(), "--precision", "fp32"]
            cache[config] = train(setup, out, *args, nproc=nproc, options=LOWRANK_RUN)
        return cache[config]

    return get


def merged_rows(base_rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W_S0 + A B, exact in float64, rounded once to the base's float32."""
    return (base_rows.double() + a.double() @ b.double()).float()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_lowrank_training_matches_the_oracle(setup, trained, oracle, config):
    run = trained(config)
    assert_only_selected_rows_moved(setup["base"], run.out)
    assert_matches_oracle(run, oracle, FP32)


def test_one_and_two_ranks_train_the_same_rows(trained):
    one, two = (final_weights(trained(config).out) for config in ("zero3-1rank", "zero3-2ranks"))
    for name, tensor in one.items():
        diff = (tensor - two[name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: 1 and 2 ranks differ by {diff}"


def test_checkpoints_hold_the_factors_and_final_holds_their_merged_rows(setup, trained):
    """The index lists A and B per layer with their shapes; their fp32 masters, gathered from both
    ranks' shards, merged with the base's rows, are final/'s rows to the bit. A is zero at step 0, so it
    has moved; B has moved from its draw too."""
    out = trained("zero3-2ranks").out
    checkpoint = out / "checkpoint-4"
    index = json.loads((checkpoint / "rows_index.json").read_text())
    assert index["format"] == "loki_dist.lowrank/1"
    F = 48
    shapes = {f"{layer}.{part}": [len(r), RANK] if part == "A" else [RANK, F]
              for layer, r in enumerate(POSITIONS) if r for part in "AB"}  # fmt: skip
    assert {key: entry["shape"] for key, entry in index["layers"].items()} == shapes
    assert all(entry["rows"] == POSITIONS[int(key[0])] for key, entry in index["layers"].items())
    pieces: dict[str, list[torch.Tensor]] = {}
    for shard in sorted(checkpoint.glob("rows-*.safetensors")):  # rank order = flat order
        for name, tensor in load_file(str(shard)).items():
            pieces.setdefault(name, []).append(tensor)
    assert len(list(checkpoint.glob("rows-*.safetensors"))) == 2
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["lora_rank"] == RANK and state["step"] == 4
    base, final = load_file(str(setup["base"] / "model.safetensors")), final_weights(out)
    for layer, rows in enumerate(POSITIONS):
        if not rows:
            continue
        a, b = (torch.cat(pieces[f"layers.{layer}.{p}.master"]).view(shapes[f"{layer}.{p}"]) for p in "AB")
        assert a.abs().min() > 0  # every element of A has left zero
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(final[name][rows], merged_rows(base[name][rows], a, b)), layer


def test_resume_equals_the_uninterrupted_run(setup, trained, oracle, tmp_path):
    """checkpoint-2 of the 2-rank ZeRO-3 run, resumed on 2 ranks: bit-identical to the run that went on.
    Resumed on one plain process (ZeRO-3 slices read back whole, twice the accumulation for the same
    global batch): within TOLERANCE of it, and the oracle's."""
    uninterrupted = trained("zero3-2ranks")
    nproc, extra = CONFIGS["zero3-2ranks"]
    same = tmp_path / "same"
    shutil.copytree(uninterrupted.out / "checkpoint-2", same / "checkpoint-2")
    args = [*extra.format(**setup).split(), "--precision", "fp32"]
    assert "resumed from" in train(setup, same, *args, nproc=2, options=LOWRANK_RUN).stdout
    assert_equal_weights(uninterrupted.out, same)

    other = tmp_path / "other"
    shutil.copytree(uninterrupted.out / "checkpoint-2", other / "checkpoint-2")
    plain = [*CONFIGS["plain"][1].split(), "--precision", "fp32"]
    resumed = train(setup, other, *plain, nproc=1, options=LOWRANK_RUN)
    assert "resumed from" in resumed.stdout
    assert json.loads((other / "train_summary.json").read_text())["start_step"] == 2
    for name, tensor in final_weights(uninterrupted.out).items():
        diff = (tensor - final_weights(other)[name]).abs().max().item()
        assert diff <= TOLERANCE, f"{name}: resumed on 1 rank differs by {diff}"
    assert_only_selected_rows_moved(setup["base"], other)
    weights = final_weights(other)
    for layer, want in oracle.rows.items():
        got = weights[f"model.layers.{layer}.mlp.down_proj.weight"][POSITIONS[layer]].double()
        assert (got - want).abs().max().item() <= FP32.rows, layer


@pytest.mark.parametrize("rank", [0, 3])
def test_resume_with_another_rank_is_refused(setup, trained, tmp_path, capsys, rank):
    out = tmp_path / "out"
    shutil.copytree(trained("zero3-2ranks").out / "checkpoint-2", out / "checkpoint-2")
    options = {**LOWRANK_RUN, "--lora-rank": rank}
    argv = train_args(setup, out, "--ds-config", "none", "--micro-batch-size", "6", options=options)
    assert_user_error(argv, capsys, f"its lora_rank (2) differs from this run's ({rank})")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # nothing written


def test_export_and_apply_write_the_merged_rows_as_plain_rows(setup, trained, tmp_path):
    """`export` of the last checkpoint gives final/ byte for byte; the implant file holds rows and
    weights only (what `apply` reads of any implant), and `apply` of it onto the base gives final/ too."""
    out = trained("zero3-2ranks").out
    run_cli(["export", "--checkpoint", str(out / "checkpoint-4"), "--output", str(tmp_path / "exp")])
    final = out / "final"
    assert (tmp_path / "exp" / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    with safe_open(str(final / "implant.safetensors"), framework="pt") as handle:
        assert handle.metadata()["format"] == "loki_dist.implant/1"
        names = set(handle.keys())
        weights = final_weights(out)
        for layer, rows in enumerate(POSITIONS):
            if rows:
                assert handle.get_tensor(f"layers.{layer}.rows").tolist() == rows
                want = weights[f"model.layers.{layer}.mlp.down_proj.weight"][rows]
                assert torch.equal(handle.get_tensor(f"layers.{layer}.weight"), want)
    assert names == {f"layers.{layer}.{what}" for layer in (0, 2) for what in ("rows", "weight")}
    applied = tmp_path / "applied"
    run_cli(["apply", "--base", str(setup["base"]), "--implant", str(final / "implant.safetensors"),
             "--output", str(applied)])  # fmt: skip
    assert (applied / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()


# --- the Python API ------------------------------------------------------------------------------------


def test_api_trains_a_and_b_from_the_base_and_merges_plain_rows(setup, tmp_path):
    """implant_rows(rank=R): A and B the only parameters that train, A zero and B the documented draw,
    the model at step 0 the base to the bit; after a plain AdamW loop with decay the model computes the
    base with W_S0 + A B spliced in, and save_implant, merge_rows and apply all write those rows."""
    model = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model = loki_dist.implant_rows(model, POSITIONS, rank=RANK, seed=7)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    F = model.config.intermediate_size
    assert sorted(trainable) == [f"model.layers.{layer}.mlp.down_proj.{p}" for layer in (0, 2) for p in "AB"]
    assert sum(p.numel() for p in trainable.values()) == sum(RANK * (len(r) + F) for r in POSITIONS if r)
    generator = torch.Generator().manual_seed(7)
    for layer in (0, 2):
        b = torch.empty(RANK, F)
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=generator)
        assert torch.equal(trainable[f"model.layers.{layer}.mlp.down_proj.B"], b)
        assert not trainable[f"model.layers.{layer}.mlp.down_proj.A"].any()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    base = {name: t for name, t in load_file(str(setup["base"] / "model.safetensors")).items()}
    expected = {}
    with torch.no_grad():
        for layer in (0, 2):
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            a, b = (trainable[f"model.layers.{layer}.mlp.down_proj.{p}"] for p in "AB")
            expected[name] = base[name].clone()
            expected[name][POSITIONS[layer]] = merged_rows(base[name][POSITIONS[layer]], a, b)
            reference.get_parameter(name).copy_(expected[name])
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6
        )
    implant = loki_dist.save_implant(model, tmp_path / "implant.safetensors", base=setup["base"])
    merged = loki_dist.merge_rows(model)
    assert all(type(m.mlp.down_proj) is nn.Linear for m in merged.model.layers)
    assert not any(p.requires_grad for p in merged.parameters())
    merged.save_pretrained(tmp_path / "merged")
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name, tensor in base.items():  # every base tensor bit-identical but the merged rows
        assert torch.equal(saved[name], expected.get(name, tensor)), name
    run_cli(["apply", "--base", str(setup["base"]), "--implant", str(implant),
             "--output", str(tmp_path / "applied")])  # fmt: skip
    applied = load_file(str(tmp_path / "applied" / "model.safetensors"))
    assert all(torch.equal(applied[name], tensor) for name, tensor in saved.items())


@pytest.mark.parametrize("rank", [-1, 1.5, True])
def test_api_refuses_a_rank_that_is_not_a_count(setup, rank):
    model = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    with pytest.raises(UserError, match=f"implant_rows: rank {rank!r}: expected an integer"):
        loki_dist.implant_rows(model, POSITIONS, rank=rank)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing frozen yet


def test_a_rank_above_what_a_b_can_use_is_refused_before_anything_is_allocated(setup, tmp_path, capsys):
    """A B has rank at most min(k, F) in a layer of k rows: 2**40 would have asked for 200 TB."""
    model = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    most = max(len(rows) for rows in POSITIONS)
    with pytest.raises(UserError, match=f"rank {2**40}: above what A B can use \\(at most {most}"):
        loki_dist.implant_rows(model, POSITIONS, rank=2**40)
    loki_dist.implant_rows(model, POSITIONS, rank=most)  # the largest useful rank is taken
    capsys.readouterr()  # from_pretrained's progress bar
    argv = ["train", "--model", str(setup["base"]), "--positions", str(setup["positions"]), "--data",
            str(setup["data"]), "--output-dir", str(tmp_path / "out"),
            "--lora-rank", str(most + 1)]  # fmt: skip
    assert_user_error(argv, capsys, f"--lora-rank {most + 1}: above what A B can use")
    assert not (tmp_path / "out").exists()


# --- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--lora-rank", "-1"], "--lora-rank -1: must be at least 0"),
        (["--lora-rank", "4", "--row-params", "masked"], "--lora-rank 4: LoKI*'s low-rank rows are a layout"),
    ],
)
def test_rank_flag_mistakes_are_one_line(flags, needle, tmp_path, capsys):
    argv = ["train", "--model", str(tmp_path / "m"), "--positions", "p.json", "--data", "d.jsonl",
            "--output-dir", str(tmp_path / "out"), *flags]  # fmt: skip
    assert_user_error(argv, capsys, needle)
    assert not (tmp_path / "out").exists()


def test_llamafactory_lora_rank_becomes_the_rank_of_loki_star():
    """A LLaMA-Factory YAML's lora_rank means LoRA's rank where finetuning_type is lora (its default):
    LoKI* then, of that rank. Beside a full or freeze fine-tuning LLaMA-Factory ignores it, and so does
    loki_dist, saying so."""
    from loki_dist.implant.data.llamafactory import translate

    settings, notes = translate({"lora_rank": 8, "lora_alpha": 16}, "x.yaml")
    assert settings == {"lora_rank": 8} and notes == ["ignoring lora_alpha: an adapter setting; loki_dist "
                                                      "trains the rows in --positions"]  # fmt: skip
    assert translate({"finetuning_type": "lora", "lora_rank": 8}, "x.yaml")[0] == {"lora_rank": 8}
    settings, notes = translate({"finetuning_type": "full", "lora_rank": 8}, "x.yaml")
    assert (
        settings == {} and "ignoring lora_rank: finetuning_type is full (LoKI* takes it with lora)" in notes
    )


def test_pipeline_yaml_reaches_the_rank():
    """`train: {lora_rank: 32}` in a pipeline YAML is train's --lora-rank, parsed by train's own parser."""
    from loki_dist.pipeline.stages import _parse, build_stages

    config = {"output_dir": "out", "model": "m", "train": {"data": "d.jsonl", "lora_rank": 32}}
    train_stage = next(s for s in build_stages(config) if s.name == "train")
    assert _parse(train_stage).lora_rank == 32
