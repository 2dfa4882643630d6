"""Benchmark (not a test): `fast` against `reference` attribution, 1 rank against 2, and what a chunk costs.

    python bench/bench_attribution.py [--layers 16 --hidden 256 --tokens 250 --samples 2]
    python bench/bench_attribution.py --memory --flops --markdown bench/attribution.md

A tiny Llama of realistic proportions (16 layers, hidden 256) on MMLU-length prompts (~250 tokens),
random weights (the cost does not depend on them). Prints seconds per sample of each algorithm, the
speed-up, and the largest score difference between them; then runs `loki-dist attribute` on the same
model with 1 and 2 ranks (torchrun, gloo) and prints their throughput.

`--memory` measures one `fast` chunk's peak memory at shapes that the constants of
loki_dist/attribution/chunks.py were not fitted on (vocabularies up to 50k among them), each in a fresh
process whose allocator maps every block of 4 KiB or more on its own (so the resident peak follows the
live bytes), against `chunks.chunk_bytes`. `--flops` counts (torch's FlopCounterMode) what `fast`
attribution computes per prompt at the defaults (batch 4, the chunks `attribute` plans on a CPU) on a
model of SmolLM2-135M's shape, in forward-equivalents: one plain forward of the same prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loki_dist.attribution import fast, kva
from loki_dist.core import distributed
from loki_dist.core.families import down_projections
from loki_dist.demo.tiny import build_model, save_tiny


def score_prompts(
    algorithm: str, model, prompts: list[list[int]], batch_size: int = 1, max_rows: int = 0, steps: int = 7
) -> tuple[float, torch.Tensor]:
    """(seconds per sample, scores [N, L, D]) of one algorithm over the prompts, `batch_size` per batch.

    The model's device is the prompts' device; CUDA work is synchronised before the clock stops.
    max_rows: `fast`'s packed rows per forward (0: all rows of a batch at once).
    """
    projections = down_projections(model)
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id or 0
    scores, started = [], time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = kva.Batch.left_pad(prompts[first : first + batch_size], pad_id, device)
        if algorithm == "fast":
            rows = max_rows or len(batch) * len(projections) * steps
            scores.append(fast.fast_scores(model, projections, batch, steps, max_rows=rows))
        else:
            scores.append(kva.reference_scores(model, projections, batch, steps))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / len(prompts), torch.cat(scores)


def time_algorithms(args) -> None:
    model = build_model("llama", seed=0, num_layers=args.layers, hidden_size=args.hidden,
                        intermediate_size=args.hidden * 11 // 4, num_heads=8, num_kv_heads=4)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = [
        [1, *torch.randint(6, 500, (args.tokens - 1,), generator=gen).tolist()] for _ in range(args.samples)
    ]
    # one sample per batch: the per-sample cost the paper reports
    results = {name: score_prompts(name, model, prompts) for name in ("fast", "reference")}
    fast_s, reference_s = results["fast"][0], results["reference"][0]
    diff = (results["fast"][1] - results["reference"][1]).abs().max() / results["reference"][1].abs().max()
    print(f"model: {args.layers} layers, hidden {args.hidden}; prompts: {args.tokens} tokens; "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"fast      {fast_s:8.3f} s/sample")
    print(f"reference {reference_s:8.3f} s/sample")
    print(f"speed-up  {reference_s / fast_s:8.1f}x   (max |fast - reference| / max |reference| = {diff:.1e})")


def time_ranks(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="loki_bench_"))
    model = save_tiny(root / "model", "llama", seed=0, num_layers=args.layers, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 11 // 4, num_heads=8, num_kv_heads=4)  # fmt: skip
    words = ["the", "of", "cell", "energy", "group", "ring", "god", "faith", "number", "prime", "protein"]
    rows = [{"question": " ".join(words[(i * 7 + j) % len(words)] for j in range(args.tokens // 2)) + "?",
             "subject": "bench", "choices": ["alpha", "beta", "gamma", "delta"], "answer": i % 4}
            for i in range(args.rank_samples)]  # fmt: skip
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = ["-m", "loki_dist", "attribute", "--model", str(model), "--data", str(root / "data.jsonl"),
              "--batch-size", "2"]  # fmt: skip
    for ranks in (1, 2):
        launcher = [sys.executable] if ranks == 1 else [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1", f"--master_port={distributed.free_port()}"]  # fmt: skip
        threads = max(1, torch.get_num_threads() // ranks)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        output = str(root / f"ws{ranks}.safetensors")
        proc = subprocess.run(
            [*launcher, *common, "--output", output], capture_output=True, text=True, env=env
        )
        found = re.search(r"wall time ([\d.]+) s for (\d+) samples", proc.stderr)
        if not found:
            print(proc.stderr[-3000:])
            continue
        wall, n = float(found.group(1)), int(found.group(2))
        print(f"{ranks} rank(s), {threads} thread(s) each: {n / wall:6.2f} samples/s "
              f"({wall:.1f} s for {n} samples)")  # fmt: skip


# (layers, hidden, intermediate, heads, kv heads, vocabulary, prefix, batch, rows per sample, first layer)
# The fit (--fit): one base shape, and one size at a time moved away from it.
_BASE = (6, 256, 688, 8, 4, 4000, 120, 2, 40, 0)
_MOVES = {8: (10, 120), 7: (1, 4), 9: (3, 5), 6: (40, 300), 1: (128, 512), 2: (256, 2048), 3: (4, 16),
          5: (1000, 32000), 4: (2, 8)}  # fmt: skip
FIT_SHAPES = [_BASE, *(_BASE[:i] + (v,) + _BASE[i + 1 :] for i, values in _MOVES.items() for v in values)]
# The check (--memory): shapes the fit did not see.
MEMORY_SHAPES = [
    (6, 256, 688, 8, 4, 4000, 120, 2, 40, 0),
    (4, 384, 512, 8, 2, 2000, 200, 2, 30, 2),
    (4, 128, 1024, 4, 2, 32000, 200, 4, 14, 2),
    (8, 384, 512, 4, 2, 32000, 60, 1, 14, 0),
    (8, 384, 512, 8, 2, 50000, 60, 4, 14, 4),
    (8, 384, 512, 8, 2, 2000, 400, 1, 30, 4),
    (8, 384, 1536, 8, 2, 50000, 400, 1, 30, 4),
    (4, 384, 1024, 8, 2, 32000, 400, 1, 30, 0),
    (8, 384, 1536, 8, 2, 50000, 60, 1, 70, 0),
]


def chunk_peak(shape: tuple, steps: int = 7) -> int:
    """One chunk's peak resident-memory rise, in this process (run by `--memory-probe`)."""
    from transformers import AutoModelForCausalLM

    from loki_dist.core import metering
    from loki_dist.demo.tiny import tiny_config

    layers, hidden, inter, heads, kv, vocab, prefix, batch, rows, first = shape
    config = tiny_config("llama", vocab_size=vocab, num_layers=layers, hidden_size=hidden,
                         intermediate_size=inter, num_heads=heads, num_kv_heads=kv)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (prefix + 1,), generator=gen).tolist() for _ in range(batch)]
    batch_ = kva.Batch.left_pad(prompts, 0, torch.device("cpu"))
    start = first * steps
    chunk = [(start, min(start + rows, layers * steps))]
    for _ in range(2):  # the first run pays for lazy initialisations
        metering._phases.clear()
        fast.fast_scores(model, down_projections(model), batch_, steps, chunks=chunk)
    return metering._phases["attribute_chunk"]["peak_rss_rise"]


