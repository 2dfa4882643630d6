"""The small pieces the training recipe stands on, each against an obvious brute-force version."""

from __future__ import annotations

import itertools

import pytest
import torch

from loki_dist.core import dsconfig, families, positions
from loki_dist.core.errors import UserError
from loki_dist.demo.tiny import build_model, build_tokenizer
from loki_dist.implant.data.examples import IGNORE_INDEX, tokenize
from loki_dist.implant.data.rows import to_messages
from loki_dist.implant.trainer.partition import RowPartition


@pytest.mark.parametrize("world", [1, 2, 3, 5, 7])
def test_row_partition_matches_dense_mask(world):
    D, F = 11, 7
    selected = torch.zeros(D, dtype=torch.bool)
    selected[[0, 3, 4, 9, 10]] = True
    weight = torch.randn(D, F)
    dense = selected.unsqueeze(1).expand(D, F).reshape(-1)
    per_rank = -(-D * F // world)
    pieces = []
    for rank in range(world):
        part = RowPartition.of_rank(selected, F, rank, per_rank)
        local = torch.zeros(per_rank)
        flat = weight.view(-1)[part.start : part.start + part.length]
        local[: part.length] = flat
        expected = flat * dense[part.start : part.start + part.length]
        masked = local.clone()
        part.zero_unselected_(masked[: part.length])
        assert torch.equal(masked[: part.length], expected)
        taken = part.take(local[: part.length])
        assert torch.equal(taken, flat[dense[part.start : part.start + part.length]])
        assert taken.numel() == part.num_selected
        assert part.selected_before(part.start) == int(dense[: part.start].sum())
        pieces.append(taken)
        scaled = local.clone()
        part.scale_selected_(scaled[: part.length], 0.5)
        assert torch.equal(
            scaled[: part.length], torch.where(dense[part.start : part.start + part.length], flat * 0.5, flat)
        )
        restored = torch.zeros(per_rank)
        part.put_(restored[: part.length], taken)
        assert torch.equal(restored[: part.length], expected)
    assert torch.equal(torch.cat(pieces), weight[selected].reshape(-1))


@pytest.mark.parametrize("model_type", sorted(families.FAMILIES))
def test_every_family_exposes_its_down_projections(model_type):
    model = build_model(model_type, num_layers=2, hidden_size=32, intermediate_size=48)
    spec = families.spec_from_config(model.config)
    named = dict(model.named_parameters())
    projections = families.down_projections(model)
    assert len(projections) == spec.num_layers == 2
    for layer, proj in enumerate(projections):
        assert proj.weight.shape == (spec.hidden_size, spec.intermediate_size) == (32, 48)
        assert named[spec.down_proj_name(layer)] is proj.weight
        assert spec.layer_of(spec.down_proj_name(layer)) == layer


def test_unsupported_model_type_lists_supported_ones():
    with pytest.raises(UserError, match=r"'bert' is not supported; supported model types: gemma2, .*llama"):
        families.spec_from_config({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 8})


def test_positions_validation():
    spec = families.ModelSpec("llama", num_layers=2, hidden_size=8, intermediate_size=4)
    assert positions.validate([[3, 1], []], spec) == [[1, 3], []]
    for bad, message in [
        ([[1]], "has 1 layer lists but the model has 2 layers"),
        ([[1], [8]], "index 8, outside \\[0, 8\\)"),
        ([[1, 1], []], "lists index 1 more than once"),
        ([[1.5], []], "non-integer index"),
        ({"0": [1]}, "expected a JSON list"),
    ]:
        with pytest.raises(UserError, match=message):
            positions.validate(bad, spec)


def test_only_assistant_tokens_are_labelled():
    tokenizer = build_tokenizer()
    messages = to_messages(
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "A1"},
                {"from": "human", "value": "more"},
                {"from": "gpt", "value": "B2"},
            ]
        },
        0,
    )
    example, truncated = tokenize(tokenizer, messages, max_len=1000)
    assert not truncated
    labelled = tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    )
    assert labelled == "A1<|end|>\nB2<|end|>\n"
    cut, truncated = tokenize(tokenizer, messages, max_len=5)
    assert truncated and len(cut.input_ids) == 5


def test_alpaca_rows_become_chat_turns():
    row = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert to_messages(row, 0) == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    with pytest.raises(UserError, match="row 4 has no assistant turn"):
        to_messages({"messages": [{"role": "user", "content": "x"}]}, 4)


