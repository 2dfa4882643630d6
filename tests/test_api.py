"""The Python API (loki_dist.implant_rows / save_implant / merge_rows) in HF's Trainer and a plain loop.

The Trainer runs for real on 2 gloo ranks under ZeRO-3 (tests/hf_trainer_rows.py) and must give what
`loki-dist train` gives on the same samples in the same order: that compares two training loops, HF's
(its loss normalisation, its AdamW with decoupled decay, its scheduler, its DeepSpeed engine) and ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, run_cli
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import loki_dist
from loki_dist.core.errors import UserError
from loki_dist.demo.tiny import save_tiny
from loki_dist.implant.api import implanted_layers
from loki_dist.implant.trainer.rowsplit import RowSplitLinear

POSITIONS = [[0, 3, 5, 17, 31], [], [1, 2, 10, 30]]  # layer 1 stays frozen
# The runs: 4 steps of 2 ranks x 2 micro-batches of 1, warm-up over 2 steps then cosine, decay 0.1,
# no clipping. Measured: the Trainer's rows and the CLI's are bit-identical (both reduce the same fp32
# gradients in the same order); allowed: fp32 rounding of the update, far below the rows' 2e-2 motion.
SETTINGS = {"steps": 4, "micro": 1, "accum": 2, "learning_rate": 1e-2, "weight_decay": 0.1,
            "warmup_steps": 2, "seed": 42}  # fmt: skip
ROWS_ATOL = 1e-7
LOSS_RTOL = 1e-6


def make_data(path, n: int = 24):
    rows = [
        {
            "instruction": f"What is {a} plus {b}?",
            "input": "",
            "output": f"{a} plus {b} is {a + b}." * (1 + a % 3),
        }
        for a, b in zip(range(7, 7 + n), range(40, 40 + 3 * n, 3), strict=True)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every weight partitioned
    (root / "zero3.json").write_text(json.dumps(zero3))
    return {
        "root": root,
        "base": save_tiny(root / "base", "llama", seed=1, num_layers=3),
        "positions": positions,
        "data": make_data(root / "data.jsonl"),
    }


def base_tensors(model_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory's weight shards (not of an implant file beside them)."""
    shards = [p for p in sorted(model_dir.glob("*.safetensors")) if p.name != "implant.safetensors"]
    return {name: tensor for shard in shards for name, tensor in load_file(shard).items()}


