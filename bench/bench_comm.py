"""What each rank receives, reads and holds in every phase, at 1, 2 and 4 ranks: bench/comm.md.

    python bench/bench_comm.py --markdown bench/comm.md      # --worlds 1 2 4 --layers 14 --hidden 2048

A Llama of 0.85B parameters (14 layers, hidden 2048, intermediate 5632, vocabulary 32000) in bf16 (1.6
GiB) runs for real under torchrun (gloo, CPU, one thread a rank) with metering on (LOKI_DIST_METER):
`train` (ZeRO-3, 1 step, 64-token samples, a checkpoint and the export), `attribute` (ZeRO-3 inference,
8 prompts in batches of 4) and `evaluate` (ZeRO-3 inference), each at every world size, and `train` under
`zero3_offload` at the largest. Every phase of every rank reports the bytes each kind of collective left
on it, the bytes it read from the weight files, and its peak private memory (metering.py). The same
commands on a tiny model give the fixed cost of the libraries in each phase; the memory law is that a
phase's peak private memory above that cost stays within half the model's bytes on 4 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
MIB = 2**20
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "p2p")


def run(args: list[str], world: int, meter: Path) -> None:
    from loki_dist.core.distributed import free_port

    launcher = (
        [sys.executable]
        if world == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            f"--master_port={free_port()}",
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOKI_DIST_METER": str(meter)}
    proc = subprocess.run(
        [*launcher, "-m", "loki_dist", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} on {world} rank(s) failed:\n{proc.stderr[-3000:]}")


def reports(meter: Path, world: int) -> list[dict]:
    return [json.loads((meter / f"rank{r}.json").read_text())["phases"] for r in range(world)]


def make_model(root: Path, name: str, opts, tiny: bool) -> Path:
    from transformers import AutoModelForCausalLM

    from loki_dist.demo.tiny import build_tokenizer, tiny_config

    shape = (
        dict(num_layers=2, hidden_size=32, intermediate_size=48)
        if tiny
        else dict(
            num_layers=opts.layers,
            hidden_size=opts.hidden,
            intermediate_size=opts.intermediate,
            num_heads=opts.hidden // 128,
            num_kv_heads=opts.hidden // 128,
            vocab_size=32000,
        )
    )
    config = tiny_config("llama", **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / name, max_shard_size="500MB")
    build_tokenizer().save_pretrained(root / name)
    return root / name


def commands(root: Path, model: Path, world: int, inputs: dict, config: str = "zero3") -> dict[str, list]:
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    positions = root / f"positions_{hidden}.json"
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    positions.write_text(json.dumps([list(range(0, hidden, 10))] * layers))
    out = root / f"out_{model.name}_{world}_{config}"
    shutil.rmtree(out, ignore_errors=True)
    return {
        "train": [
            "train",
            "--model",
            str(model),
            "--positions",
            str(positions),
            "--data",
            str(inputs["data"]),
            "--output-dir",
            str(out / "train"),
            "--max-steps",
            "1",
            "--max-seq-len",
            "64",
            "--precision",
            "bf16",
            "--ds-config",
            config,
            "--micro-batch-size",
            "1",
            "--gradient-accumulation",
            str(4 // world),
        ],
        "attribute": [
            "attribute",
            "--model",
            str(model),
            "--data",
            str(inputs["questions"]),
            "--output",
            str(out / "attribution.safetensors"),
            "--ds-config",
            "zero3_infer",
            "--dtype",
            "bfloat16",
            "--batch-size",
            "4",
            "--per-subject",
            "2",
        ],
        "evaluate": [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(inputs["questions"]),
            "--output",
            str(out / "evaluation.json"),
            "--ds-config",
            "zero3_infer",
            "--dtype",
            "bfloat16",
        ],
    }


def measure(root: Path, model: Path, worlds: list[int], inputs: dict, offload_world: int) -> dict:
    """{(command, world, config): per-rank phase reports}."""
    results = {}
    for world in worlds:
        for command, args in commands(root, model, world, inputs).items():
            meter = root / f"meter_{model.name}_{command}_{world}"
            run(args, world, meter)
            results[(command, world, "zero3")] = reports(meter, world)
            print(f"{model.name} {command} on {world} rank(s) done", flush=True)
    args = commands(root, model, offload_world, inputs, "zero3_offload")["train"]
    meter = root / f"meter_{model.name}_offload_{offload_world}"
    run(args, offload_world, meter)
    results[("train", offload_world, "zero3_offload")] = reports(meter, offload_world)
    return results


def table(big: dict, tiny: dict, model_bytes: int) -> list[str]:
    lines = [
        "| command | config | world | phase | "
        + " | ".join(f"{k} (MiB)" for k in KINDS)
        + " | read (MiB) | peak private (MiB) | above the libraries / model bytes | seconds |",
        "|" + "---|" * (len(KINDS) + 8),
    ]
    for (command, world, config), ranks in big.items():
        base = tiny.get((command, world, config)) or tiny.get((command, world, "zero3"))
        for phase in ranks[0]:
            most = {k: max(r[phase]["received_by"].get(k, 0) for r in ranks) / MIB for k in KINDS}
            read = max(r[phase]["read"] for r in ranks) / MIB
            peak = max(r[phase]["peak_private"] for r in ranks)
            fixed = max(r.get(phase, {}).get("peak_private", 0) for r in base) if base else 0
            seconds = max(r[phase]["seconds"] for r in ranks)
            lines.append(
                f"| {command} | {config} | {world} | {phase} | "
                + " | ".join(f"{most[k]:.0f}" for k in KINDS)
                + f" | {read:.0f} | {peak / MIB:.0f} | {(peak - fixed) / model_bytes:.2f} | {seconds:.1f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--markdown", help="write the report here")
    opts = parser.parse_args()
    from mmlu_fixture import write_mmlu
    from test_training import make_data

    from loki_dist.core import files, provenance

    root = Path(tempfile.mkdtemp(prefix="loki_comm_"))
    inputs = {"data": make_data(root / "data.jsonl", n=8), "questions": write_mmlu(root / "mmlu")}
    big_model, tiny_model = (
        make_model(root, "big", opts, tiny=False),
        make_model(root, "tiny", opts, tiny=True),
    )
    model_bytes = sum(p.stat().st_size for p in big_model.glob("*.safetensors"))
    largest = max(opts.worlds)
    tiny = measure(root, tiny_model, opts.worlds, inputs, largest)
    big = measure(root, big_model, opts.worlds, inputs, largest)
    lines = [
        "# Per-rank communication, reads and memory, every phase",
        "",
        provenance.measured("python bench/bench_comm.py " + " ".join(sys.argv[1:])),
        "",
        f"Model: Llama, {opts.layers} layers, hidden {opts.hidden}, intermediate {opts.intermediate}, "
        f"vocabulary 32000, bf16: {model_bytes / MIB:.0f} MiB of weights. Each figure is the largest over "
        "the ranks: bytes received by kind of collective, bytes read from weight and row files, peak "
        "private memory; then that peak above the same phase of the same command on a tiny model (the "
        "libraries' own memory), as a share of the model's bytes (the law: at most 0.5 on 4 ranks).",
        "",
        *table(big, tiny, model_bytes),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args_markdown := opts.markdown:
        files.write_text(args_markdown, text)


if __name__ == "__main__":
    main()