def test_ds_config_values_and_flags_must_agree():
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto",
        "bf16": {"enabled": "auto"},
    }
    assert dsconfig.settle(config, "train_micro_batch_size_per_gpu", "--micro-batch-size", None, 1) == 4
    assert dsconfig.settle(config, "train_micro_batch_size_per_gpu", "--micro-batch-size", 4, 1) == 4
    assert dsconfig.settle(config, "gradient_accumulation_steps", "--gradient-accumulation", None, 1) == 1
    assert dsconfig.settle(config, "bf16.enabled", "--precision", True, False) is True
    with pytest.raises(UserError, match="--micro-batch-size 2 contradicts train_micro_batch_size_per_gpu=4"):
        dsconfig.settle(config, "train_micro_batch_size_per_gpu", "--micro-batch-size", 2, 1)
    for name in ("zero3", "zero2", "zero3_offload", "ds_configs/zero3.json"):
        assert dsconfig.zero_stage(dsconfig.load(name)) in (2, 3)
    assert dsconfig.load("none") is None


def test_tiny_tokenizer_is_deterministic_and_total():
    a, b = build_tokenizer(), build_tokenizer()
    text = "Ünïcode ✓ and 数字 123"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text)["input_ids"]) == text
    assert list(itertools.islice(a.get_vocab(), 1))  # non-empty vocabulary


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_learning_rate_schedules(scheduler):
    from types import SimpleNamespace

    from loki_dist.implant.trainer.schedule import lr_at

    args = SimpleNamespace(learning_rate=0.1, warmup_ratio=0.1, warmup_steps=0, lr_scheduler=scheduler)
    plan = SimpleNamespace(total_steps=100, args=args)
    rates = [lr_at(step, plan) for step in range(101)]
    assert rates[0] == 0.0 and rates[5] == pytest.approx(0.05) and rates[10] == pytest.approx(0.1)
    middle = {"cosine": 0.05, "linear": 0.05, "constant": 0.1}[scheduler]
    assert rates[55] == pytest.approx(middle)
    assert rates[100] == pytest.approx(0.1 if scheduler == "constant" else 0.0, abs=1e-12)
    # --warmup-steps (HF's warmup_steps: a count, or a share below 1) replaces the ratio where above 0
    for steps in (20, 0.2):
        args.warmup_steps = steps
        assert [lr_at(s, plan) for s in (10, 20)] == pytest.approx([0.05, 0.1])


INTERNALS_PROBE = """
import torch, deepspeed
from loki_dist.core import distributed
from loki_dist.implant.trainer import rowstate
from loki_dist.demo.tiny import build_model

distributed.prepare_deepspeed(distributed.World(0, 1, 0))
for stage, attribute in ((2, "_hp_mapping"), (3, "ds_tensor")):
    model = build_model("llama").requires_grad_(False)
    weight = model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW([weight]), config=config)
    rowstate.check_deepspeed_internals(engine)
    print(f"stage {stage}: ok", flush=True)
    delattr(weight, attribute)  # what an upgrade that renamed it would look like
    try:
        rowstate.check_deepspeed_internals(engine)
    except RuntimeError as err:
        print(f"stage {stage}: {err}", flush=True)
"""


def test_deepspeed_internals_are_there_and_a_missing_one_is_named(tmp_path):
    """Real ZeRO-2 and ZeRO-3 engines carry every private attribute loki_dist reads; removing one gives
    an error naming it and the tested DeepSpeed range, which is the range pyproject.toml pins."""
    import subprocess
    import sys

    import tomllib
    from conftest import REPO

    from loki_dist.implant.trainer.rowstate import TESTED_DEEPSPEED

    probe = tmp_path / "probe.py"
    probe.write_text(INTERNALS_PROBE)
    proc = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stage ")]
    assert proc.returncode == 0 and len(lines) == 4, proc.stdout + proc.stderr[-3000:]
    assert lines[0] == "stage 2: ok" and lines[2] == "stage 3: ok"
    for line, attribute in ((lines[1], "'_hp_mapping'"), (lines[3], "'ds_tensor'")):
        assert f"has no attribute {attribute}" in line and ",".join(TESTED_DEEPSPEED) in line, line
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"deepspeed{','.join(TESTED_DEEPSPEED)}" in pinned


