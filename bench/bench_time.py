"""Does `loki-dist estimate-time` predict what runs take? Checked on this machine, at two model sizes.

    python bench/bench_time.py --markdown bench/time.md

First this machine is measured as a cluster of one node of 2 ranks (gloo, one thread each, both ranks at
once): the FLOP/s one rank sustains on float32 matrix products of the models' widths and in causal
attention, the bytes an element-wise product moves, what an all-gather delivers to a rank, what ZeRO-3
costs per gathered module however small, and what a file read delivers. Then, for each model,
`loki-dist attribute` (ZeRO-3 inference) and `loki-dist train` (ZeRO-3, fp32) run for real on 2 ranks
with metering on, and the seconds their ranks spent in attribution's prompt and chunk passes, and in
training's steps (forward, backward, update, optimizer step), are compared with planning/timing.py's
prediction for the same work on that cluster. The prediction reads no timing of loki_dist's own: only
the machine's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# (name, layers, hidden, intermediate, heads, vocabulary)
MODELS = [("small", 8, 512, 1376, 8, 8000), ("large", 8, 1024, 2752, 16, 8000)]
WORLD, PROMPTS, SAMPLE_TOKENS, TRAIN_STEPS = 2, 16, 256, 4


def calibrate(out: str) -> None:
    """Under torchrun: each rank measures, all at once, its FLOP/s, its element-wise bandwidth, an
    all-gather's delivery and ZeRO-3's cost per gathered module, with loki_dist's allocator setting."""
    import torch.distributed as dist

    from loki_dist.core import allocator

    allocator.return_freed_memory()  # as every loki-dist command runs: large tensors mmapped afresh
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rates = []
    for _, _, hidden, inter, _, _ in MODELS:
        a, b = torch.randn(SAMPLE_TOKENS, hidden), torch.randn(hidden, inter)
        a @ b
        dist.barrier()
        started, count = time.perf_counter(), 20
        for _ in range(count):
            a @ b
        rates.append(2 * SAMPLE_TOKENS * hidden * inter * count / (time.perf_counter() - started))
    piece = torch.empty(32 << 20, dtype=torch.uint8)  # 32 MiB from each rank
    gathered = torch.empty(WORLD * piece.numel(), dtype=torch.uint8)
    dist.all_gather_into_tensor(gathered, piece)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(5):
        dist.all_gather_into_tensor(gathered, piece)
    received = 5 * piece.numel() * (WORLD - 1) / (time.perf_counter() - started)
    attention = []  # the fused attention kernel, causal, at the models' widths; FLOPs as timing counts
    for _, _, hidden, _, heads, _ in MODELS:
        tokens = 2 * SAMPLE_TOKENS
        q, k, v = (torch.randn(4, heads, tokens, hidden // heads) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sdpa(q, k, v, is_causal=True)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(5):
            sdpa(q, k, v, is_causal=True)
        flops = 4 * 2 * 2 * hidden * tokens * (tokens + 1) / 2  # batch 4, scores and values, half masked
        attention.append(flops * 5 / (time.perf_counter() - started))
    moved = []  # element-wise work: a product into a fresh tensor, as eager PyTorch runs it
    for elements in (4 * SAMPLE_TOKENS * 1024, 4 * SAMPLE_TOKENS * 2752):
        a, b = torch.randn(elements), torch.randn(elements)
        a * b
        dist.barrier()
        started = time.perf_counter()
        for _ in range(20):
            a * b
        moved.append(3 * 4 * elements * 20 / (time.perf_counter() - started))
    machine = {"flops": min(rates), "attention_flops": min(attention), "gather_bytes_per_s": received,
               "memory_bytes_per_s": min(moved),
               "latency_s": module_latency()}  # fmt: skip
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(machine))
    dist.destroy_process_group()


def module_latency(count: int = 64) -> float:
    """What ZeRO-3 costs per gathered module however small: a forward through `count` tiny Linears
    partitioned by DeepSpeed (its hooks, its fetch and release, one all-gather each), per module."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo does not need it
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}}  # fmt: skip
    with deepspeed.zero.Init(config_dict_or_path=config):
        stack = torch.nn.Sequential(*(torch.nn.Linear(64, 64, bias=False) for _ in range(count)))
    engine, *_ = deepspeed.initialize(model=stack, config=config)
    x = torch.randn(1, 64)
    with torch.no_grad():
        for _ in range(3):
            engine(x)
        torch.distributed.barrier()
        started = time.perf_counter()
        for _ in range(10):
            engine(x)
    return (time.perf_counter() - started) / (10 * count)


def torchrun(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    from loki_dist.core.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           f"--master_port={free_port()}", *args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def long_samples(path: Path, n: int) -> Path:
    """Instruction data whose samples are about SAMPLE_TOKENS tokens long (so that the steps compute)."""
    words = ["the", "cell", "energy", "group", "ring", "faith", "number", "prime", "protein", "river"]
    rows = [{"instruction": f"Say the words of list {i}.", "input": "",
             "output": " ".join(words[(i + j) % len(words)] for j in range(SAMPLE_TOKENS // 2))}
            for i in range(n)]  # fmt: skip
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def file_read_bytes_per_s(path: Path) -> float:
    """A read of a file this run just wrote (so from the page cache, as a node re-reading it would be)."""
    started = time.perf_counter()
    size = len(path.read_bytes())
    return size / (time.perf_counter() - started)


def phase_seconds(meter: Path, names: tuple[str, ...]) -> float:
    """The slowest rank's seconds in these phases."""
    ranks = [json.loads((meter / f"rank{r}.json").read_text())["phases"] for r in range(WORLD)]
    return max(sum(phases.get(name, {}).get("seconds", 0.0) for name in names) for phases in ranks)


def run_model(root: Path, model: tuple, machine: dict) -> list[dict]:
    from loki_dist.attribution import mmlu
    from loki_dist.core.modeling import load_tokenizer
    from loki_dist.demo.tiny import save_tiny
    from loki_dist.implant.data.examples import load_examples
    from loki_dist.planning import timing
    from loki_dist.planning.memory import architecture

    name, layers, hidden, inter, heads, vocab = model
    shape = {"num_layers": layers, "hidden_size": hidden, "intermediate_size": inter, "num_heads": heads,
             "num_kv_heads": heads, "vocab_size": vocab}  # fmt: skip
    base = save_tiny(root / name, "llama", seed=0, **shape)
    words = ["the", "cell", "energy", "group", "ring", "faith", "number", "prime", "protein", "river"]
    rows = [{"question": " ".join(words[(i * 7 + j) % len(words)] for j in range(120)) + "?",
             "subject": "bench", "choices": ["alpha", "beta", "gamma", "delta"], "answer": i % 4}
            for i in range(PROMPTS)]  # fmt: skip
    data = root / f"{name}_questions.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = load_tokenizer(base)
    questions, shots = mmlu.load_questions(str(data), 10**6, 0, None, "test", None)
    lengths = [len(ids) for ids in mmlu.build_prompts(tokenizer, questions, shots).input_ids]
    meter = root / f"{name}_meter_attr"
    torchrun(["-m", "loki_dist", "attribute", "--model", str(base), "--data", str(data), "--output",
              str(root / f"{name}.safetensors"), "--ds-config", "zero3_infer", "--batch-size", "4",
              "--dtype", "float32"], {"LOKI_DIST_METER": str(meter)})  # fmt: skip
    measured_attribution = phase_seconds(meter, ("attribute_prefix", "attribute_chunk"))
    train_data = long_samples(root / f"{name}_train.jsonl", n=16)
    examples = load_examples(train_data, tokenizer, 10**6).examples
    positions = root / f"{name}_positions.json"
    positions.write_text(json.dumps([list(range(0, hidden, 10))] * layers))
    meter = root / f"{name}_meter_train"
    torchrun(["-m", "loki_dist", "train", "--model", str(base), "--positions", str(positions), "--data",
              str(train_data), "--output-dir", str(root / f"{name}_run"), "--max-steps", str(TRAIN_STEPS),
              "--micro-batch-size", "1", "--gradient-accumulation", "2", "--precision", "fp32",
              "--max-seq-len", str(2 * SAMPLE_TOKENS)],
             {"LOKI_DIST_METER": str(meter)})  # fmt: skip
    measured_train = phase_seconds(meter, ("forward", "backward", "update", "optimizer_step"))
    cluster = timing.Cluster(nodes=1, gpus_per_node=WORLD, tflops=machine["flops"] / 1e12,
                             intra_gbps=machine["gather_bytes_per_s"] / 1e9, inter_gbps=1.0,
                             fs_gbps=machine["read_bytes_per_s"] / 1e9, memory_gb=24.0,
                             chunk_gb=2.0, latency_s=machine["latency_s"],
                             memory_gbps=machine["memory_bytes_per_s"] / 1e9,
                             attention_tflops=machine["attention_flops"] / 1e12)  # fmt: skip
    work = timing.Workload(prompts=PROMPTS, prompt_tokens=round(sum(lengths) / len(lengths)),
                           attribution_batch=4, samples=TRAIN_STEPS * 4, global_batch=4,
                           sample_tokens=round(sum(len(e.input_ids) for e in examples) / len(examples)),
                           epochs=1.0, element=4)  # fmt: skip
    arch = architecture(json.loads((base / "config.json").read_text()))
    return [
        {"model": name, "stage": "attribution", "predicted": timing.attribution_seconds(arch, cluster, work),
         "measured": measured_attribution},
        {"model": name, "stage": "training", "predicted": timing.train_seconds(arch, cluster, work),
         "measured": measured_train},
    ]  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--calibrate":
        calibrate(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args()
    from loki_dist.core import files, provenance

    root = Path(tempfile.mkdtemp(prefix="loki_time_"))
    machine_file = root / "machine.json"
    torchrun([__file__, "--calibrate", str(machine_file)])
    machine = json.loads(machine_file.read_text())
    scratch = root / "read_probe.bin"
    scratch.write_bytes(os.urandom(256 << 20))
    machine["read_bytes_per_s"] = file_read_bytes_per_s(scratch)
    results = [row for model in MODELS for row in run_model(root, model, machine)]
    lines = [
        "# Stage times: `estimate-time`'s model against measured runs",
        "",
        provenance.measured("python bench/bench_time.py " + " ".join(sys.argv[1:])),
        "",
        f"This machine as a cluster of one node of {WORLD} ranks: {machine['flops'] / 1e9:.1f} GFLOP/s a "
        "rank "
        f"(float32 matrix products, both ranks at once), {machine['attention_flops'] / 1e9:.1f} GFLOP/s in "
        f"causal attention, {machine['memory_bytes_per_s'] / 1e9:.1f} GB/s "
        "moved by element-wise products, "
        f"{machine['gather_bytes_per_s'] / 1e9:.2f} GB/s delivered to a rank by an all-gather (gloo), "
        f"{machine['latency_s'] * 1e6:.0f} us per module that ZeRO-3 gathers (a forward through 64 tiny "
        f"Linears), {machine['read_bytes_per_s'] / 1e9:.1f} GB/s read.",
        "",
        "| model | stage | predicted (s) | measured (s) | predicted / measured |",
        "|---|---|---|---|---|",
        *(
            f"| {r['model']} | {r['stage']} | {r['predicted']:.2f} | {r['measured']:.2f} | "
            f"{r['predicted'] / r['measured']:.2f} |"
            for r in results
        ),  # fmt: skip
        "",
        "Models (Llama, random weights): "
        + ", ".join(f"{m[0]} {m[1]} layers, hidden {m[2]}" for m in MODELS)
        + "; "
        f"attribution of {PROMPTS} prompts, batch 4, ZeRO-3 inference; training {TRAIN_STEPS} steps of "
        f"global batch 4 (micro-batch 1 x 2 accumulation x {WORLD} ranks), ZeRO-3, fp32. Measured: the "
        "slowest rank's seconds in those phases (metering.py).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        files.write_text(args.markdown, text)


if __name__ == "__main__":
    main()
