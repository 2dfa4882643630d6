"""Part 3 of bench/gpu_check.py: what does LoKI training cost on a GPU, in time and memory, against LoRA
and against what `loki-dist estimate-memory` predicts?

At Llama-3.1-8B's shape, ZeRO-3 on one device, bf16, q = 10, 2048-token sequences, micro-batch 1, with
and without gradient checkpointing: tokens/s and peak device memory of LoKI split, LoKI masked and LoRA
r=16, each configuration in its own worker (so its peak is its own) and next to the prediction for it; a
configuration predicted over MEMORY_MARGIN of the device's memory is reported instead of run.

The worker builds the 8B model's random weights on the device (loki_dist's loader, modeling.load_causal_lm,
is swapped for the same transformers call with `from_config` under ZeRO-3's zero.Init) instead of writing
and reading 16 GB of safetensors six times; everything after loading is `loki-dist train`'s own code
(bench/bench_training.py's Trainer subclasses and step loop).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import torch

from .common import (
    WORDS,
    Sizes,
    child_env,
    describe_device,
    last_line,
    memory,
    read_json,
    run_child,
    size_text,
    synchronize,
    worker_args,
    write_json,
)

QUOTA = Fraction(10)
METHODS = {"LoKI split": "loki_compact", "LoKI masked": "loki_masked", "LoRA r=16": "lora"}  # -> memory.py
PRECISION = {"bfloat16": "bf16", "float32": "fp32"}  # --dtype -> `loki-dist train --precision`


def prepare_training(sizes: Sizes, root: Path) -> None:
    """A model directory without weights (config and tokenizer), q=10 positions, 2048-token samples."""
    from loki_dist.demo.tiny import build_tokenizer

    shape, rng = sizes.shape, random.Random(0)
    model_dir = root / "model"
    shape.config().save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    k = int(QUOTA * shape.hidden / 100)
    rows = [sorted(rng.sample(range(shape.hidden), k)) for _ in range(shape.layers)]
    (root / "positions.json").write_text(json.dumps(rows))
    long_answer = lambda: " ".join(rng.choices(WORDS, k=sizes.seq_len))  # noqa: E731 (> seq_len tokens)
    samples = [{"instruction": "Explain.", "input": "", "output": long_answer()} for _ in range(8)]
    (root / "data.json").write_text(json.dumps(samples))


def random_causal_lm(model_dir, dtype: torch.dtype, ds_config: dict | None):
    """modeling.load_causal_lm with random weights: the same model class and zero.Init, no file read."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from loki_dist.core import dsconfig

    keep_alive = HfDeepSpeedConfig(ds_config) if dsconfig.zero_stage(ds_config) == 3 else None  # noqa: F841
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    return model.requires_grad_(False)


def worker(opts) -> None:
    """One method and checkpointing setting, as `loki-dist train` runs it, on a single rank."""
    from unittest import mock

    from bench_training import TRAINERS, timed_steps

    from loki_dist.cli import build_parser
    from loki_dist.core import distributed
    from loki_dist.implant import train
    from loki_dist.implant.trainer import model as trainer_module

    root, world = Path(opts.root), distributed.world_from_env()
    distributed.prepare_deepspeed(world)
    device = distributed.device_for(world)
    args = build_parser().parse_args(
        [
            "train",
            "--model",
            str(root / "model"),
            "--positions",
            str(root / "positions.json"),
            "--data",
            str(root / "data.json"),
            "--output-dir",
            str(root / "out"),
            "--max-seq-len",
            str(opts.sizes.seq_len),
            "--micro-batch-size",
            "1",
            "--gradient-accumulation",
            "1",
            "--precision",
            PRECISION[opts.dtype],
            *(["--gradient-checkpointing"] if opts.checkpointing else []),
        ]
    )
    with mock.patch.object(train, "check_weights", lambda *_, **__: []):  # weights are made in memory
        plan = train.plan_run(args, world)
    started = time.perf_counter()
    with mock.patch.object(trainer_module, "load_causal_lm", random_causal_lm):
        trainer = TRAINERS[opts.method](plan, device)
    synchronize(device)
    result = {
        "device": describe_device(device),
        "init_s": time.perf_counter() - started,
        "after_init": memory(device),
        "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.params),
    }
    write_json(opts.result, result)
    times, tokens = timed_steps(trainer, plan, opts.sizes.train_steps, warmup=1)
    step = statistics.median(times)
    result.update(
        step_s=step,
        tokens_per_s=statistics.median(tokens) / step,
        steps=len(times),
        tokens_per_step=statistics.median(tokens),
        peak=memory(device),
    )
    write_json(opts.result, result)
    distributed.shutdown()


