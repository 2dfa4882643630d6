"""`--config FILE.yaml`: the file's keys are flags, the command line overrides them, mistakes are one line;
`train --config` also reads a LLaMA-Factory training YAML shaped like the LoKI reference's ToolACE one."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_user_error, cli_command
from safetensors.torch import load_file

from loki_dist.cli import build_parser, main
from loki_dist.core.runconfig import expand
from loki_dist.demo.tiny import save_tiny

# the reference trains with `llamafactory-cli train toolace.yaml`; this file has that shape (sections
# model / method / dataset / output / train), with a tiny model, loki_dist's `positions` and `deepspeed:
# none` (one plain process) so that it runs in seconds on a CPU
TOOLACE_SHAPED = """\
### model
model_name_or_path: base
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
deepspeed: none
positions: positions.json

### dataset
dataset: toolace_tiny
template: llama3
cutoff_len: 512
max_samples: 100000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/tiny/loki
logging_steps: 1
save_steps: 2
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-3
num_train_epochs: 2.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
"""
IGNORED = ["trust_remote_code", "do_train", "finetuning_type", "overwrite_cache", "preprocessing_num_workers",
           "ddp_timeout"]  # fmt: skip
# the same run as flags
AS_FLAGS = ["--model", "base", "--positions", "positions.json", "--ds-config", "none",
            "--dataset", "toolace_tiny", "--chat-template", "llama3", "--max-seq-len", "512",
            "--max-samples", "100000", "--logging-steps", "1", "--save-steps", "2", "--overwrite",
            "--micro-batch-size", "1", "--gradient-accumulation", "2", "--learning-rate", "1e-3",
            "--epochs", "2", "--lr-scheduler", "cosine", "--warmup-ratio", "0.1",
            "--precision", "fp32", "--plot-loss"]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A LLaMA-Factory-style working directory: the model, data/dataset_info.json, a sharegpt data set
    with `conversations` and `system` columns (as the reference's ToolACE), the positions."""
    root = tmp_path_factory.mktemp("lf")
    save_tiny(root / "base", "llama", seed=0)
    (root / "positions.json").write_text(json.dumps([[0, 3, 7], [1, 30]]))
    (root / "data").mkdir()
    info = {"toolace_tiny": {"file_name": "toolace_tiny.json", "formatting": "sharegpt",
                             "columns": {"messages": "conversations", "system": "system"}}}  # fmt: skip
    (root / "data" / "dataset_info.json").write_text(json.dumps(info))
    rows = [
        {
            "system": f"You may call get_weather(city). Case {i}.",
            "conversations": [
                {"from": "human", "value": f"Weather in city {i}?"},
                {"from": "gpt", "value": f'[get_weather(city="c{i}")]'},
            ],
        }
        for i in range(4)
    ]
    (root / "data" / "toolace_tiny.json").write_text(json.dumps(rows))
    (root / "toolace.yaml").write_text(TOOLACE_SHAPED)
    return root


def run_in(directory: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`loki-dist ARGS` run from `directory`, as a user of LLaMA-Factory runs it from theirs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        cli_command(args), cwd=directory, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_toolace_shaped_llamafactory_yaml_trains_as_its_flags_do(workdir):
    by_file = run_in(workdir, ["train", "--config", "toolace.yaml"])
    notes = [line for line in by_file.stderr.splitlines() if line.startswith("loki-dist train: ignoring ")]
    assert [line.split()[3].rstrip(":") for line in notes] == IGNORED, notes
    run_in(workdir, ["train", *AS_FLAGS, "--output-dir", "by_flags"])
    summary = json.loads((workdir / "saves/tiny/loki/train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples"] == 4  # 2 epochs of 4 samples, 2 per step
    for name in ("model.safetensors", "implant.safetensors"):
        file_run = load_file(workdir / "saves/tiny/loki/final" / name)
        flag_run = load_file(workdir / "by_flags/final" / name)
        assert file_run.keys() == flag_run.keys()
        for key, tensor in file_run.items():
            assert tensor.dtype == flag_run[key].dtype and tensor.equal(flag_run[key]), f"{name}: {key}"
    base = load_file(workdir / "base/model.safetensors")
    trained = load_file(workdir / "by_flags/final/model.safetensors")
    down = "model.layers.1.mlp.down_proj.weight"
    assert not base[down][30].equal(trained[down][30]), "the selected row did not train"


def parsed(argv: list[str]):
    parser = build_parser()
    return parser.parse_args(expand(parser, argv))


def test_keys_are_flags_in_either_spelling_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": "m", "positions": "p.json", "data": "d.jsonl", "output-dir": "out",
        "learning_rate": 0.002, "max-steps": 7, "gradient_checkpointing": True, "lr_scheduler": "linear",
        "seed": -3,
    }))  # fmt: skip
    args = parsed(["train", "--config", str(config)])
    assert (args.model, args.data, args.output_dir, args.learning_rate) == ("m", "d.jsonl", "out", 0.002)
    assert (args.max_steps, args.gradient_checkpointing, args.lr_scheduler, args.seed) == (
        7,
        True,
        "linear",
        -3,
    )
    over = parsed(
        ["train", "--learning-rate", "0.5", f"--config={config}", "--max-steps", "9", "--seed", "1"]
    )
    assert (over.learning_rate, over.max_steps, over.seed, over.model) == (0.5, 9, 1, "m")
    # other commands: lists for comma flags and repeated flags, choices, a switch off
    config.write_text(yaml.safe_dump({"model": "m", "prompt": ["hi", "more"], "max_new_tokens": 3}))
    assert parsed(["chat", "--config", str(config)]).prompt == ["hi", "more"]
    config.write_text(yaml.safe_dump({"model": "m", "data": "d", "output": "o", "subjects": ["a", "b"],
                                      "save_scores": False, "dtype": "float32"}))  # fmt: skip
    args = parsed(["attribute", "--config", str(config), "--dtype", "bfloat16"])
    assert (args.subjects, args.save_scores, args.dtype) == ("a,b", False, "bf16")


