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

Each part is a module of bench/gpu/ (correctness.py, attribution.py, training.py, report.py; common.py
holds what they share): this file parses the flags, runs the parts in order under the budget and writes
the report. A part measures in workers, which are this script again (`--worker NAME`, flags hidden from
--help), so every child runs the same checkout's code at the same sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from gpu import attribution, correctness, training
from gpu.common import BENCH, FULL, REPO, TINY, describe_device, write_json
from gpu.report import markdown, source_identity, versions

PARTS = ("correctness", "attribution", "training")
SHARE = {"correctness": 0.36, "attribution": 0.23}  # of the budget; training gets what is left
WORKERS = {"correctness": correctness.worker, "attribution": attribution.worker, "train": training.worker}


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
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=list(training.METHODS), help=argparse.SUPPRESS)
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
        WORKERS[opts.worker](opts)
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

                report["parts"][part] = training.run(opts, seconds, Path(tmp), partial)
            else:
                run = correctness.run if part == "correctness" else attribution.run
                report["parts"][part] = run(opts, seconds, Path(tmp))
            save()
            print(f"gpu_check: {part}: {report['parts'][part]['status']}", flush=True)
    if opts.device == "cuda" and "device_name" not in meta:
        meta["device_name"] = describe_device(torch.device("cuda"))
    save()
    print(f"gpu_check: wrote {opts.out / 'gpu.md'} and gpu.json ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
