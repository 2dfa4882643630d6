"""The LoKI reference trains ToolACE with `llamafactory-cli train lf_config/ToolACE/toolace.yaml`, after its
train.sh has registered the data set in LLaMA-Factory's data/dataset_info.json as an `hf_hub_url` that
names a local directory. A user of the reference must be able to hand both to `loki-dist train --config`
as they are, changing only the model, output and DeepSpeed paths and adding `positions:` (issue 24.1).

The YAML below has the reference's keys and values, section by section; the DeepSpeed config is
LLaMA-Factory's own ZeRO-2 file (examples/deepspeed/ds_z2_config.json), in its shape. Read as Hugging
Face reads them: `save_steps: 0.99999` is a share of the total steps (one checkpoint, at the end),
`num_train_epochs: 3.0` three passes, `bf16: true` bf16 training, `plot_loss: true` training_loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_runconfig import run_in

from loki_dist.cli import main
from loki_dist.core.errors import UserError
from loki_dist.demo.tiny import save_tiny

REFERENCE_YAML = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
deepspeed: {deepspeed}
positions: positions.json

### dataset
dataset: ToolACE
template: llama3
cutoff_len: 8192
overwrite_cache: true
preprocessing_num_workers: 20
packing: false

### output
output_dir: {output}
logging_steps: 1
save_steps: 0.99999
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""

# what the reference's train.sh writes into LLaMA-Factory's data/dataset_info.json (the path is the
# directory holding the data set's files)
TRAIN_SH_INFO = """\
{{
  "ToolACE": {{
    "hf_hub_url": "{directory}",
    "formatting": "sharegpt",
    "columns": {{
      "messages": "conversations",
      "system": "system"
  }}
  }}
}}
"""

LLAMA_FACTORY_ZERO2 = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                          "overlap_comm": False, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                          "contiguous_gradients": True, "round_robin_gradients": True},
}  # fmt: skip
SAMPLES = 8  # two steps of 4 per pass


def _rows(count: int, offset: int = 0) -> list[dict]:
    """ToolACE's shape: a system prompt naming the tools, a human turn, the gpt turn calling one."""
    return [
        {
            "system": f"You may call get_weather(city). Case {i}.",
            "conversations": [
                {"from": "human", "value": f"Weather in city {i}?"},
                {"from": "gpt", "value": f'[get_weather(city="c{i}")]'},
            ],
        }
        for i in range(offset, offset + count)
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """LLaMA-Factory's working directory as train.sh leaves it: data/dataset_info.json naming the local
    ToolACE directory (a clone of the data set: its data file beside a README and a .git folder)."""
    root = tmp_path_factory.mktemp("reference")
    save_tiny(root / "models" / "base", "llama", seed=0)
    (root / "positions.json").write_text(json.dumps([[0, 3, 7], [1, 30]]))
    toolace = root / "ToolACE"
    (toolace / ".git").mkdir(parents=True)
    (toolace / ".git" / "config.json").write_text("{}")  # hidden: not a data file
    (toolace / "README.md").write_text("ToolACE, reformatted\n")
    (toolace / "data.json").write_text(json.dumps(_rows(SAMPLES)))
    (root / "data").mkdir()
    (root / "data" / "dataset_info.json").write_text(TRAIN_SH_INFO.format(directory=toolace))
    (root / "ds_z2_config.json").write_text(json.dumps(LLAMA_FACTORY_ZERO2, indent=2))
    yaml = REFERENCE_YAML.format(model="models/base", deepspeed="ds_z2_config.json", output="saves/toolace")
    (root / "toolace.yaml").write_text(yaml)
    return root


def test_the_reference_recipe_and_data_registration_train_unmodified(reference):
    proc = run_in(reference, ["train", "--config", "toolace.yaml"])
    out = reference / "saves" / "toolace"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 * SAMPLES // 4 and summary["samples"] == SAMPLES  # 3 passes, 4 a step
    # save_steps 0.99999 of 6 steps: every ceil(5.99994) = 6 steps, so one checkpoint, at the end
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # plot_loss
    assert "loss plot: " in proc.stdout
    ignored = [line.split()[3].rstrip(":") for line in proc.stderr.splitlines() if " ignoring " in line]
    assert ignored == ["trust_remote_code", "do_train", "finetuning_type", "overwrite_cache",
                       "preprocessing_num_workers", "ddp_timeout"]  # fmt: skip
    base = load_file(reference / "models/base/model.safetensors")
    trained = load_file(out / "final/model.safetensors")
    down = "model.layers.1.mlp.down_proj.weight"
    assert trained[down].dtype == base[down].dtype
    assert not base[down][30].equal(trained[down][30]), "the selected row did not train"
    assert base[down][29].equal(trained[down][29]) and base[down][31].equal(trained[down][31])


def _plan(root: Path, yaml: str, monkeypatch):
    """`train --config` planned in-process from `root` (every input read and checked; nothing trains)."""
    from loki_dist.cli import build_parser
    from loki_dist.core.distributed import World
    from loki_dist.core.runconfig import expand
    from loki_dist.implant.train import plan_run

    monkeypatch.chdir(root)
    (root / "run.yaml").write_text(yaml)
    parser = build_parser()
    plan = plan_run(parser.parse_args(expand(parser, ["train", "--config", "run.yaml"])), World(0, 1, 0))
    if plan.lock is not None:
        plan.lock.release()
    return plan


def test_what_hugging_face_reads_as_shares_and_fractions(reference, monkeypatch, capsys):
    """num_train_epochs 2.5 ends half-way through the third pass (HF rounds the steps up), warmup_steps
    replaces warmup_ratio, a share of steps is a share of them, val_size sets samples aside for the
    forgetting monitor, eval_dataset names them."""
    from loki_dist.implant.trainer.schedule import lr_at

    head = REFERENCE_YAML.format(model="models/base", deepspeed="none", output="saves/shares")
    yaml = head.replace("num_train_epochs: 3.0", "num_train_epochs: 2.5").replace("bf16: true", "bf16: false")
    plan = _plan(reference, yaml + "warmup_steps: 2\nval_size: 0.25\n", monkeypatch)
    # 8 samples, 2 held out (ceil(0.25 x 8)): 6 train, 1 step of 4 per pass, 2.5 passes -> 3 steps
    assert len(plan.examples) == 6 and len(plan.evals.task) == 2 and plan.total_steps == math.ceil(2.5 * 1)
    assert [plan.every(plan.args.save_steps), plan.every(plan.args.logging_steps)] == [3, 1]
    assert [lr_at(step, plan) for step in (1, 2)] == pytest.approx([0.5e-5, 1e-5])  # 2 warm-up steps
    info = json.loads((reference / "data" / "dataset_info.json").read_text())
    info["held_out"] = {"file_name": "held_out.json", "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "system": "system"}}  # fmt: skip
    (reference / "data" / "held_out.json").write_text(json.dumps(_rows(3, offset=100)))
    (reference / "data" / "dataset_info.json").write_text(json.dumps(info))
    plan = _plan(reference, yaml + "eval_dataset: [held_out]\neval_steps: 1\n", monkeypatch)  # a YAML list
    assert len(plan.examples) == SAMPLES and len(plan.evals.task) == 3 and plan.args.eval_steps == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # two held-out sets: one line, after the notes on ignored keys
        main(["train", "--config", "run.yaml", "--val-size", "0.5"])
    said = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and said[-1] == (
        "loki-dist train: error: --val-size and --eval-dataset: each names the held-out task set; "
        "give one of them"
    )


def test_a_hub_directory_reads_its_train_split_and_a_hub_name_is_still_refused(tmp_path, monkeypatch):
    from loki_dist.implant.data.dataset_info import conversations

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "data" / "train-00000-of-00001.json").write_text(json.dumps(_rows(3)))
    (hub / "data" / "test-00000-of-00001.json").write_text(json.dumps(_rows(2, offset=50)))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "local": {"hf_hub_url": str(hub), "formatting": "sharegpt", "columns": {"messages": "conversations"}},
        "sub": {"hf_hub_url": str(hub), "folder": "data", "formatting": "sharegpt",
                "columns": {"messages": "conversations"}},
        "remote": {"hf_hub_url": "Team-ACE/ToolACE", "formatting": "sharegpt"},
    }))  # fmt: skip

    def read(name: str) -> list:
        args = argparse.Namespace(dataset=name, dataset_dir=str(tmp_path), max_samples=None, mix_ratios=None)
        return conversations(args)

    for name in ("local", "sub"):
        assert [c.messages[0]["content"] for c in read(name)] == [f"Weather in city {i}?" for i in range(3)]
    monkeypatch.chdir(tmp_path)  # the hub name is no path here
    with pytest.raises(
        UserError, match="only hf_hub_url 'Team-ACE/ToolACE', and loki_dist reads local files"
    ):
        read("remote")
