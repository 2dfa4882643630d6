"""Part 4 of bench/gpu_check.py: what a reader needs to trust gpu.md's figures, and gpu.md itself.

The versions of every package that ran, the device, the date, and the commit with a digest of the
sources (the GPU machine's copy has no .git, so --commit names it); then one section per part in a fixed
format, in which what a part did not measure (it failed, or ran out of time) says so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess

import torch

from .attribution import PAPER_S_PER_SAMPLE
from .common import BENCH, REPO, size_text


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
    sources = [*REPO.glob("loki_dist/**/*.py"), *BENCH.glob("*.py"), *BENCH.glob("gpu/*.py"), *tests]
    for path in sorted(sources):
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
            f"{part['fast_vs_reference_max_rel']:.2g}; peak memory {size_text(part['memory']['peak'])} "
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
                size_text(c["after_init"]["now"]),
                size_text(c["peak"]["peak"]),
            ]
            if done
            else ["", "", "", ""]
        )
        ratio = f"{c['measured_over_predicted']:.2f}" if done else ""
        status = _cell(c["status"] + (f" ({c['error']})" if c.get("error") else ""))
        lines.append(
            f"| {c['method']} | {'on' if c['gradient_checkpointing'] else 'off'} | {status} | "
            + " | ".join(cells)
            + f" | {size_text(c['predicted']['total'])} | {ratio} |"
        )
    lines += ["", "Predicted parts: parameters / gradients / optimizer state / activations:", ""]
    for c in part["configs"]:
        p = c["predicted"]
        parts_text = " / ".join(
            size_text(p[k]) for k in ("parameters", "gradients", "optimizer_state", "activations")
        )
        lines.append(
            f"- {c['method']}, checkpointing {'on' if c['gradient_checkpointing'] else 'off'}: {parts_text}"
        )
    return lines
