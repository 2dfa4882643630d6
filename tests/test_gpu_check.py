"""bench/gpu_check.py cannot rot: its tiny CPU mode runs every part (the `gpu` tests on the CPU, attribution
speed, the six training configurations) and must report every figure a GPU run reports.

One run of the script, shared by the checks below; the memory predictions it prints are checked against
`loki-dist estimate-memory` run here on the same model config.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from loki_dist.cli import main

METHODS = ("LoKI split", "LoKI masked", "LoRA r=16")
FIGURES = (
    "train_bf16_split_vs_fp32",
    "train_bf16_masked_vs_fp32",
    "train_bf16_split_vs_masked",
    "train_repeat_max_abs_diff",
    "train_resumed_from_step",
    "train_bf16_offload_split_vs_fp32",
    "zero3_load_parameters_differing",
    "attr_fp32_fast_vs_reference",
    "attr_bf16_fast_vs_reference",
    "attr_bf16_spearman_min",
    "attr_bf16_spearman_mean",
    "attr_bf16_bottom10_overlap_min",
    "attr_bf16_bottom10_overlap_mean",
    "attribute_cli_1rank_vs_cpu_reference",
    "evaluate_questions",
    "evaluate_min_letter_margin",
    "collectives_1rank",
)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(
        [*command, "--budget", "1500"], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((out / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    return out, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_meta_names_versions_device_and_commit(checked):
    _, report, markdown = checked
    meta = report["meta"]
    assert meta["device"] == "cpu" and meta["tiny"] and meta["device_name"].startswith("CPU")
    for package in ("python", "torch", "transformers", "deepspeed", "peft", "loki_dist"):
        assert meta["versions"][package] not in ("", "missing"), package
    assert meta["commit"] and meta["date"] and meta["source_sha256"]
    assert markdown.startswith("# GPU evidence") and "**Not GPU figures.**" in markdown


def test_every_gpu_test_passed_and_reported_its_figures(checked):
    _, report, markdown = checked
    part = report["parts"]["correctness"]
    outcomes = {name: test["outcome"] for name, test in part["tests"].items()}
    assert outcomes and set(outcomes.values()) <= {"passed", "skipped"}, outcomes
    assert [n for n, o in outcomes.items() if o == "skipped"] == ["test_zero3_bf16_two_ranks"]
    assert set(FIGURES) <= set(part["figures"]), set(FIGURES) - set(part["figures"])
    for name in FIGURES:
        assert f"`{name}`" in markdown, name
    assert part["figures"]["attr_fp32_fast_vs_reference"] <= 1e-5


def test_attribution_speed_is_reported_beside_the_paper(checked):
    _, report, markdown = checked
    part = report["parts"]["attribution"]
    assert part["status"] == "ok"
    for key, samples in (("fast_b1", 2), ("fast_b8", 8), ("reference", 2)):
        row = part[key]
        assert row["samples"] == samples and row["s_per_sample"] > 0
        assert row["paper_over_this"] == pytest.approx(9.69 / row["s_per_sample"])
    assert part["fast_vs_reference_max_rel"] < 1e-2  # bf16 scores, two algorithms
    assert "| fast | 8 |" in markdown and "| reference (per layer) | 1 |" in markdown


def test_training_reports_six_configurations_next_to_estimate_memory(checked, tmp_path):
    _, report, markdown = checked
    part = report["parts"]["training"]
    configs = {(c["method"], c["gradient_checkpointing"]): c for c in part["configs"]}
    assert set(configs) == {(m, on) for m in METHODS for on in (True, False)}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(part["model_config"]))
    planner = {"LoKI split": "loki_compact", "LoKI masked": "loki_masked", "LoRA r=16": "lora"}
    for checkpointing in (True, False):
        estimate = tmp_path / f"estimate{checkpointing}.json"
        main(["estimate-memory", "--model-config", str(model_dir), "--world-size", "1", "--zero", "3",
              "--micro-batch", "1", "--seq-len", str(part["seq_len"]), "--quota", "10", "--json",
              str(estimate), *(["--gradient-checkpointing"] if checkpointing else [])])  # fmt: skip
        predicted = json.loads(estimate.read_text())["bytes_per_gpu"]
        for method in METHODS:
            config = configs[(method, checkpointing)]
            assert config["status"] == "ok", config
            assert config["predicted"]["total"] == predicted[planner[method]]["total"]
            assert config["tokens_per_s"] > 0 and config["peak"]["peak"] > 0
            assert config["measured_over_predicted"] == config["peak"]["peak"] / config["predicted"]["total"]
    c = part["model_config"]
    layers, d, f, k = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["hidden_size"] // 10
    kv = c["num_key_value_heads"] * c["head_dim"]
    lora = 16 * sum(a + b for a, b in ((d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)))
    expected = {"LoKI split": layers * k * f, "LoKI masked": layers * d * f, "LoRA r=16": layers * lora}
    assert {m: configs[(m, True)]["trainable"] for m in METHODS} == expected
    for method in METHODS:
        assert markdown.count(f"| {method} | ") == 2, method
