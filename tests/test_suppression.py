"""`suppress`: a plain Hugging Face copy of a model with exactly the chosen down_proj rows zeroed and every
other byte the base's; the rows are those of `select` and of a brute-force reading of docs/method.md."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error
from safetensors.torch import load_file
from test_selection import _brute, _save

from loki_dist.attribution.stats import Stats
from loki_dist.cli import main

L, D, N = 2, 32, 9  # the tiny Llama's layers and hidden size; samples
DOWN_PROJ = re.compile(r"model\.layers\.(\d+)\.mlp\.down_proj\.weight")


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory) -> dict:
    """A bf16 base in several shards (an index and three or more files), and attribution files of it
    with and without per-sample scores (scores in -3..3: ties everywhere, +x and -x tied under |score|)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("suppress")
    base = root / "base"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(base)
    assert len(list(base.glob("*.safetensors"))) >= 3 and (base / "model.safetensors.index.json").is_file()
    scores = torch.randint(-3, 4, (N, L, D), generator=torch.Generator().manual_seed(4)).float()
    files = {}
    for name, keep in (("attribution", True), ("no_scores", False)):
        stats = Stats(L, D, keep, capacity=N)
        stats.add(scores.double())
        files[name] = root / f"{name}.safetensors"
        _save(stats.tensors(), files[name], {"model_type": "llama"})
    return {"root": root, "base": base, "scores": scores, **files}


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in model_dir.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def _assert_suppressed(base: Path, out: Path, rows: list[list[int]]) -> None:
    """Exactly `rows` of each down_proj are zero (and were not in the base); every other tensor, every
    other row, and every other file is the base's to the bit; plain from_pretrained loads it whole."""
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in base.iterdir()] + ["suppression.json"]
    )
    for path in base.iterdir():
        if path.suffix != ".safetensors":
            assert path.read_bytes() == (out / path.name).read_bytes(), path.name
    before, after = _tensors(base), _tensors(out)
    assert before.keys() == after.keys()
    zeroed = 0
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        match = DOWN_PROJ.fullmatch(name)
        if match is None:
            assert torch.equal(after[name], tensor), name
            continue
        chosen = torch.zeros(D, dtype=torch.bool)
        chosen[rows[int(match[1])]] = True
        assert torch.equal(after[name][~chosen], tensor[~chosen]), name
        assert not after[name][chosen].any() and tensor[chosen].all(dim=1).all(), name
        zeroed += int(chosen.sum())
    assert zeroed == sum(map(len, rows)) > 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for layer, block in enumerate(model.model.layers):
        weight = block.mlp.down_proj.weight
        assert [j for j in range(D) if not weight[j].any()] == rows[layer]


@pytest.mark.parametrize("rule", ["signed", "magnitude"])
@pytest.mark.parametrize("which", ["lowest", "highest", "random"])
def test_the_copy_has_exactly_the_chosen_rows_zeroed(setup, which, rule, tmp_path, capsys):
    """S-L and S-H against the brute force (k = floor(10 * 32 / 100) = 3 rows per layer); S-L and the
    random rows against `select` with the same flags."""
    out = tmp_path / "suppressed"
    argv = ["--attribution", str(setup["attribution"]), "--quota", "10", "--rule", rule, "--seed", "3"]
    main(["suppress", "--model", str(setup["base"]), *argv, "--which", which, "--output", str(out)])
    strategy = {"lowest": "layer_balanced", "highest": "layer_balanced_highest", "random": "random"}[which]
    if which != "highest":  # a `select` strategy
        main(["select", *argv, "--strategy", strategy, "--output", str(tmp_path / "p.json")])
        selected = json.loads((tmp_path / "p.json").read_text())
    rows = selected if which == "random" else _brute(setup["scores"], Fraction(10), strategy, rule)
    assert which == "highest" or rows == selected
    _assert_suppressed(setup["base"], out, rows)
    record = json.loads((out / "suppression.json").read_text())
    assert record["positions"] == rows
    assert (record["which"], record["rule"], record["quota"], record["seed"]) == (which, rule, "10", 3)
    assert "zeroing 6 down_proj rows (3-3 per layer)" in capsys.readouterr().out