def down_proj(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj.weight"


def assert_only_rows_differ(base: dict, got: dict) -> None:
    """Every tensor bit-identical to the base except the selected rows of the trained down_proj."""
    assert set(got) == set(base)
    for name, tensor in base.items():
        expected, actual = tensor.clone(), got[name].clone()
        for layer, rows in enumerate(POSITIONS):
            if name == down_proj(layer) and rows:
                assert not torch.equal(actual[rows], expected[rows]), f"{name}: its rows did not train"
                expected[rows] = actual[rows] = 0
        assert torch.equal(actual, expected), name


def hf_and_cli(setup, name: str, rank: int = 0) -> tuple[Path, Path]:
    """The Trainer script and `loki-dist train`, both 2 ranks, ZeRO-3, fp32; LoKI* of `rank` where > 0."""
    root = setup["root"]
    settings = {**SETTINGS, "base": str(setup["base"]), "positions": str(setup["positions"]),
                "data": str(setup["data"]), "out": str(root / f"hf{name}"), "rank": rank}  # fmt: skip
    (root / f"settings{name}.json").write_text(json.dumps(settings))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = [*launcher, str(REPO / "tests" / "hf_trainer_rows.py"), str(root / f"settings{name}.json")]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # a quiet API path: none of DeepSpeed's deprecated-collective warnings (78 lines before), while a
    # FutureWarning of the script's own code is shown, once per rank
    warned = [line for line in proc.stderr.splitlines() if ": FutureWarning: " in line]
    assert len(warned) == 2 and all("the training script's own FutureWarning" in w for w in warned), warned
    cli = ["train", "--model", str(setup["base"]), "--positions", str(setup["positions"]),
           "--data", str(setup["data"]), "--output-dir", str(root / f"cli{name}"),
           "--ds-config", str(root / "zero3.json"),
           "--max-steps", "4", "--learning-rate", "1e-2", "--weight-decay", "0.1", "--max-grad-norm", "0",
           "--warmup-ratio", "0.5", "--micro-batch-size", "1", "--gradient-accumulation", "2",
           "--precision", "fp32", "--logging-steps", "1", "--seed", "42",
           "--lora-rank", str(rank)]  # fmt: skip
    run_cli(cli, nproc=2)
    return root / f"hf{name}", root / f"cli{name}"


@pytest.fixture(scope="module")
def runs(setup):
    return hf_and_cli(setup, "")


def assert_the_trainer_trains_as_the_cli(hf: Path, cli: Path) -> None:
    """The Trainer's implant is the CLI's final/ implant, and its losses the CLI's logged ones."""
    implant, expected = (
        load_file(hf / "implant.safetensors"),
        load_file(cli / "final" / "implant.safetensors"),
    )
    assert set(implant) == set(expected)
    for name, tensor in expected.items():
        if name.endswith(".rows"):
            assert torch.equal(implant[name], tensor), name
        else:
            torch.testing.assert_close(implant[name], tensor, rtol=0, atol=ROWS_ATOL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cli / "runs"))
    events.Reload()
    cli_losses = [event.value for event in events.Scalars("train/loss")]
    hf_losses = json.loads((hf / "losses.json").read_text())
    assert len(hf_losses) == len(cli_losses) == SETTINGS["steps"]
    torch.testing.assert_close(torch.tensor(hf_losses), torch.tensor(cli_losses), rtol=LOSS_RTOL, atol=0)


def assert_merged_is_plain_and_applies(setup, hf: Path, out: Path) -> None:
    """merge_rows' model reloads with no custom code, only the rows changed, and `apply` of the implant
    save_implant wrote merges into the base to the same weights."""
    reloaded = AutoModelForCausalLM.from_pretrained(hf / "merged", dtype=torch.float32)  # no custom code
    got = {name: tensor.detach() for name, tensor in reloaded.state_dict().items()}
    base = base_tensors(setup["base"])
    got = {name: got[name] for name in base}  # tied or derived entries aside, the saved ones
    assert_only_rows_differ(base, got)
    run_cli(["apply", "--base", str(setup["base"]), "--implant", str(hf / "implant.safetensors"),
             "--output", str(out)])  # fmt: skip
    applied = base_tensors(out)
    for name in base:
        assert torch.equal(applied[name], got[name]), name


def test_hf_trainer_with_zero3_trains_the_rows_as_loki_dist_train_does(setup, runs):
    assert_the_trainer_trains_as_the_cli(*runs)


def test_the_merged_model_is_a_plain_hf_model_with_only_the_rows_changed(setup, runs, tmp_path):
    assert_merged_is_plain_and_applies(setup, runs[0], tmp_path / "applied")


def test_hf_trainer_with_zero3_trains_loki_star_as_loki_dist_train_does(setup, tmp_path):
    """LoKI* (implant_rows(rank=2), B from the seed) in the Trainer under ZeRO-3, A and B partitioned
    over the ranks and decayed by HF's AdamW: save_implant and merge_rows gather the base weight with
    them and write W_S0 + A B, as `loki-dist train --lora-rank 2` exports them."""
    hf, cli = hf_and_cli(setup, "-lowrank", rank=2)
    assert_the_trainer_trains_as_the_cli(hf, cli)
    assert_merged_is_plain_and_applies(setup, hf, tmp_path / "applied")