def test_every_flag_with_a_default_says_it_in_help():
    """`loki-dist CMD --help` names the default of every flag that has one (a user should not have to
    read the source to learn that --save-steps is 500)."""
    import argparse
    import re

    from loki_dist.cli import COMMANDS, build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in COMMANDS:
        parser = commands.choices[name]
        text = parser.format_help().split("options:", 1)[1]
        blocks = [block for block in re.split(r"\n  (?=-)", text) if block.strip()]
        blocks = {block.split()[0].rstrip(","): block for block in blocks}
        for action in parser._actions:
            default = action.default
            if default is None or default is False or default == argparse.SUPPRESS:
                continue
            block = blocks[action.option_strings[0]]
            assert "default" in block.lower(), (name, action.option_strings[0], block)


def test_shared_flags_are_declared_once_and_read_alike():
    """A flag several commands take means one thing: core/flags.py alone declares it, so its type and
    choices agree in every command (a second declaration would drift, as --dtype's help once did)."""
    import argparse
    import re

    from conftest import REPO

    from loki_dist.cli import build_parser

    shared = ("--overwrite", "--dtype", "--precision", "--ds-config", "--max-seq-len")
    pattern = re.compile(r"add_argument\(\s*\"(" + "|".join(shared) + ')"')
    for path in (REPO / "loki_dist").rglob("*.py"):
        if path.name != "flags.py":
            assert not pattern.search(path.read_text()), f"{path} declares a shared flag itself"
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for flag in shared:
        kinds = {
            name: (type(action), action.type, action.choices)
            for name, parser in commands.choices.items()
            for action in parser._actions
            if flag in action.option_strings
        }
        assert len(kinds) >= 2 and len(set(kinds.values())) == 1, (flag, kinds)


def test_zero3_settings_follow_the_model_and_the_nodes(monkeypatch):
    """Prefetch one layer, two layers live, reuse within one, norms persistent: filled where the config
    says auto or leaves them out, never over a concrete value; ZeRO++'s in-node copy only where the job
    spans several nodes of several ranks (torchrun's LOCAL_WORLD_SIZE, srun's tasks per node)."""
    from loki_dist.core import distributed, dsconfig

    config = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto",
                                    "stage3_max_reuse_distance": 7}}  # fmt: skip
    zero = dsconfig.size_zero3(config, layer_params=1000, hidden=16)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 1000 and zero["stage3_max_live_parameters"] == 2000
    assert zero["stage3_max_reuse_distance"] == 7  # the user's value stays
    assert zero["stage3_param_persistence_threshold"] == 160
    assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == "auto"  # a copy, not in place
    hpz = "zero_hpz_partition_size"
    assert dsconfig.in_node_partition(config, 8, 32)["zero_optimization"][hpz] == 8
    for ranks_per_node, world in ((8, 8), (1, 4), (3, 8)):  # one node; one rank a node; uneven nodes
        assert hpz not in dsconfig.in_node_partition(config, ranks_per_node, world)["zero_optimization"]
    given = {"zero_optimization": {"stage": 3, hpz: 1}}
    assert dsconfig.in_node_partition(given, 8, 32)["zero_optimization"][hpz] == 1
    world = distributed.World(rank=0, size=32, local_rank=0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.ranks_per_node(world) == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "32")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x4)")
    assert distributed.ranks_per_node(world) == 8


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["train"], "loki-dist train: error: the following arguments are required: --model, --positions, "
                    "--output-dir"),
        (["select", "--quota"], "loki-dist select: error: argument --quota: expected one argument"),
        (["select", "--quota", "5", "--output", "p.json", "--strategy", "best"],
         "loki-dist select: error: argument --strategy: invalid choice: 'best' (choose from "
         "'layer_balanced', 'global_lowest', 'global_highest', 'random')"),
        (["select", "--quota", "5", "--output", "p.json", "--seed", "x"],
         "loki-dist select: error: argument --seed: invalid int value: 'x'"),
        (["select", "--quota", "5", "--output", "p.json", "--bogus"],
         "loki-dist select: error: unrecognized arguments: --bogus"),
        ([], "loki-dist: error: the following arguments are required: COMMAND"),
    ],
)  # fmt: skip
def test_argparse_mistakes_are_one_line_and_help_is_whole(argv, line, capsys):
    """argparse's own refusals read as loki_dist's: one line naming the flag, exit status 2, without the
    usage argparse prints first (30 lines for train); `--help` still prints everything."""
    from loki_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:1], "--help"])
    said = capsys.readouterr().out
    assert exit_info.value.code == 0 and said.startswith("usage: loki-dist") and "options:" in said