def measure(shape: tuple) -> int:
    """chunk_peak(shape) in a fresh process (see --memory-probe)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOKI_DIST_METER": tempfile.mkdtemp()}
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps(shape)],
                          capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return int(proc.stdout.strip().splitlines()[-1])


def fit_terms(shape: tuple, steps: int = 7) -> list[float]:
    """The terms of chunks.chunk_bytes for one measured shape (float32), before their constants."""
    layers, hidden, inter, heads, kv, vocab, prefix, batch, rows, first = shape
    start = first * steps
    end = min(start + rows, layers * steps)
    running = [min(end, (j + 1) * steps) - start for j in range(first, layers)]
    keys = 4.0 * batch * sum(prefix + r for r in running) * hidden
    return [4.0 * batch * sum(running) * hidden, 4.0 * batch * sum(running) * inter, keys,
            batch * (end - start) * vocab, 1.0]  # fmt: skip


def fit() -> None:
    """Measure FIT_SHAPES and print the least-squares constants of chunks.chunk_bytes."""
    measured = torch.tensor([float(measure(shape)) for shape in FIT_SHAPES], dtype=torch.float64)
    terms = torch.tensor([fit_terms(shape) for shape in FIT_SHAPES], dtype=torch.float64)
    constants = torch.linalg.lstsq(terms, measured[:, None]).solution[:, 0]
    names = ("C_HIDDEN", "C_MLP", "C_QUERY_WIDTH", "C_VOCAB", "C_FIXED (bytes)")
    print(", ".join(f"{name} {value:.4g}" for name, value in zip(names, constants.tolist(), strict=True)))


def memory_table() -> list[str]:
    """Each shape's measured chunk peak against chunks.chunk_bytes, as markdown rows."""
    from loki_dist.attribution import chunks

    header = ("layers run", "hidden", "intermediate", "heads", "vocabulary", "prefix", "batch", "rows",
              "measured (MiB)", "estimate (MiB)", "estimate / measured")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape in MEMORY_SHAPES:
        measured = measure(shape)
        layers, hidden, inter, heads, kv, vocab, prefix, batch, rows, first = shape
        rows = min(rows, (layers - first) * 7)
        model_shape = chunks.Shape(num_layers=layers, hidden=hidden, intermediate=inter, query_width=hidden,
                                   vocab=vocab, element=4, prefix=prefix)  # fmt: skip
        estimate = chunks.chunk_bytes(model_shape, batch, first * 7, first * 7 + rows, 7)
        lines.append(f"| {layers - first} of {layers} | {hidden} | {inter} | {heads} | {vocab} | {prefix} | "
                     f"{batch} | {rows} | {measured / 2**20:.1f} | {estimate / 2**20:.1f} | "
                     f"{estimate / measured:.2f} |")  # fmt: skip
        print(lines[-1], flush=True)
    return lines


