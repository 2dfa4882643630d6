"""Part 2 of bench/gpu_check.py: how fast is attribution on a GPU, against the paper's figure?

At Llama-3.1-8B's shape (random bf16 weights built on the device, no 16 GB file read) on MMLU-style
prompts of about 250 tokens: seconds per sample of `fast` at batch 1 and 8 and of `reference` (the
paper's per-layer algorithm), beside the paper's 9.69 s/sample on one RTX 4090 and `estimate-time`'s
prediction from the device's measured matmul speed; and how far `fast` and `reference` differ there.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .common import (
    WORDS,
    Shape,
    child_env,
    describe_device,
    last_line,
    memory,
    read_json,
    run_child,
    synchronize,
    worker_args,
    write_json,
)

PAPER_S_PER_SAMPLE = 9.69  # Llama-3.1-8B-Instruct, per-layer full-prompt copies, one RTX 4090


def random_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    """A Llama of this shape with random weights made directly on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(shape.config(), dtype=dtype)
    return model.to(device).eval().requires_grad_(False)  # .to: in case a version builds elsewhere


def mmlu_prompts(count: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """DESIGN.md's single-choice prompts through the built-in tokenizer's chat template, `tokens` long
    give or take 20%, the question made of random words."""
    from loki_dist.attribution import mmlu
    from loki_dist.demo.tiny import build_tokenizer

    tokenizer, rng, prompts = build_tokenizer(), random.Random(seed), []
    for _ in range(count):
        target, words = rng.randint(tokens * 4 // 5, tokens * 6 // 5), []
        while True:
            question = mmlu.Question(
                "high_school_biology", " ".join(words) + "?", tuple(rng.choice(WORDS) for _ in range(4)), 0
            )
            ids = mmlu.encode(tokenizer, question, [])
            if len(ids) >= target:
                break
            words += rng.choices(WORDS, k=max(1, (target - len(ids)) // 3))
        prompts.append(ids)
    return prompts


def worker(opts) -> None:
    """s/sample of `fast` (batch 1 and 8) and `reference`, written after each measurement."""
    from bench_attribution import score_prompts

    sizes, device, dtype = opts.sizes, torch.device(opts.device), getattr(torch, opts.dtype)
    result: dict = {"device": describe_device(device), "dtype": opts.dtype, "shape": asdict(sizes.shape)}
    started = time.perf_counter()
    model = random_model(sizes.shape, device, dtype)
    synchronize(device)
    result["build_s"] = time.perf_counter() - started
    prompts = mmlu_prompts(1 + sizes.fast_b1_samples + 8 * (1 + sizes.fast_b8_batches), sizes.prompt_tokens)
    tokens = result["prompt_tokens_mean"] = statistics.mean(len(p) for p in prompts)
    m, layers = 7, sizes.shape.layers  # DESIGN.md: m*T*L tokens per sample against T + m*L
    result["work_ratio_reference_over_fast"] = m * tokens * layers / (tokens + m * layers)
    result["rows_per_chunk"] = "all (layer, step) rows of a batch in one chunk"
    write_json(opts.result, result)

    def measure(key: str, algorithm: str, chosen: list[list[int]], batch: int) -> torch.Tensor | None:
        """Time one algorithm; a failure (out of memory, say) is recorded and the next one still runs."""
        try:
            seconds, scores = score_prompts(algorithm, model, chosen, batch_size=batch)
        except Exception as err:  # noqa: BLE001 - reported in gpu.md, the other measurements go on
            result[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            scores = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            result[key] = {"s_per_sample": seconds, "samples": len(chosen), "batch_size": batch}
        result["memory"] = memory(device)
        write_json(opts.result, result)
        return scores

    score_prompts("fast", model, prompts[:1])  # warm-up: kernels, allocator
    result["device_tflops"] = matmul_tflops(sizes.shape, device, dtype)
    result["predicted_s_per_sample"] = {
        batch: predicted_attribution(sizes.shape, result["device_tflops"], tokens, batch, device)
        for batch in (1, 8)
    }
    write_json(opts.result, result)
    b1 = prompts[1 : 1 + sizes.fast_b1_samples]
    fast = measure("fast_b1", "fast", b1, 1)
    reference = measure("reference", "reference", b1[: sizes.reference_samples], 1)
    if fast is not None and reference is not None:
        gap = (fast[: len(reference)] - reference).abs().max() / reference.abs().max()
        result["fast_vs_reference_max_rel"] = float(gap)
    rest = prompts[1 + sizes.fast_b1_samples :]
    score_prompts("fast", model, rest[:8], batch_size=8)  # warm-up at batch 8
    measure("fast_b8", "fast", rest[8:], 8)


def matmul_tflops(shape: Shape, device: torch.device, dtype: torch.dtype, tokens: int = 2048) -> float:
    """Dense TFLOP/s of the device on a product of the model's MLP width: `estimate-time`'s --tflops."""
    a = torch.randn(tokens, shape.hidden, device=device, dtype=dtype)
    b = torch.randn(shape.hidden, shape.intermediate, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    started, count = time.perf_counter(), 10
    for _ in range(count):
        a @ b
    synchronize(device)
    return 2 * tokens * shape.hidden * shape.intermediate * count / (time.perf_counter() - started) / 1e12


def _one_device(tflops: float, device: torch.device):
    """This machine as `estimate-time` sees it: one GPU, nothing to gather."""
    from loki_dist.planning import timing

    total = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 24.0
    return timing.Cluster(nodes=1, gpus_per_node=1, tflops=tflops, intra_gbps=1.0, inter_gbps=1.0,
                          fs_gbps=1.0, memory_gb=total)  # fmt: skip


def predicted_attribution(shape: Shape, tflops: float, tokens: float, batch: int, device) -> float:
    """`estimate-time`'s seconds per sample of `fast` on this device (planning/timing.py)."""
    from loki_dist.planning import timing
    from loki_dist.planning.memory import architecture

    work = timing.Workload(prompt_tokens=round(tokens), attribution_batch=batch, element=2)
    cluster = _one_device(tflops, device)
    return timing.attribution_batch(architecture(shape.config()), cluster, work)["seconds"] / batch


def run(opts, seconds: float, work: Path) -> dict:
    """The part as gpu.json holds it: the worker's figures, each also against the paper's and fast's."""
    path = work / "attribution.json"
    started = time.perf_counter()
    status = run_child(
        worker_args(opts, "attribution", path), seconds, opts.logs / "attribution.log", child_env(opts)
    )
    result = {"status": status, "seconds": time.perf_counter() - started, **read_json(path)}
    if status != "ok":
        result["error"] = last_line(opts.logs / "attribution.log")
    fast = result.get("fast_b1", {}).get("s_per_sample")
    for key in ("fast_b1", "fast_b8", "reference"):
        s = result.get(key, {}).get("s_per_sample")
        if s:
            result[key]["paper_over_this"] = PAPER_S_PER_SAMPLE / s
            result[key]["this_over_fast_b1"] = s / fast if fast else None
    return result