def test_one_precision_vocabulary_in_either_spelling_under_either_name(tmp_path, capsys):
    """train said --precision fp32, attribute --dtype float32: every command takes both names and both
    spellings, and reads them alike (issue 24.6)."""
    from loki_dist.core.modeling import torch_dtype

    train = ["train", "--model", "m", "--positions", "p", "--data", "d", "--output-dir", "o"]
    for words in (["--precision", "fp32"], ["--precision", "float32"], ["--dtype", "fp32"]):
        assert parsed([*train, *words]).precision == "fp32"
    for command in (["evaluate", "--model", "m", "--data", "d", "--output", "o"], ["chat", "--model", "m"]):
        for words in (["--dtype", "bfloat16"], ["--dtype", "bf16"], ["--precision", "bf16"]):
            assert torch_dtype(parsed([*command, *words]).dtype) == torch.bfloat16
    config = tmp_path / "run.yaml"
    config.write_text("dtype: bfloat16\n")
    assert parsed([*train, "--config", str(config)]).precision == "bf16"
    assert parsed(["estimate-memory", "--preset", "llama-3-8b", "--dtype", "float32"]).precision == "fp32"
    assert_user_error(
        [*train, "--precision", "fp16"], capsys, "--precision fp16: loki_dist trains in bf16 or fp32"
    )
    config.write_text("precision: int8\n")
    assert_user_error(
        [*train, "--config", str(config)], capsys, "`precision`: int8: expected one of auto, fp32"
    )


def test_a_config_drives_a_whole_command(tmp_path, capsys):
    config = tmp_path / "memory.yaml"
    out = tmp_path / "memory.json"
    config.write_text(f"preset: llama-3-8b\nworld-size: 4\nzero: 3\nquota: '10'\njson: {out}\n")
    main(["estimate-memory", "--config", str(config), "--world-size", "16"])
    assert json.loads(out.read_text())["setup"]["world_size"] == 16
    capsys.readouterr()