# SmolLM2-135M-Instruct's shape (its config.json)
SMOLLM2 = dict(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
               vocab_size=49152)  # fmt: skip


def forward_equivalents(tokens: int = 250, batch: int = 4, steps: int = 7) -> tuple[float, int]:
    """(what `fast` computes per prompt in forward-equivalents, chunks per batch) at SmolLM2's shape."""
    from torch.utils.flop_counter import FlopCounterMode

    from loki_dist.attribution import chunks
    from loki_dist.attribution.settings import CPU_DEFAULT_GB

    model = build_model("llama", seed=0, **SMOLLM2).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(6, 500, (tokens - 1,), generator=gen).tolist()] for _ in range(batch)]
    plan = chunks.plan_chunks(chunks.Shape.of(model.config, tokens - 1, torch.float32), batch, steps,
                              int(CPU_DEFAULT_GB * 2**30))  # fmt: skip
    with FlopCounterMode(display=False) as counted:
        fast.fast_scores(model, down_projections(model), kva.Batch.left_pad(prompts, 0, torch.device("cpu")),
                        steps, chunks=plan)  # fmt: skip
    with FlopCounterMode(display=False) as one, torch.no_grad():
        model(input_ids=torch.tensor([prompts[0]]))
    return counted.get_total_flops() / batch / one.get_total_flops(), len(plan)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4096)  # M_MMAP_THRESHOLD: each block of 4 KiB or more mapped, returned when freed
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: the heap's top returned at once
        print(chunk_peak(tuple(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--rank-samples", type=int, default=16)
    parser.add_argument("--skip-ranks", action="store_true")
    parser.add_argument(
        "--memory", action="store_true", help="check chunks.chunk_bytes against measured peaks"
    )
    parser.add_argument(
        "--flops", action="store_true", help="forward-equivalents per prompt at SmolLM2's shape"
    )
    parser.add_argument(
        "--fit", action="store_true", help="measure the fit's shapes, print chunk_bytes' constants"
    )
    parser.add_argument("--markdown", help="write the --memory / --flops tables here")
    args = parser.parse_args()
    if args.fit:
        fit()
        return
    if args.memory or args.flops:
        report(args)
        return
    time_algorithms(args)
    if not args.skip_ranks:
        time_ranks(args)


def report(args) -> None:
    from loki_dist.core import files, provenance

    command = "python bench/bench_attribution.py " + " ".join(sys.argv[1:])
    lines = [
        "# Attribution: what a chunk holds, and what a prompt computes",
        "",
        provenance.measured(command),
        "",
    ]
    if args.memory:
        lines += ["One `fast` chunk's peak memory (float32, CPU) against `chunks.chunk_bytes`, at shapes the "
                  "constants were not fitted on:", "", *memory_table(), ""]  # fmt: skip
    if args.flops:
        lines += ["`fast` at SmolLM2-135M's shape (30 layers, hidden 576, vocabulary 49152), batch 4, the "
                  "chunks `attribute` plans per batch on a CPU: FLOPs per prompt (torch's FlopCounterMode) "
                  "in forward-equivalents, one plain forward of the same prompt each:", "",
                  "| prompt tokens | chunks per batch | forward-equivalents per prompt |",
                  "|---|---|---|"]  # fmt: skip
        for tokens in (120, 250):
            ratio, count = forward_equivalents(tokens)
            lines.append(f"| {tokens} | {count} | {ratio:.2f} |")
            print(lines[-1], flush=True)
        lines.append("")
    if args.markdown:
        files.write_text(args.markdown, "\n".join(lines))


if __name__ == "__main__":
    main()
