"""`loki-dist estimate-memory` against DeepSpeed's estimators, real transformers models, docs/method.md's
reference facts, and the bytes of real tensors after an optimizer step on CPU."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from conftest import REPO, assert_user_error, free_port
from memory_probe import STAR_RANK, TINY
from transformers import AutoConfig, AutoModelForCausalLM

from loki_dist.demo.tiny import build_model, save_tiny, tiny_config
from loki_dist.planning.memory import (
    GIB,
    PRESETS,
    SUB_GROUP_SIZE,
    Setup,
    activation_bytes,
    architecture,
    estimate,
    loki_star_params,
    lora_params,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox")


def zero3_gradient_difference(trainable: int, world: int) -> int:
    """Ours minus DeepSpeed's estimator: 2 + 4 bytes (up to one sub-group) instead of 4 bytes per element."""
    per_rank = trainable // world
    return 2 * per_rank + 4 * min(per_rank, SUB_GROUP_SIZE) - 4 * per_rank


def model_state_bytes(estimate_of_method) -> int:
    return estimate_of_method.parameters + estimate_of_method.gradients + estimate_of_method.optimizer_state


# --- (a) DeepSpeed's own estimators ---------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(("nodes", "gpus_per_node"), [(1, 1), (1, 8), (8, 8)])
def test_full_finetuning_matches_deepspeed_model_state_estimators(preset, nodes, gpus_per_node):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    arch = architecture(PRESETS[preset])
    total, largest, world = arch.total_params, arch.largest_module_params, nodes * gpus_per_node
    sizes = dict(num_gpus_per_node=gpus_per_node, num_nodes=nodes)

    def ours(zero: int, offload: bool):
        return estimate(arch, Fraction(10), Setup(world_size=world, zero=zero, offload=offload))["full"]

    # ZeRO-3 without offload: 18 bytes/param sharded + 4 bytes/param of the largest module, on the GPU,
    # except that gradients are a 16-bit partition plus an fp32 sub-group copy instead of 4 bytes/param
    _, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, **sizes, cpu_offload=False)
    assert abs(model_state_bytes(ours(3, False)) - gpu - zero3_gradient_difference(total, world)) <= 2
    # ZeRO-3 offloading parameters and optimizer (ds_configs/zero3_offload.json), zero.Init
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, **sizes, cpu_offload=True, cpu_offload_params=True, zero_init=True
    )
    offloaded = ours(3, True)
    assert model_state_bytes(offloaded) == gpu
    # DeepSpeed's CPU figure is per node and carries its 1.5 buffer factor
    assert offloaded.cpu_offload * gpus_per_node * 1.5 == pytest.approx(cpu, rel=1e-9, abs=8)
    # ZeRO-2: the whole 16-bit model on every GPU, 16 bytes/param of gradients and Adam state sharded
    _, gpu = estimate_zero2_model_states_mem_needs(total, **sizes, cpu_offload=False)
    assert abs(model_state_bytes(ours(2, False)) - gpu) <= 2
    _, gpu = estimate_zero2_model_states_mem_needs(total, **sizes, cpu_offload=True)
    assert model_state_bytes(ours(2, True)) == gpu


def _deepspeed_table(function, *args) -> dict[str, float]:
    """The GPU column of an `*_all_cold` printout, keyed by its options text without spaces.

    DeepSpeed labels the column "GB" but divides by 2**30; on Python >= 3.12 its options read
    "OffloadDeviceEnum.cpu" where it means "cpu".
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        function(*args)
    rows = re.findall(r"^\s*[\d.]+GB \|\s*([\d.]+)GB \| (.+)$", out.getvalue(), flags=re.MULTILINE)
    return {re.sub(r"\s|OffloadDeviceEnum\.", "", options): float(gpu) for gpu, options in rows}


def test_printed_all_cold_tables_agree_for_llama_70b_on_64_gpus():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    arch = architecture(PRESETS["llama-3-70b"])
    total, largest = arch.total_params, arch.largest_module_params
    zero3 = _deepspeed_table(estimate_zero3_model_states_mem_needs_all_cold, total, largest, 8, 8)
    zero2 = _deepspeed_table(estimate_zero2_model_states_mem_needs_all_cold, total, 8, 8)

    def gib(zero: int, offload: bool, difference: int = 0) -> float:
        setup = Setup(world_size=64, zero=zero, offload=offload)
        return round((model_state_bytes(estimate(arch, Fraction(10), setup)["full"]) - difference) / GIB, 2)

    difference = zero3_gradient_difference(total, 64)
    assert gib(3, False, difference) == zero3["offload_param=none,offload_optimizer=none,zero_init=1"]
    assert gib(3, True) == zero3["offload_param=cpu,offload_optimizer=cpu,zero_init=1"]
    assert gib(2, False) == zero2["offload_optimizer=none"]
    assert gib(2, True) == zero2["offload_optimizer=cpu"]


# --- (b) parameter counts of real transformers models ----------------------------------------------------


def _meta_counts(config) -> tuple[int, int]:
    """Total parameters (shared ones once) and the largest module's own parameters, on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_equal_transformers_models(preset):
    arch = architecture(PRESETS[preset])
    assert (arch.total_params, arch.largest_module_params) == _meta_counts(
        AutoConfig.for_model(**PRESETS[preset])
    )