BAD = {
    "an unknown key": ({"learnin_rate": 0.1}, "unknown key `learnin_rate` for `loki-dist train`"),
    "a word for a number": ({"learning_rate": "fast"}, "`learning_rate`: expected a number, got str 'fast'"),
    "a float for an integer": ({"max_steps": 2.5}, "`max_steps`: expected an integer, got float 2.5"),
    "a string for a switch": ({"overwrite": "yes"}, "`overwrite`: expected true or false (a switch)"),
    "a value outside the choices": (
        {"lr_scheduler": "wavy"},
        "'wavy' is not one of cosine, linear, constant",
    ),
    "both spellings": ({"max_steps": 1, "max-steps": 2}, "`max_steps` and `max-steps` both set --max-steps"),
    "a list for one value": ({"model": ["a", "b"]}, "`model`: expected one value"),
    "no epochs": ({"num_train_epochs": 0.0}, "--epochs 0.0: expected a number of passes above 0"),
    "a fractional step count above 1": ({"save_steps": 2.5}, "`save_steps`: 2.5: expected a whole number"),
    "fp16": ({"fp16": True}, "fp16 True: loki_dist trains in bf16 or fp32"),
    "another scheduler": ({"lr_scheduler_type": "polynomial"}, "expected one of cosine, linear, constant, "),
    "another stage": ({"stage": "dpo"}, "stage 'dpo': loki_dist trains supervised (sft) only"),
    "a LLaMA-Factory key and its loki_dist flag": ({"cutoff_len": 64}, "`max_seq_len` and `cutoff_len` both"),
    "a template with no built-in": (
        {"template": "qwen3"},
        "template 'qwen3': no built-in loki_dist template",
    ),
    "a mixing strategy that repeats rows": ({"mix_strategy": "interleave_over"}, "mix_strategy 'interleave_"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_key_or_value_is_one_line_and_nothing_is_written(case, tmp_path, capsys):
    settings, expected = BAD[case]
    config = tmp_path / "run.yaml"
    base = {
        "model": "m",
        "positions": "p",
        "data": "d",
        "output_dir": str(tmp_path / "out"),
        "max_seq_len": 8,
    }
    config.write_text(yaml.safe_dump({**base, **settings}, sort_keys=False))
    assert_user_error(["train", "--config", str(config)], capsys, expected)
    assert not (tmp_path / "out").exists()


def test_file_level_mistakes_are_one_line(tmp_path, capsys):
    assert_user_error(
        ["select", "--config", str(tmp_path / "none.yaml")], capsys, "none.yaml: file not found"
    )
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert_user_error(["evaluate", "--config", str(tmp_path / "list.yaml")], capsys, "expected a mapping")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    assert_user_error(["export", "--config", str(tmp_path / "bad.yaml")], capsys, "not valid YAML")
    (tmp_path / "ok.yaml").write_text("quota: 10\n")
    argv = ["select", "--config", str(tmp_path / "ok.yaml"), "--config", str(tmp_path / "ok.yaml")]
    assert_user_error(argv, capsys, "--config given twice")


def test_the_example_llamafactory_yaml_reads_as_train_flags(capsys):
    from conftest import REPO

    args = parsed(["train", "--config", str(REPO / "examples" / "train_llamafactory.yaml")])
    assert (args.model, args.dataset, args.dataset_dir, args.chat_template) == (
        "Llama-3.1-8B-Instruct", "toolace", "data", "llama3")  # fmt: skip
    assert (args.epochs, args.precision, args.micro_batch_size, args.gradient_accumulation) == (
        2, "bf16", 1, 8)  # fmt: skip
    assert (args.max_seq_len, args.lr_scheduler, args.overwrite, args.ds_config) == (
        2048, "cosine", True, "ds_configs/zero3.json")  # fmt: skip
    assert "loki-dist train: ignoring finetuning_type: " in capsys.readouterr().err


def test_under_torchrun_a_config_mistake_is_said_once_and_ignored_keys_once(tmp_path):
    from conftest import run_cli

    config = tmp_path / "run.yaml"
    config.write_text("report_to: tensorboard\nmodel: m\nlearnin_rate: 0.1\n")
    proc = run_cli(["train", "--config", str(config)], nproc=2, check=False, timeout=120)
    said = [line for line in proc.stderr.splitlines() if line.startswith("loki-dist train: ")]
    assert proc.returncode != 0 and len(said) == 2, proc.stderr
    assert said[0].startswith("loki-dist train: ignoring report_to: ")
    assert said[1].startswith("loki-dist train: error: --config ") and "`learnin_rate`" in said[1]
    exit_codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr))  # torchrun's report per failed rank
    assert exit_codes == {"2"}, proc.stderr


def test_an_ignored_key_that_is_also_a_flag_is_the_flag_where_the_file_gives_its_inputs():
    from loki_dist.implant.data.llamafactory import translate

    settings, notes = translate({"eval_steps": 5, "do_eval": True}, "lf.yaml")  # nothing to evaluate
    assert settings == {} and [n.split(":")[0] for n in notes] == ["ignoring eval_steps", "ignoring do_eval"]
    settings, notes = translate({"eval_steps": 5, "val_size": 0.1}, "lf.yaml")  # LLaMA-Factory's split
    assert settings == {"eval_steps": 5, "val_size": 0.1} and notes == []
    settings, notes = translate({"eval_steps": 5, "eval_data": "held_out.jsonl"}, "run.yaml")  # the monitor's
    assert settings == {"eval_steps": 5, "eval_data": "held_out.jsonl"} and notes == []