def test_the_rules_zero_different_rows(setup, tmp_path):
    """The suppression table of issue 28 compares these: on these scores they are not the same rows."""
    chosen = {}
    for rule in ("signed", "magnitude"):
        out = tmp_path / rule
        main(["suppress", "--model", str(setup["base"]), "--attribution", str(setup["attribution"]),
              "--quota", "25", "--which", "lowest", "--rule", rule, "--output", str(out)])  # fmt: skip
        chosen[rule] = json.loads((out / "suppression.json").read_text())["positions"]
    assert chosen["signed"] != chosen["magnitude"]


def test_positions_from_select_zero_a_global_selection(setup, tmp_path):
    """--positions: any selection, here `select --strategy global_lowest --rule magnitude`."""
    positions, out = tmp_path / "global.json", tmp_path / "suppressed"
    main(["select", "--attribution", str(setup["attribution"]), "--quota", "5", "--strategy", "global_lowest",
          "--rule", "magnitude", "--output", str(positions)])  # fmt: skip
    main(["suppress", "--model", str(setup["base"]), "--positions", str(positions), "--output", str(out)])
    rows = _brute(setup["scores"], Fraction(5), "global_lowest", "magnitude")
    assert json.loads(positions.read_text()) == rows and sum(map(len, rows)) == 3
    _assert_suppressed(setup["base"], out, rows)
    assert json.loads((out / "suppression.json").read_text())["positions_file"] == str(positions)


def test_mistakes_are_one_line_before_anything_is_written(setup, tiny_llama, tmp_path, capsys):
    base, out = str(setup["base"]), str(tmp_path / "out")
    attribution = ["--attribution", str(setup["attribution"])]
    positions = tmp_path / "p.json"
    positions.write_text(json.dumps([[0], [1]]))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    other = tmp_path / "other.safetensors"  # an attribution of another shape
    stats = Stats(3, 40, False, capacity=1)
    stats.add(torch.zeros(1, 3, 40))
    _save(stats.tensors(), other, {})
    scores_of = ["--attribution", str(setup["no_scores"])]
    cases = [  # (flags, what the one line says)
        (
            [*scores_of, "--quota", "10", "--which", "highest"],
            "the layer-balanced highest rows needs per-sample",
        ),
        ([*attribution, "--quota", "10"], "--which and --quota are required (or --positions"),
        (["--quota", "10", "--which", "lowest"], "--which lowest needs --attribution"),
        (
            ["--positions", str(positions), "--which", "random"],
            "--positions names the rows itself; drop --which",
        ),
        ([*attribution, "--quota", "0", "--which", "lowest"], "--quota 0: must be in (0, 100]"),
        (["--attribution", str(other), "--quota", "10", "--which", "lowest"], "made for 3 layers x 40 rows"),
        (["--positions", str(tmp_path / "p3.json")], "has 3 layer lists but the model has 2"),
    ]
    (tmp_path / "p3.json").write_text(json.dumps([[0], [1], [2]]))
    for argv, needle in cases:
        assert_user_error(["suppress", "--model", base, *argv, "--output", out], capsys, needle)
    refused = {
        str(occupied): "already exists and is not empty (pass --overwrite",
        str(setup["base"] / "inside"): "is inside --model",
    }
    for output, needle in refused.items():
        argv = ["suppress", "--model", base, "--which", "random", "--quota", "10", "--output", output]
        assert_user_error(argv, capsys, needle)
    assert not Path(out).exists() and not (setup["base"] / "inside").exists()
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    main(
        [
            "suppress",
            "--model",
            base,
            "--which",
            "random",
            "--quota",
            "10",
            "--output",
            str(occupied),
            "--overwrite",
        ]
    )
    assert not (occupied / "keep.txt").exists() and (occupied / "suppression.json").is_file()