def test_a_plain_loop_trains_only_the_rows_and_merges_back(setup, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    model = loki_dist.implant_rows(model, POSITIONS)  # a list of L lists, or a positions file
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    F = model.config.intermediate_size
    assert sorted(trainable) == [
        "model.layers.0.mlp.down_proj.trained",
        "model.layers.2.mlp.down_proj.trained",
    ]
    assert sum(p.numel() for p in trainable.values()) == sum(map(len, POSITIONS)) * F
    # the forward is the base's with the rows replaced: an independent splice of the weights
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    reference = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        for layer, rows in enumerate(POSITIONS):
            if rows:
                trained = trainable[f"model.layers.{layer}.mlp.down_proj.trained"]
                reference.model.layers[layer].mlp.down_proj.weight[rows] = trained
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-6
        )
    path = loki_dist.save_implant(model, tmp_path / "implant.safetensors", base=setup["base"])
    merged = loki_dist.merge_rows(model)
    assert not any(isinstance(m, RowSplitLinear) for m in merged.modules())
    assert all(type(m.mlp.down_proj) is nn.Linear for m in merged.model.layers)
    merged.save_pretrained(tmp_path / "merged")
    saved = base_tensors(tmp_path / "merged")
    assert_only_rows_differ(base_tensors(setup["base"]), saved)
    for name, tensor in reference.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    run_cli(
        ["apply", "--base", str(setup["base"]), "--implant", str(path), "--output", str(tmp_path / "applied")]
    )
    applied = base_tensors(tmp_path / "applied")
    assert all(torch.equal(applied[name], tensor) for name, tensor in saved.items())


def test_dir_lists_the_api_before_its_first_use():
    assert set(loki_dist.__all__) <= set(dir(loki_dist))


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda m, p, t: loki_dist.implant_rows(m, [[0], [1]]), "has 2 layer lists but the model has 3"),
        (lambda m, p, t: loki_dist.implant_rows(m, [[], [], []]), "every layer list is empty"),
        (lambda m, p, t: loki_dist.implant_rows(m, [[99], [], []]), "outside [0, 32)"),
        (lambda m, p, t: loki_dist.implant_rows(loki_dist.implant_rows(m, p), p), "already has implanted"),
        (lambda m, p, t: loki_dist.merge_rows(m), "has no implanted rows"),
        (lambda m, p, t: loki_dist.save_implant(m, t / "x.safetensors"), "has no implanted rows"),
        (
            lambda m, p, t: loki_dist.save_implant(loki_dist.implant_rows(m, p), t / "exists.safetensors"),
            "exists (pass overwrite=True",
        ),
    ],
)
def test_api_mistakes_are_named(setup, tmp_path, call, needle):
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    model = AutoModelForCausalLM.from_pretrained(setup["base"], dtype=torch.float32)
    with pytest.raises(ValueError) as err:  # what code written for PEFT or the reference catches
        call(model, str(setup["positions"]), tmp_path)
    assert isinstance(err.value, UserError) and needle in str(err.value)
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"


# ------------------------------------------------------------------ what the API refuses to write