def test_published_sizes_of_presets():
    sizes = {name: architecture(config).total_params for name, config in PRESETS.items()}
    assert round(sizes["llama-3-8b"] / 1e9, 2) == 8.03
    assert round(sizes["llama-3-70b"] / 1e9, 2) == 70.55
    assert round(sizes["qwen2.5-0.5b"] / 1e6) == 494


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_family_counts_like_transformers(family):
    config = tiny_config(family, hidden_size=64, intermediate_size=96, num_layers=3)
    arch = architecture(config)
    assert (arch.total_params, arch.largest_module_params) == _meta_counts(config)


# --- (c) docs/method.md's reference figures ------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "quota", "rows", "millions"),
    [
        ("llama-3-8b", 10, 409, 188),
        ("llama-3-8b", 20, 819, 376),
        ("llama-3-8b", 30, 1228, 563),
        ("qwen2.5-0.5b", 5, 44, 5.1),
        ("qwen2.5-0.5b", 10, 89, 10.4),
        ("qwen2.5-0.5b", 20, 179, 20.9),
        ("qwen2.5-0.5b", 30, 268, 31.3),
    ],
)
def test_trainable_parameters_match_the_paper(preset, quota, rows, millions, tmp_path, capsys):
    from loki_dist.cli import main

    out = tmp_path / "memory.json"
    main(["estimate-memory", "--preset", preset, "--quota", str(quota), "--json", str(out)])
    numbers = json.loads(out.read_text())
    assert f"{rows} rows per layer" in capsys.readouterr().out
    assert numbers["rows_per_layer"] == rows
    trainable = numbers["bytes_per_gpu"]["loki_compact"]["trainable_params"]
    arch = architecture(PRESETS[preset])
    assert trainable == arch.num_layers * rows * arch.intermediate_size
    digits = 0 if millions >= 100 else 1
    assert round(trainable / 1e6, digits) == millions
    assert numbers["bytes_per_gpu"]["loki_masked"]["trainable_params"] == trainable


def test_loki_star_trains_the_papers_16m_parameters(tmp_path, capsys):
    """The paper's Table 2: LoKI*(q=30, r=32) on Llama-3.1-8B trains 16M parameters instead of LoKI
    q=30's 563M, 97.16% fewer: L * (k*r + r*F) = 32 * 32 * (1228 + 14336)."""
    from loki_dist.cli import main

    out = tmp_path / "memory.json"
    main(
        [
            "estimate-memory",
            "--preset",
            "llama-3-8b",
            "--quota",
            "30",
            "--lora-rank",
            "32",
            "--json",
            str(out),
        ]
    )
    assert "LoKI* r=32: A [1228, 32] and B [32, 14336] per layer" in capsys.readouterr().out
    numbers = json.loads(out.read_text())
    star = numbers["bytes_per_gpu"]["loki_star"]["trainable_params"]
    rows = numbers["bytes_per_gpu"]["loki_compact"]["trainable_params"]
    assert star == 32 * (1228 * 32 + 32 * 14336) == 15_937_536 and numbers["lora_rank"] == 32
    assert round(star / 1e6) == 16 and round(100 * (1 - star / rows), 1) == 97.2


# --- (d) real tensors on CPU ------------------------------------------------------------------------------


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_adamw_step(model: torch.nn.Module, params: list[torch.Tensor]) -> dict[str, int]:
    """Bytes of the parameters, gradients and AdamW state after one real training step."""
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    return {
        "parameters": _bytes(model.parameters()),
        "gradients": _bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_state": _adam_moment_bytes(optimizer),
    }


def _adam_moment_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Adam's two moments per trainable element (its 4-byte step counters are not model state)."""
    return _bytes(t for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))


def _predicted(model: torch.nn.Module, method: str, quota: int = 25) -> dict[str, int]:
    """fp32 on one rank, ZeRO-2 accounting: no sharding and no gathered working set, like plain torch."""
    setup = Setup(world_size=1, zero=2, precision="fp32")
    result = estimate(architecture(model.config), Fraction(quota), setup, star_rank=STAR_RANK)
    return {part: getattr(result[method], part) for part in ("parameters", "gradients", "optimizer_state")}


def _assert_exact(measured: dict[str, int], predicted: dict[str, int]) -> None:
    assert measured == {part: predicted[part] for part in measured}, (measured, predicted)


