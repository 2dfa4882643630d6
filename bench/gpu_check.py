"""GPU evidence in one command: every CUDA path of loki_dist exercised and measured in about 6 minutes.

    python bench/gpu_check.py [--out bench] [--budget 330]        # on a GPU machine
    python bench/gpu_check.py --device cpu --tiny --out out/gpu     # the same code at tiny sizes (CI)

Parts, in order, each in its own processes under its own share of the time budget (a part that ends
early leaves its time to the next ones):
  1. correctness: `pytest -m gpu tests/test_gpu.py` (ZeRO-3 bf16 training, with CPU offload too, the
     ZeRO-3 loader, attribution, evaluation and collectives on the device; the tests record what they
     measure). All its processes start at once (one launcher), most valuable tests first, so that a run
     cut short by the budget has checked the most;
  2. attribution speed at Llama-3.1-8B shape with random bf16 weights built on the device, on MMLU-style
     prompts of ~250 tokens: `fast` at batch 1 and 8 and `reference`, beside the paper's 9.69 s/sample;
  3. training at 8B shape: ZeRO-3 on one device, bf16, q=10, 2048-token sequences, micro-batch 1, with
     and without gradient checkpointing: tokens/s and peak device memory of LoKI split, LoKI masked and
     LoRA r=16, each next to `loki-dist estimate-memory`'s prediction for the same configuration;
  4. versions, device, date and commit.
OUT/gpu.json and OUT/gpu.md are rewritten after every part and every training configuration, and each
child's output goes to OUT/logs/, so a part that fails or runs out of time costs only itself. Nothing
here names a device, backend or dtype beyond --device and --dtype: loki_dist picks NCCL or gloo itself.

Part 3 builds the 8B model's random weights on the device (loki_dist's loader, modeling.load_causal_lm,
is swapped for the same transformers call with `from_config` under ZeRO-3's zero.Init) instead of
writing and reading 16 GB of safetensors six times; everything after loading is `loki-dist train`'s own
code (bench/bench_training.py's Trainer subclasses and step loop).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]  # the checkout's loki_dist (it need not be installed), bench_*.py
PARTS = ("correctness", "attribution", "training")
SHARE = {"correctness": 0.36, "attribution": 0.23}  # of the budget; training gets what is left
PAPER_S_PER_SAMPLE = 9.69  # Llama-3.1-8B-Instruct, per-layer full-prompt copies, one RTX 4090
QUOTA = Fraction(10)
METHODS = {"LoKI split": "loki_compact", "LoKI masked": "loki_masked", "LoRA r=16": "lora"}  # -> memory.py
WORDS = ["the", "of", "cell", "energy", "group", "ring", "god", "faith", "number", "prime", "protein",
         "water", "light", "field", "root", "which"]  # fmt: skip
PRECISION = {"bfloat16": "bf16", "float32": "fp32"}  # --dtype -> `loki-dist train --precision`


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int

    def config(self):
        from loki_dist.demo.tiny import tiny_config

        return tiny_config(
            "llama",
            vocab_size=self.vocab,
            num_layers=self.layers,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            max_positions=8192,
        )


@dataclass(frozen=True)
class Sizes:
    """What each part runs: Llama-3.1-8B's shape on a GPU, a tiny one for `--tiny`."""

    shape: Shape
    prompt_tokens: int  # attribution prompts: about this long (0.8x to 1.2x)
    fast_b1_samples: int  # timed at batch 1, after one warm-up sample
    fast_b8_batches: int  # timed batches of 8, after one warm-up batch
    reference_samples: int
    seq_len: int  # training sequence length
    train_steps: int  # timed optimizer steps, after one warm-up step


FULL = Sizes(Shape(32, 4096, 14336, 128256, 32, 8), 250, 4, 2, 2, 2048, 3)
TINY = Sizes(Shape(2, 64, 176, 512, 4, 2), 48, 2, 1, 2, 128, 2)


# ---------------------------------------------------------------------------------------------- helpers


def write_json(path: Path, value) -> None:
    from loki_dist.core import files

    files.write_json(path, value, indent=1)