def _files(directory) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _over_inputs(tmp):
    """name -> (where the model loads from, base, path, words): each path is, or lies in, an input."""
    base, model, link = tmp / "base", tmp / "model", tmp / "link"
    return {
        "the base's weights, overwrite=True": (base, base, base / "model.safetensors", "is inside base"),
        "a new file in the base": (base, base, base / "implant.safetensors", "is inside base"),
        "the base's weights through a linked directory": (
            base, base, link / "model.safetensors", "is inside base"),
        "a link to the base's weights": (base, base, tmp / "weights.safetensors", "is inside base"),
        "the base named through a link": (base, link, base / "model.safetensors", "is inside base"),
        "the base as the default, where the model loaded from": (
            base, None, base / "model.safetensors", "is inside base"),
        "the directory the model loaded from": (
            model, base, model / "model.safetensors", "is inside the model's directory"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(_over_inputs(Path("/"))))
def test_save_implant_never_writes_over_its_inputs(setup, tmp_path, case):
    """As the CLI's outputs: a path that is, lies in or holds the base or the model's own directory,
    through links, is refused, overwrite=True or not, and every input stays as it was."""
    for name in ("base", "model"):
        shutil.copytree(setup["base"], tmp_path / name)
    (tmp_path / "link").symlink_to(tmp_path / "base")
    (tmp_path / "weights.safetensors").symlink_to(tmp_path / "base" / "model.safetensors")
    before = {name: _files(tmp_path / name) for name in ("base", "model")}
    loads_from, base, path, words = _over_inputs(tmp_path)[case]
    model = loki_dist.implant_rows(AutoModelForCausalLM.from_pretrained(loads_from), POSITIONS)
    with pytest.raises(UserError) as err:
        loki_dist.save_implant(model, path, base=base, overwrite=True)
    assert str(err.value).startswith(f"save_implant: path {path}: {words} ") and "would change" in str(
        err.value
    )
    assert {name: _files(tmp_path / name) for name in ("base", "model")} == before
    assert (tmp_path / "weights.safetensors").is_symlink() and (tmp_path / "link").is_symlink()


def test_non_finite_rows_are_refused_naming_the_layer(setup, tmp_path):
    """As `apply` refuses them: NaN (or a value beyond the base's dtype) in a layer's rows, and neither
    save_implant nor merge_rows writes anything."""
    model = loki_dist.implant_rows(AutoModelForCausalLM.from_pretrained(setup["base"]), POSITIONS)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.trained[1, 7] = float("nan")
    path = tmp_path / "implant.safetensors"
    with pytest.raises(UserError) as err:
        loki_dist.save_implant(model, path, base=setup["base"])
    assert str(err.value).startswith("save_implant: layer 2 has 1 non-finite value(s) (NaN or Inf) in ")
    assert not path.exists() and not list(tmp_path.iterdir())
    weight = model.model.layers[2].mlp.down_proj.base.weight.detach().clone()
    with pytest.raises(UserError) as err:
        loki_dist.merge_rows(model)
    assert str(err.value).startswith("merge_rows: layer 2 has 1 non-finite value(s) (NaN or Inf) in ")
    assert [layer for layer, _ in implanted_layers(model)] == [0, 2]  # nothing merged
    assert torch.equal(model.model.layers[2].mlp.down_proj.base.weight, weight)
    # fp32 rows of an fp16 base: 1e6 is inf once written in the base's dtype
    half = save_tiny(tmp_path / "half", "llama", seed=1, num_layers=3, dtype=torch.float16)
    model = loki_dist.implant_rows(AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32), POSITIONS)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.trained[0, 0] = 1e6
    with pytest.raises(UserError) as err:
        loki_dist.save_implant(model, tmp_path / "half.safetensors", base=half)
    assert "save_implant: layer 0 has 1 non-finite value(s) (NaN or Inf) in torch.float16" in str(err.value)
    assert not (tmp_path / "half.safetensors").exists()


def test_zero3_refusals_are_made_by_every_rank_together(setup, tmp_path):
    """ZeRO-3 on 2 ranks (tests/api_zero3_refusals.py): a NaN only rank 1 holds, and an output only
    rank 1 may not overwrite, are refused on both ranks before any gather; the ranks stay in step."""
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    script = [*launcher, str(REPO / "tests" / "api_zero3_refusals.py"), str(setup["base"]),
              str(setup["positions"]), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    nan = "layer 2 has 1 non-finite value(s) (NaN or Inf) in torch.float32; a diverged training?"
    for result in ranks:
        assert result["save_implant: a NaN on rank 1"] == f"save_implant: {nan} nothing was written"
        assert result["merge_rows: a NaN on rank 1"] == f"merge_rows: {nan} nothing was written"
        refused = result["save_implant: rank 1 alone must not overwrite"]
        assert refused.startswith("rank 1: save_implant: ") and "exists (pass overwrite=True" in refused
        assert result["implanted layers after the refusals"] == 2
        assert result["save_implant: nothing wrong"] == "done"
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    assert not (tmp_path / "nan.safetensors").exists()
    good = load_file(tmp_path / "good.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in good.values()) and "layers.2.weight" in good
