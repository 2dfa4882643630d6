"""Benchmark (not a test): `fast` against `reference` attribution, and 1 rank against 2 ranks.

    python bench/bench_attribution.py [--layers 16 --hidden 256 --tokens 250 --samples 2]

A tiny Llama of realistic proportions (16 layers, hidden 256) on MMLU-length prompts (~250 tokens),
random weights (the cost does not depend on them). Prints seconds per sample of each algorithm, the
speed-up, and the largest score difference between them; then runs `loki-dist attribute` on the same
model with 1 and 2 ranks (torchrun, gloo) and prints their throughput.
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

from loki_dist.attribution import kva
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
            scores.append(kva.fast_scores(model, projections, batch, steps, max_rows=rows))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--rank-samples", type=int, default=16)
    parser.add_argument("--skip-ranks", action="store_true")
    args = parser.parse_args()
    time_algorithms(args)
    if not args.skip_ranks:
        time_ranks(args)


if __name__ == "__main__":
    main()