def memory(device: torch.device) -> dict[str, int | str]:
    """Bytes in use now and at peak: the allocator's on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return {
            "source": "torch.cuda.max_memory_allocated",
            "now": torch.cuda.memory_allocated(device),
            "peak": torch.cuda.max_memory_allocated(device),
        }
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = {key: int(status[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}
    return {"source": "peak resident set (CPU)", "now": kib["VmRSS"], "peak": kib["VmHWM"]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _descendants(pid: int) -> list[int]:
    """Every process below pid (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def run_child(args: list[str], timeout: float, log: Path, env: dict[str, str]) -> str:
    """Run `python ARGS` in the checkout; 'ok', 'failed (exit N)' or 'timed out after S s'."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout:.0f} s"
    return "ok" if code == 0 else f"failed (exit {code})"


def child_env(opts) -> dict[str, str]:
    """The checkout's loki_dist first; CUDA hidden for --device cpu (so loki_dist takes the CPU and gloo)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def worker_args(opts, worker: str, result: Path, *extra: str) -> list[str]:
    common = ["--device", opts.device, "--dtype", opts.dtype, *(["--tiny"] if opts.tiny else [])]
    return [__file__, "--worker", worker, "--result", str(result), *common, *extra]


def last_line(log: Path) -> str:
    """The last non-empty line a failed child wrote (its exception, usually)."""
    lines = [line for line in log.read_text(errors="replace")[-20000:].splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------ 1. correctness


class _Recorder:
    """pytest plugin: one JSON line per test phase as it ends, so a run cut short keeps what it did."""

    def __init__(self, path: Path):
        self.path = path

    def pytest_runtest_logreport(self, report) -> None:
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        elif report.failed:
            message = report.longreprtext.strip().splitlines()[-1]
        entry = {"test": report.nodeid.split("::", 1)[-1], "when": report.when, "outcome": report.outcome,
                 "seconds": report.duration, "message": message[:400]}  # fmt: skip
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


def correctness_worker(opts) -> None:
    import pytest

    os.environ["LOKI_GPU_FIGURES"] = str(opts.result)
    os.environ["LOKI_GPU_TEST_DEVICE"] = opts.device
    args = [str(REPO / "tests" / "test_gpu.py"), "-m", "gpu", "-v", "-p", "no:cacheprovider"]
    sys.exit(pytest.main(args, plugins=[_Recorder(opts.result)]))


def correctness(opts, seconds: float, work: Path) -> dict:
    lines = work / "correctness.jsonl"
    started = time.perf_counter()
    status = run_child(
        worker_args(opts, "correctness", lines), seconds, opts.logs / "correctness.log", child_env(opts)
    )
    tests, figures = {}, {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    for line in lines.read_text().splitlines() if lines.exists() else []:
        entry = json.loads(line)
        if "name" in entry:
            figures[entry["name"]] = entry["value"]
            continue
        test = tests.setdefault(entry["test"], {"outcome": "passed", "seconds": 0.0, "message": ""})
        test["seconds"] += entry["seconds"]
        if rank[entry["outcome"]] > rank[test["outcome"]]:
            test.update(outcome=entry["outcome"], message=entry["message"])
    counts = {o: sum(t["outcome"] == o for t in tests.values()) for o in ("passed", "failed", "skipped")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no test ran"
    if status not in ("ok", "failed (exit 1)"):  # exit 1 is pytest's "some tests failed", shown above
        summary += f"; pytest {status}"
    return {"status": summary, "seconds": time.perf_counter() - started, "tests": tests, "figures": figures}


# ------------------------------------------------------------------------------------ 2. attribution


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


def attribution_worker(opts) -> None:
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


def attribution(opts, seconds: float, work: Path) -> dict:
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


# --------------------------------------------------------------------------------------- 3. training


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


def training_worker(opts) -> None:
    """One method and checkpointing setting, as `loki-dist train` runs it, on a single rank."""
    from unittest import mock

    from bench_training import TRAINERS, timed_steps

    from loki_dist.cli import build_parser
    from loki_dist.core import distributed
    from loki_dist.implant import train
    from loki_dist.implant import trainer as trainer_module

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


def training(opts, seconds: float, work: Path, on_config) -> dict:
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
                config["status"] = (f"not run: predicted {_size(config['predicted']['total'])}, over "
                                    f"{MEMORY_MARGIN:.0%} of the device's {_size(device_bytes)}")  # fmt: skip
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


# ----------------------------------------------------------------------------------------- 4. report


def versions() -> dict[str, str]:
    import loki_dist

    found = {
        "python": platform.python_version(),
        "loki_dist": loki_dist.__version__,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
    }
    for package in ("transformers", "deepspeed", "accelerate", "peft", "safetensors", "pytest"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "missing"
    return found


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    except OSError:  # no git on the machine
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def source_identity(given: str | None) -> dict[str, str]:
    """The commit (from git, or --commit where the checkout has no .git) and a digest of the sources."""
    digest = hashlib.sha256()
    tests = [REPO / "tests" / name for name in ("test_gpu.py", "gpu_launch.py", "zero3_load_check.py")]
    for path in sorted([*REPO.glob("loki_dist/**/*.py"), *BENCH.glob("*.py"), *tests]):
        digest.update(path.read_bytes())
    commit = given or _git("rev-parse", "HEAD") or "unknown (no git checkout; pass --commit)"
    if given is None and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    return {"commit": commit, "source_sha256": digest.hexdigest()[:16]}


FIGURE_NOTES = {
    "train_bf16_split_vs_fp32": "bf16 split rows' updates vs an fp32 run, norm(a-b)/norm(b)",
    "train_bf16_masked_vs_fp32": "bf16 masked rows' updates vs the fp32 run",
    "train_bf16_split_vs_masked": "bf16 split vs bf16 masked updates",
    "train_bf16_split_2ranks_vs_fp32": "bf16 split on 2 ranks vs the 1-rank fp32 run",
    "attribute_cli_1rank_vs_cpu_reference": "`attribute` (ZeRO-3, fp32) on the device vs CPU reference",
    "attribute_cli_2rank_vs_cpu_reference": "the same on 2 ranks",
    "collectives_1rank": "every collectives.py collective, device and CPU tensors, 1 rank",
    "collectives_2rank": "the same on 2 ranks (NCCL needs 2 devices: it refuses 2 ranks on one GPU)",
    "train_repeat_max_abs_diff": "two identical bf16 runs (deterministic kernels): largest weight difference",
    "train_resumed_from_step": "checkpoint the SIGKILLed run resumed from (then bit-identical)",
    "train_bf16_offload_split_vs_fp32": "bf16 split rows under zero3_offload vs the fp32 run",
    "zero3_load_parameters_differing": "parameters the ZeRO-3 loader filled unlike from_pretrained (0)",
    "attr_fp32_fast_vs_reference": "fp32 fast vs reference, max |diff| / max |ref| (limit 1e-5)",
    "attr_bf16_fast_vs_reference": "bf16 fast vs bf16 reference, max |diff| / max |ref|",
    "attr_bf16_spearman_min": "bf16 fast vs fp32: per-layer Spearman of summed scores, worst layer",
    "attr_bf16_spearman_mean": "... mean over layers",
    "attr_bf16_bottom10_overlap_min": "bf16 vs fp32: shared share of the bottom-10% nodes, worst layer",
    "attr_bf16_bottom10_overlap_mean": "... mean over layers",
    "evaluate_questions": "questions evaluated on the device, all equal to the CPU's letters",
    "evaluate_min_letter_margin": "smallest log-likelihood gap between the top two letters (CPU)",
}


def _cell(text: object) -> str:
    """Text for a markdown table cell: a `|` would end the cell."""
    return str(text).replace("|", "\\|")


def _size(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def markdown(report: dict) -> str:
    meta, parts = report["meta"], report["parts"]
    v = meta["versions"]
    gpu = meta["device"] == "cuda" and not meta["tiny"]
    head = ["# GPU evidence: `bench/gpu_check.py`", ""]
    if not gpu:
        flags = f"--device {meta['device']}" + (" --tiny" if meta["tiny"] else "")
        head += [
            f"**Not GPU figures.** This run used `{flags}`: it shows that the script and the code paths "
            "work, nothing about speed or memory on a GPU.",
            "",
        ]
    head += [
        f"Run {meta['date']} on {meta.get('device_name', 'unknown')}; Python {v['python']}, "
        f"torch {v['torch']} (CUDA {v['cuda']}), transformers {v['transformers']}, "
        f"DeepSpeed {v['deepspeed']}, peft {v['peft']}; "
        f"loki_dist {v['loki_dist']} at {meta['commit']} (sources {meta['source_sha256']}). "
        f"Wall time {meta.get('wall_s', 0):.0f} s of a {meta['budget_s']:.0f} s budget. "
        f"Command: `{meta['command']}`.",
    ]
    return "\n".join(head + _correctness_md(parts) + _attribution_md(parts) + _training_md(parts)) + "\n"


def _status(part: dict | None) -> str:
    return "not run" if part is None else f"{part['status']}, {part['seconds']:.0f} s"


def _correctness_md(parts: dict) -> list[str]:
    part = parts.get("correctness")
    lines = ["", f"## 1. Correctness on the device: `pytest -m gpu tests/test_gpu.py` ({_status(part)})", ""]
    if not part:
        return lines
    lines += ["| test | outcome | s | note |", "|---|---|---|---|"]
    for name, test in part["tests"].items():
        lines.append(f"| `{name}` | {test['outcome']} | {test['seconds']:.1f} | {_cell(test['message'])} |")
    lines += ["", "| figure | value | what |", "|---|---|---|"]
    for name, value in part["figures"].items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| `{name}` | {shown} | {_cell(FIGURE_NOTES.get(name, ''))} |")
    return lines


def _attribution_md(parts: dict) -> list[str]:
    part = parts.get("attribution")
    lines = ["", f"## 2. Attribution speed ({_status(part)})", ""]
    if part and part.get("error"):
        lines += [f"Last output line: `{part['error']}`", ""]
    if not part or "shape" not in part:
        return lines
    s = part["shape"]
    lines += [
        f"Llama shape: {s['layers']} layers, hidden {s['hidden']}, intermediate {s['intermediate']}, vocab "
        f"{s['vocab']}, random {part['dtype']} weights built on the device in "
        f"{part.get('build_s', 0):.1f} s; MMLU-style prompts of {part['prompt_tokens_mean']:.0f} tokens on "
        f"average; m = 7; {part['rows_per_chunk']}. Paper: {PAPER_S_PER_SAMPLE} s/sample (the per-layer "
        "algorithm on one RTX 4090).",
        "",
        "| algorithm | batch | samples | s/sample | paper / this | this / fast (batch 1) |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in (("fast_b1", "fast"), ("fast_b8", "fast"), ("reference", "reference (per layer)")):
        r = part.get(key, {})
        if "error" in r:
            lines.append(f"| {name} | | | {_cell(r['error'])} | | |")
        elif r:
            lines.append(
                f"| {name} | {r['batch_size']} | {r['samples']} | {r['s_per_sample']:.4g} | "
                f"{r['paper_over_this']:.1f}x | {r.get('this_over_fast_b1') or float('nan'):.2f} |"
            )
    lines.append(
        f"\nTokens through the model per sample: reference m*T*L, fast T + m*L, a ratio of "
        f"{part['work_ratio_reference_over_fast']:.0f} at T = {part['prompt_tokens_mean']:.0f} and "
        f"L = {s['layers']}."
    )
    predicted = {str(batch): value for batch, value in part.get("predicted_s_per_sample", {}).items()}
    if predicted:
        lines.append(
            f"\n`estimate-time`'s prediction (planning/timing.py) from the device's "
            f"{part['device_tflops']:.0f} TFLOP/s on dense {part['dtype']} products of the model's width: "
            f"fast at batch 1 {predicted['1']:.4g} s/sample, at batch 8 {predicted['8']:.4g} s/sample."
        )
    if "fast_vs_reference_max_rel" in part:
        lines.append(
            f"\nfast vs reference on the same prompts: max|diff|/max|ref| = "
            f"{part['fast_vs_reference_max_rel']:.2g}; peak memory {_size(part['memory']['peak'])} "
            f"({part['memory']['source']})."
        )
    return lines


def _training_md(parts: dict) -> list[str]:
    part = parts.get("training")
    lines = ["", f"## 3. Training speed and memory ({_status(part)})", ""]
    if not part:
        return lines
    lines += [
        "ZeRO-3 on one device, bf16, q = 10, micro-batch 1, one sequence per step; peak = "
        "torch.cuda.max_memory_allocated (on the CPU: peak resident set, not comparable); predicted = "
        "`loki-dist estimate-memory --world-size 1 --zero 3 --micro-batch 1 --seq-len N`.",
        "",
        "| method | checkpointing | status | tokens/s | step s | after init | peak | predicted "
        "| measured / predicted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in part["configs"]:
        done = "peak" in c
        cells = (
            [
                f"{c['tokens_per_s']:.0f}",
                f"{c['step_s']:.3f}",
                _size(c["after_init"]["now"]),
                _size(c["peak"]["peak"]),
            ]
            if done
            else ["", "", "", ""]
        )
        ratio = f"{c['measured_over_predicted']:.2f}" if done else ""
        status = _cell(c["status"] + (f" ({c['error']})" if c.get("error") else ""))
        lines.append(
            f"| {c['method']} | {'on' if c['gradient_checkpointing'] else 'off'} | {status} | "
            + " | ".join(cells)
            + f" | {_size(c['predicted']['total'])} | {ratio} |"
        )
    lines += ["", "Predicted parts: parameters / gradients / optimizer state / activations:", ""]
    for c in part["configs"]:
        p = c["predicted"]
        parts_text = " / ".join(
            _size(p[k]) for k in ("parameters", "gradients", "optimizer_state", "activations")
        )
        lines.append(
            f"- {c['method']}, checkpointing {'on' if c['gradient_checkpointing'] else 'off'}: {parts_text}"
        )
    return lines


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        help="where gpu.json, gpu.md and logs/ go (default: bench/, or out/gpu_check/ with --tiny)",
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="parts 2 and 3")
    p.add_argument("--tiny", action="store_true", help="tiny shapes instead of Llama-3.1-8B's")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all parts together")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--commit", help="the commit being measured, where the checkout has no .git")
    p.add_argument("--worker", choices=("correctness", "attribution", "train"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.sizes = TINY if opts.tiny else FULL
    if opts.worker is None:
        if opts.device == "cpu" and not opts.tiny:
            p.error("Llama-3.1-8B shapes on the CPU would take hours: add --tiny")
        unknown = set(opts.parts.split(",")) - set(PARTS)
        if unknown:
            p.error(f"--parts: unknown {', '.join(sorted(unknown))}")
        opts.out = opts.out or (REPO / "out" / "gpu_check" if opts.tiny else BENCH)
        opts.logs = opts.out / "logs"
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.worker:
        {"correctness": correctness_worker, "attribution": attribution_worker, "train": training_worker}[
            opts.worker
        ](opts)
        return
    started = time.monotonic()
    opts.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": opts.device,
        "tiny": opts.tiny,
        "budget_s": opts.budget,
        "versions": versions(),
        "command": " ".join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        **source_identity(opts.commit),
    }
    report = {"meta": meta, "parts": {}}

    def save() -> None:
        meta["wall_s"] = time.monotonic() - started
        named = [part.get("device") for part in report["parts"].values()]
        named += [c.get("device") for part in report["parts"].values() for c in part.get("configs", [])]
        if any(named):
            meta.setdefault("device_name", next(name for name in named if name))
        write_json(opts.out / "gpu.json", report)
        from loki_dist.core import files

        files.write_text(opts.out / "gpu.md", markdown(report))

    save()
    chosen = [part for part in PARTS if part in opts.parts.split(",")]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for part in chosen:
            left = opts.budget - (time.monotonic() - started)
            seconds = min(left, SHARE.get(part, 1.0) * opts.budget)
            print(f"gpu_check: {part} ({seconds:.0f} s at most) ...", flush=True)
            if part == "training":

                def partial(configs: list[dict]) -> None:
                    report["parts"]["training"] = {"status": "running", "seconds": 0.0, "configs": configs}
                    save()

                report["parts"][part] = training(opts, seconds, Path(tmp), partial)
            else:
                report["parts"][part] = {"correctness": correctness, "attribution": attribution}[part](
                    opts, seconds, Path(tmp)
                )
            save()
            print(f"gpu_check: {part}: {report['parts'][part]['status']}", flush=True)
    if opts.device == "cuda" and "device_name" not in meta:
        meta["device_name"] = describe_device(torch.device("cuda"))
    save()
    print(f"gpu_check: wrote {opts.out / 'gpu.md'} and gpu.json ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
