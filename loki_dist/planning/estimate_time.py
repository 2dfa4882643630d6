"""`loki-dist estimate-time`: each stage's wall time on a described cluster (timing.py's model).

The model config comes from `--preset` or `--model-config` as for estimate-memory; the cluster from its
GPUs, FLOP/s, links and file system; the work from the attribution and training sizes. Prints a table of
seconds per stage and what each is made of, and with `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict

from loki_dist.core import checks, files
from loki_dist.core.errors import UserError, require_at_least
from loki_dist.core.flags import parse_quota
from loki_dist.planning import timing
from loki_dist.planning.estimate_memory import load_config
from loki_dist.planning.memory import PRESETS, architecture

# Defaults: a node of 8 H100 80 GB (NVLink 4), 8 x 400 Gb/s InfiniBand, a parallel file system
CLUSTER_DEFAULTS = {"nodes": 4, "gpus_per_node": 8, "tflops": 400.0, "intra_gbps": 300.0, "inter_gbps": 40.0,
                    "fs_gbps": 2.0, "memory_gb": 80.0, "latency_us": 30.0, "memory_gbps": 3000.0}  # fmt: skip


def add_estimate_time_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-config", help="a config.json, or a Hugging Face model directory holding one")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in config")
    cluster = parser.add_argument_group("cluster (defaults: nodes of 8 H100 80 GB on InfiniBand)")
    cluster.add_argument("--nodes", type=int, default=CLUSTER_DEFAULTS["nodes"])
    cluster.add_argument("--gpus-per-node", type=int, default=CLUSTER_DEFAULTS["gpus_per_node"])
    cluster.add_argument("--tflops", type=float, default=CLUSTER_DEFAULTS["tflops"],
                         help="dense TFLOP/s one GPU sustains in the run's precision")  # fmt: skip
    cluster.add_argument("--intra-gbps", type=float, default=CLUSTER_DEFAULTS["intra_gbps"],
                         help="GB/s a GPU receives inside its node")  # fmt: skip
    cluster.add_argument("--inter-gbps", type=float, default=CLUSTER_DEFAULTS["inter_gbps"],
                         help="GB/s a GPU receives from other nodes (the network's share)")  # fmt: skip
    cluster.add_argument("--attention-tflops", type=float, default=None,
                         help="TFLOP/s of a GPU's fused attention kernel (default: --tflops)")  # fmt: skip
    cluster.add_argument("--memory-gbps", type=float, default=CLUSTER_DEFAULTS["memory_gbps"],
                         help="GB/s a GPU's element-wise kernels move through its memory (H100 SXM: "
                         "3.35 TB/s peak)")  # fmt: skip
    cluster.add_argument("--latency-us", type=float, default=CLUSTER_DEFAULTS["latency_us"],
                         help="microseconds one collective call costs however small")  # fmt: skip
    cluster.add_argument("--fs-gbps", type=float, default=CLUSTER_DEFAULTS["fs_gbps"],
                         help="GB/s one node reads from or writes to the file system")  # fmt: skip
    cluster.add_argument("--gpu-memory-gb", type=float, default=CLUSTER_DEFAULTS["memory_gb"])
    cluster.add_argument("--chunk-memory-gb", type=float, default=None,
                         help="attribution's chunk budget, as `attribute --chunk-memory-gb` (default: what "
                         "attribute chooses on a GPU of --gpu-memory-gb)")  # fmt: skip
    work = parser.add_argument_group("work")
    defaults = timing.Workload()
    work.add_argument("--prompts", type=int, default=defaults.prompts, help="attribution prompts")
    work.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    work.add_argument("--attribution-batch", type=int, default=defaults.attribution_batch,
                      help="`attribute --batch-size`")  # fmt: skip
    work.add_argument("--samples", type=int, default=defaults.samples, help="training samples per epoch")
    work.add_argument("--sample-tokens", type=int, default=defaults.sample_tokens)
    work.add_argument("--epochs", type=float, default=defaults.epochs)
    work.add_argument("--global-batch", type=int, default=defaults.global_batch)
    work.add_argument("--micro-batch", type=int, default=defaults.micro_batch)
    work.add_argument("--quota", default=str(defaults.quota), help="LoKI: percent of rows per layer")
    work.add_argument("--bytes-per-element", type=int, choices=(2, 4), default=defaults.element,
                      help="2 for bf16, 4 for fp32")  # fmt: skip
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers here")


def cluster_from_args(args: argparse.Namespace) -> timing.Cluster:
    require_at_least(("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 1))
    for flag in ("tflops", "intra_gbps", "inter_gbps", "fs_gbps", "gpu_memory_gb", "chunk_memory_gb",
                 "memory_gbps", "attention_tflops"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
    if args.latency_us < 0:
        raise UserError(f"--latency-us {args.latency_us}: must be 0 or more")
    return timing.Cluster(
        args.nodes,
        args.gpus_per_node,
        args.tflops,
        args.intra_gbps,
        args.inter_gbps,
        args.fs_gbps,
        args.gpu_memory_gb,
        args.chunk_memory_gb,
        args.latency_us / 1e6,
        args.memory_gbps,
        args.attention_tflops,
    )


def workload_from_args(args: argparse.Namespace) -> timing.Workload:
    require_at_least(*((f"--{f.replace('_', '-')}", getattr(args, f), 1) for f in (
        "prompts", "prompt_tokens", "attribution_batch", "samples", "sample_tokens", "global_batch",
        "micro_batch")))  # fmt: skip
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise UserError(f"--epochs {args.epochs}: expected a positive number")
    return timing.Workload(args.prompts, args.prompt_tokens, args.attribution_batch, 7, args.samples,
                           args.sample_tokens, args.epochs, args.global_batch, args.micro_batch,
                           parse_quota(args.quota), args.bytes_per_element)  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def run_estimate_time(args: argparse.Namespace) -> None:
    config, name = load_config(args.preset, args.model_config)
    arch, cluster, work = architecture(config), cluster_from_args(args), workload_from_args(args)
    if args.json:
        checks.refuse_output_over_inputs("--json", args.json, {"--model-config": args.model_config})
        checks.check_writable("--json", args.json)
    held = timing.held_bytes(arch, cluster, work)
    if held >= cluster.memory_gb * timing.GB:
        raise UserError(
            f"--gpu-memory-gb {cluster.memory_gb:g}: a GPU would hold its share of the model and two "
            f"gathered layers, {held / timing.GB:.1f} GB, before any work; more GPUs or more memory"
        )
    seconds = timing.estimate(arch, cluster, work)
    batch, step = timing.attribution_batch(arch, cluster, work), timing.train_step(arch, cluster, work)
    per_prompt = batch["gathered_elements"] / arch.total_params / work.attribution_batch
    lines = [
        f"{name} on {cluster.nodes} x {cluster.gpus_per_node} GPUs ({cluster.tflops:g} TFLOP/s, "
        f"{cluster.intra_gbps:g} GB/s in a node, {cluster.inter_gbps:g} GB/s between nodes, file system "
        f"{cluster.fs_gbps:g} GB/s a node)",
        f"attribution: {work.prompts} prompts of {work.prompt_tokens} tokens, {batch['chunks']} chunk(s) per "
        f"batch of {work.attribution_batch}: {per_prompt:.2f} full-model gathers per prompt",
        f"training: {work.epochs:g} epoch(s) of {work.samples} samples x {work.sample_tokens} tokens, global "
        f"batch {work.global_batch}: {step['seconds']:.2f} s per step",
        "",
    ]
    lines += [f"{stage:<12} {_duration(value):>12}" for stage, value in seconds.items()]
    print("\n".join(lines))
    if args.json:
        files.write_json(args.json, {"model": name, "cluster": asdict(cluster), "work": {
            **asdict(work), "quota": str(work.quota)}, "seconds": seconds, "gathers_per_prompt": per_prompt,
            "chunks_per_batch": batch["chunks"], "seconds_per_step": step["seconds"]}, indent=2)  # fmt: skip