def test_full_finetuning_state_bytes_on_cpu():
    model = build_model("llama", **TINY).train()
    _assert_exact(_one_adamw_step(model, list(model.parameters())), _predicted(model, "full"))


def test_loki_masked_state_bytes_on_cpu():
    """Masked LoKI: dense gradient and dense AdamW state for every down_proj weight."""
    model = build_model("llama", **TINY).train()
    downs = [layer.mlp.down_proj.weight for layer in model.model.layers]
    model.requires_grad_(False)
    for weight in downs:
        weight.requires_grad_(True)
    _assert_exact(_one_adamw_step(model, downs), _predicted(model, "loki_masked"))


def test_loki_compact_state_bytes_on_cpu():
    """Compact LoKI's target: AdamW state for the selected rows only (a [k, F] tensor per layer)."""
    model = build_model("llama", **TINY).train()
    k = 25 * TINY["hidden_size"] // 100
    rows = [
        torch.nn.Parameter(layer.mlp.down_proj.weight[:k].detach().clone()) for layer in model.model.layers
    ]
    optimizer = torch.optim.AdamW(rows, lr=1e-3)
    sum(row.square().sum() for row in rows).backward()
    optimizer.step()
    predicted = _predicted(model, "loki_compact")
    assert predicted["optimizer_state"] == _adam_moment_bytes(optimizer)
    assert predicted["gradients"] == _bytes(row.grad for row in rows)


def test_loki_star_state_bytes_on_cpu():
    """LoKI* through the Python API: A and B beside the whole model, their gradients and AdamW state."""
    import loki_dist

    model = build_model("llama", **TINY).train()
    k = 25 * TINY["hidden_size"] // 100
    model = loki_dist.implant_rows(model, [list(range(k))] * TINY["num_layers"], rank=STAR_RANK)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == loki_star_params(architecture(model.config), k, STAR_RANK)
    _assert_exact(_one_adamw_step(model, trainable), _predicted(model, "loki_star"))


def test_lora_state_bytes_on_cpu():
    from peft import LoraConfig, get_peft_model

    base = build_model("llama", **TINY)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == lora_params(architecture(base.config))
    _assert_exact(_one_adamw_step(model, trainable), _predicted(base, "lora"))


def test_bf16_parameter_bytes():
    model = build_model("llama", **TINY).to(torch.bfloat16)
    setup = Setup(world_size=1, zero=2, precision="bf16")
    assert estimate(architecture(model.config), Fraction(25), setup)["full"].parameters == _bytes(
        model.parameters()
    )