def predicted_bytes(
    sizes: Sizes, config_json: Path, checkpointing: bool, precision: str
) -> dict[str, dict[str, int]]:
    """`loki-dist estimate-memory` for this configuration, per memory.py method, total and parts."""
    from loki_dist.planning import memory as planner

    config = json.loads(config_json.read_text())  # as `estimate-memory --model-config` reads it
    setup = planner.Setup(
        world_size=1,
        zero=3,
        micro_batch=1,
        seq_len=sizes.seq_len,
        gradient_checkpointing=checkpointing,
        precision=precision,
    )
    found = planner.estimate(planner.architecture(config), QUOTA, setup)
    return {name: {**asdict(e), "total": e.total} for name, e in found.items()}


def train_config(opts, root: Path, method: str, checkpointing: bool, seconds: float) -> dict:
    """One configuration in its own process (so that its peak memory is its own)."""
    slug = method.lower().replace(" ", "_").replace("=", "")
    name = f"{slug}-checkpointing_{'on' if checkpointing else 'off'}"
    path, log = root / f"{name}.json", opts.logs / f"train-{name}.log"
    extra = ["--method", method, "--root", str(root), *(["--checkpointing"] if checkpointing else [])]
    started = time.perf_counter()
    status = run_child(worker_args(opts, "train", path, *extra), seconds, log, child_env(opts))
    result = {"status": status, "seconds": time.perf_counter() - started, **read_json(path)}
    if status != "ok":
        result["error"] = last_line(log)
    return result


# a configuration runs only where `estimate-memory` predicts it within this share of the device's memory
# (the prediction leaves out the CUDA context, communication buffers and fragmentation): at 8B shape on
# an 80 GB H100 the largest, LoKI masked without checkpointing, is predicted at 55.8 GiB of 79
MEMORY_MARGIN = 0.9


def run(opts, seconds: float, work: Path, on_config) -> dict:
    """Every method with checkpointing on, then off; what the budget leaves out is marked as not run, and
    so is what would not fit the device with margin."""
    root, started = work / "train", time.perf_counter()
    prepare_training(opts.sizes, root)
    config_json = root / "model" / "config.json"
    precision = PRECISION[opts.dtype]
    device_bytes = torch.cuda.get_device_properties(0).total_memory if opts.device == "cuda" else None
    configs = []
    for checkpointing in (True, False):
        predicted = predicted_bytes(opts.sizes, config_json, checkpointing, precision)
        for method, planner_name in METHODS.items():
            config = {"method": method, "gradient_checkpointing": checkpointing,
                      "predicted": predicted[planner_name], "status": "not run: no time left"}  # fmt: skip
            left = seconds - (time.perf_counter() - started)
            if device_bytes and config["predicted"]["total"] > MEMORY_MARGIN * device_bytes:
                config["status"] = (
                    f"not run: predicted {size_text(config['predicted']['total'])}, over "
                    f"{MEMORY_MARGIN:.0%} of the device's {size_text(device_bytes)}"
                )
            elif left >= 10:
                config.update(train_config(opts, root, method, checkpointing, left))
            if "peak" in config:
                config["measured_over_predicted"] = config["peak"]["peak"] / config["predicted"]["total"]
            configs.append(config)
            on_config(configs)
    done = sum("peak" in c for c in configs)
    return {"status": f"{done} of {len(configs)} measured", "seconds": time.perf_counter() - started,
            "seq_len": opts.sizes.seq_len, "model_config": json.loads(config_json.read_text()),
            "configs": configs}  # fmt: skip