def test_zero3_bf16_state_bytes_of_real_engines_and_the_trainer_on_2_ranks(tmp_path):
    """Per-rank bytes of the partitions real engines keep, against the ZeRO-3 bf16 estimate on 2 ranks
    (without the gathered working module, which is freed between modules): full fine-tuning, and
    loki_dist's own Trainer in both row layouts, whose optimizer state must differ by k/D = 1/4."""
    save_tiny(tmp_path / "base", "llama", **TINY)
    k = 25 * TINY["hidden_size"] // 100
    rows = list(range(0, TINY["hidden_size"], TINY["hidden_size"] // k))
    (tmp_path / "positions.json").write_text(json.dumps([rows] * TINY["num_layers"]))
    samples = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}"} for i in range(4)]
    (tmp_path / "data.json").write_text(json.dumps(samples))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(REPO / "tests" / "memory_probe.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    arch = architecture(build_model("llama", **TINY).config)
    predicted = estimate(arch, Fraction(25), Setup(world_size=2, zero=3), star_rank=STAR_RANK)
    largest_trainable = {"full": arch.largest_module_params, "loki_masked": arch.down_proj_params,
                         "loki_compact": k * arch.intermediate_size,
                         "loki_star": STAR_RANK * (k + arch.intermediate_size)}  # fmt: skip
    for rank in (0, 1):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured.keys() == largest_trainable.keys()
        for method, parts in measured.items():
            gathered = {
                "parameters": 2 * arch.largest_module_params,
                "gradients": 2 * largest_trainable[method],
            }
            for part, value in parts.items():
                ours = getattr(predicted[method], part) - gathered.get(part, 0)
                step_counter = 4 if part == "optimizer_state" else 0  # Adam's fp32 step, not modelled
                assert ours == value - step_counter, (rank, method, part, ours, value)
        # fp32 master and two moments, 12 bytes for each of this rank's half of the elements that train
        # (split: the selected rows; masked: whole down_proj weights), plus Adam's fp32 step count
        split, masked = measured["loki_compact"], measured["loki_masked"]
        selected = TINY["num_layers"] * k * TINY["intermediate_size"]
        assert split["optimizer_state"] == 12 * selected // 2 + 4
        assert masked["optimizer_state"] == 12 * TINY["num_layers"] * arch.down_proj_params // 2 + 4
        # the split layout's one cost: its rows are a parameter of their own beside the frozen weight
        # (16-bit, sharded; here 3.6% of the parameter bytes), which the estimate counts exactly
        assert split["parameters"] == masked["parameters"] + 2 * selected // 2
        extra = predicted["loki_compact"].parameters - predicted["loki_masked"].parameters
        assert extra == split["parameters"] - masked["parameters"]
        # LoKI*: fp32 master and moments for A and B only, which are parameters of their own too
        star = loki_star_params(arch, k, STAR_RANK)
        assert measured["loki_star"]["optimizer_state"] == 12 * star // 2 + 4
        assert measured["loki_star"]["parameters"] == masked["parameters"] + 2 * star // 2


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of every distinct storage autograd saves in one forward (parameters excluded), plus the
    logits the forward returns."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(input_ids=tokens, labels=tokens).logits
    saved[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["full", "loki_masked", "loki_star", "lora"])
def test_activation_bytes_saved_by_autograd_on_cpu(method, precision):
    """The formula against the tensors autograd really saves (CPU SDPA runs a flash kernel, like a GPU)."""
    from peft import LoraConfig, get_peft_model

    import loki_dist

    shapes = dict(num_layers=3, hidden_size=256, intermediate_size=688, vocab_size=512, num_heads=4)
    model = build_model("llama", **shapes, num_kv_heads=2)
    arch = architecture(model.config)
    model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32).train()
    if method == "loki_masked":
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.requires_grad_(True)
    if method == "loki_star":  # factors in the base dtype, as under DeepSpeed bf16
        model = loki_dist.implant_rows(model, [list(range(0, 256, 4))] * 3, rank=16)
    if method == "lora":  # adapters in the base dtype, as under DeepSpeed bf16
        lora = LoraConfig(r=16, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    tokens = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    setup = Setup(micro_batch=2, seq_len=128, precision=precision)
    predicted = activation_bytes(arch, setup, method, star_rank=16)
    assert predicted == pytest.approx(_saved_activation_bytes(model, tokens), rel=0.01)  # README: within 1%


# --- the command ---------------------------------------------------------------------------------------


def test_model_directory_and_table(tiny_llama, tmp_path, capsys):
    from loki_dist.cli import main

    main(["estimate-memory", "--model-config", str(tiny_llama), "--world-size", "2", "--quota", "25"])
    out = capsys.readouterr().out
    titles = ("LoKI masked", "LoKI compact", "LoKI* r=32", "full FT", "LoRA r=16")
    for text in ("per GPU (GiB)", "per GPU (bytes)", *titles):
        assert text in out
    total_row = next(line for line in out.splitlines() if line.startswith("total") and "," in line)
    assert len(total_row.split()) == 6


def test_checkpointing_and_offload_shrink_the_gpu_share():
    arch = architecture(PRESETS["llama-3-70b"])
    plain = estimate(arch, Fraction(10), Setup(world_size=64))
    checkpointed = estimate(arch, Fraction(10), Setup(world_size=64, gradient_checkpointing=True))
    offloaded = estimate(arch, Fraction(10), Setup(world_size=64, offload=True))
    for method in plain:
        assert checkpointed[method].activations < plain[method].activations / 5
        assert offloaded[method].total < plain[method].total
        assert offloaded[method].cpu_offload > 0
    assert plain["loki_compact"].optimizer_state < 0.15 * plain["loki_masked"].optimizer_state


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--preset", "llama-3-8b", "--quota", "0"], "--quota 0"),
        (["--preset", "llama-3-8b", "--quota", "0.01"], "selects no row"),
        (["--preset", "llama-3-8b", "--world-size", "0"], "--world-size 0"),
        (["--preset", "llama-3-8b", "--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
        # the byte counts are floats: 10**400 tokens was an OverflowError
        (["--preset", "llama-3-8b", "--seq-len", str(10**400)], "--seq-len: a number of 401 digits"),
        # Fraction('1e999999999') computes 10**999999999 (minutes and gigabytes)
        (["--preset", "llama-3-8b", "--quota", "1e999999999"], "--quota 1e999999999: must be in (0, 100]"),
        (["--model-config", "/nonexistent/config.json"], "--model-config /nonexistent"),
        (
            ["--preset", "qwen2.5-0.5b", "--json", "/dev/null/memory.json"],
            "/dev/null is a file, not a directory",
        ),
    ],
)
def test_user_errors(argv, needle, capsys):
    assert_user_error(["estimate-memory", *argv], capsys, needle)


def test_unsupported_model_type(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**PRESETS["llama-3-8b"], "model_type": "bert"}))
    assert_user_error(["estimate-memory", "--model-config", str(config)], capsys, "not supported")
