"""Per-rank memory of the phases that touch all trained rows, at world sizes 1, 2 and 4: the 1/world law.

    python bench/bench_scale.py --markdown bench/scale.md   # --worlds 1 2 4 --hidden 512 --intermediate 32768

A synthetic Llama whose trainable rows are large (2 layers, hidden 512, intermediate 32768: at q = 50,
256 rows x 32768 per layer, 16.8M row elements, 201 MB of fp32 rows + Adam moments) is trained for real
(`loki-dist train`, ZeRO-3, split rows, fp32, gloo) under torchrun at each world size, once at q = 50 and
once at q = 1: the q = 1 run carries the same model, process group and DeepSpeed buffers with almost no
rows, so the difference between the two is what the rows cost. Every rank reports through metering.py
(LOKI_DIST_METER) its peak resident memory above its level at the start of each phase: checkpoint save
(a first run, 1 step), resume (a second run from that checkpoint), export (the first run's final/ from
its base in several shards) and `attribute --save-scores` on a model whose L x D statistics are large.

The law: the rows-related peak of a rank is at most its 1/world share of the rows plus one layer. The
table gives both, and their ratio. Export wall time at each world size is reported as well.
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

from loki_dist.core import distributed, files, provenance

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
TRAIN_PHASES = ("checkpoint_save", "resume", "export")
ATTRIBUTION_INTRO = """

`attribute --save-scores` ({attr_layers} layers, hidden {attr_hidden}, 3 x {attr_per_subject} questions): the
end of the run, where the statistics are summed and the scores gathered into the file. Rank 0 receives
the summed statistics and the other ranks' scores one piece at a time and writes them as they arrive;
the other ranks receive nothing.

"""


def torchrun(args: list[str], world: int, meter: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LOKI_DIST_METER": str(meter),
        # glibc would otherwise serve a phase's allocations from memory freed earlier and hide them from
        # the resident-memory peak: large blocks are mapped, and returned when freed
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={distributed.free_port()}", "-m", "loki_dist", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def reports(meter: Path, world: int) -> list[dict]:
    return [json.loads((meter / f"rank{r}.json").read_text())["phases"] for r in range(world)]


def make_inputs(root: Path, opts) -> dict[str, Path]:
    from loki_dist.demo.tiny import save_tiny

    sys.path.insert(0, str(REPO / "tests"))
    from test_training import make_data  # the tests' small instruction data set

    base = save_tiny(root / "base", "llama", seed=0, num_layers=opts.layers, hidden_size=opts.hidden,
                     intermediate_size=opts.intermediate, max_shard_size="150MB")  # fmt: skip
    inputs = {"base": base, "data": make_data(root / "data.jsonl", n=16)}
    for quota in opts.quotas:
        k = opts.hidden * quota // 100
        path = root / f"positions_q{quota}.json"
        path.write_text(json.dumps([list(range(0, opts.hidden, opts.hidden // k))[:k]] * opts.layers))
        inputs[f"q{quota}"] = path
    return inputs


def train_phases(root: Path, inputs: dict[str, Path], quota: int, world: int) -> list[dict]:
    """Per rank: {phase: report} of a 1-step run (save, export) and a run resumed from its checkpoint."""
    common = ["train", "--model", str(inputs["base"]), "--positions", str(inputs[f"q{quota}"]),
              "--data", str(inputs["data"]), "--ds-config", "zero3", "--precision", "fp32",
              "--learning-rate", "1e-4", "--save-steps", "1", "--max-seq-len", "64",
              "--gradient-accumulation", str(4 // world)]  # fmt: skip
    first, second = root / f"q{quota}_w{world}", root / f"q{quota}_w{world}_resumed"
    meters = root / f"m1_q{quota}_w{world}", root / f"m2_q{quota}_w{world}"
    torchrun([*common, "--output-dir", str(first), "--max-steps", "1"], world, meters[0])
    shutil.copytree(first / "checkpoint-1", second / "checkpoint-1")
    torchrun([*common, "--output-dir", str(second), "--max-steps", "2"], world, meters[1])
    ranks = []
    for one, two in zip(reports(meters[0], world), reports(meters[1], world), strict=True):
        ranks.append(
            {"checkpoint_save": one["checkpoint_save"], "export": one["export"], "resume": two["resume"]}
        )
    shutil.rmtree(first)
    shutil.rmtree(second)
    return ranks


def attribution_inputs(root: Path, opts) -> dict[str, Path]:
    """A model whose statistics dominate (many layers, wide hidden, tiny attention and MLP) and MMLU-
    layout questions; the histograms are 6 x L x D x 100 counts, the scores N x L x D floats."""
    from transformers import AutoModelForCausalLM

    from loki_dist.demo.tiny import build_tokenizer, tiny_config

    sys.path.insert(0, str(REPO / "tests"))
    from mmlu_fixture import write_mmlu

    config = tiny_config("llama", num_layers=opts.attr_layers, hidden_size=opts.attr_hidden,
                         intermediate_size=16, num_heads=1, num_kv_heads=1)  # fmt: skip
    config.head_dim = 8
    torch.manual_seed(0)
    model_dir = root / "attr_model"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    build_tokenizer(vocab_size=config.vocab_size).save_pretrained(model_dir)
    return {"model": model_dir, "data": write_mmlu(root / "mmlu", per_subject=opts.attr_per_subject)}


def attribution_phase(root: Path, inputs: dict[str, Path], world: int) -> dict:
    """`attribute --save-scores` at one world size: every rank's end-of-run report and the file size."""
    out, meter = root / f"attr_w{world}.safetensors", root / f"m_attr_w{world}"
    args = ["attribute", "--model", str(inputs["model"]), "--data", str(inputs["data"]), "--output", str(out),
            "--save-scores", "--batch-size", "4", "--checkpoint-every", "0"]  # fmt: skip
    torchrun(args, world, meter)
    size = out.stat().st_size
    out.unlink()
    return {"ranks": [r["attribute_finish"] for r in reports(meter, world)], "file_bytes": size}


def attribution_table(results: dict[int, dict]) -> str:
    from loki_dist.attribution.output import CHUNK_BYTES

    lines = [
        "| world | rank | peak rise at the end (MiB) | received (MiB) | file (MiB) | one piece (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for world, result in results.items():
        for rank, report in enumerate(result["ranks"]):
            rise, received = report["peak_rss_rise"] / MIB, report["received"] / MIB
            lines.append(
                f"| {world} | {rank} | {rise:.1f} | {received:.1f} | {result['file_bytes'] / MIB:.1f} | "
                f"{CHUNK_BYTES / MIB:.0f} |"
            )
    return "\n".join(lines)


def law_bound(opts, quota: int, world: int) -> tuple[int, int]:
    """(1/world share, one layer) of the rows in bytes: fp32 master + two Adam moments per element."""
    elements = opts.hidden * quota // 100 * opts.intermediate
    return 12 * elements * opts.layers // world, 12 * elements


def table(results: dict, opts) -> str:
    big, small = max(opts.quotas), min(opts.quotas)
    lines = [
        f"| phase | world | peak rise, max over ranks, q={big} (MiB) | q={small} (MiB) | rows-related (MiB) "
        "| share + one layer (MiB) | ratio | seconds (rank 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase in TRAIN_PHASES:
        for world in opts.worlds:
            peak = {q: max(r[phase]["peak_rss_rise"] for r in results[q][world]) for q in opts.quotas}
            rows = peak[big] - peak[small]
            share, layer = law_bound(opts, big, world)
            seconds = results[big][world][0][phase]["seconds"]
            lines.append(
                f"| {phase} | {world} | {peak[big] / MIB:.1f} | {peak[small] / MIB:.1f} | {rows / MIB:.1f} | "
                f"{(share + layer) / MIB:.1f} | {rows / (share + layer):.2f} | {seconds:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quotas", type=int, nargs=2, default=[50, 1])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=32768)
    parser.add_argument("--attr-layers", type=int, default=32)
    parser.add_argument("--attr-hidden", type=int, default=4096)
    parser.add_argument("--attr-per-subject", type=int, default=4, help="questions per subject (3 subjects)")
    parser.add_argument("--markdown", type=Path, help="write the table here (bench/scale.md)")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="loki_scale_"))
    inputs = make_inputs(root, opts)
    results: dict[int, dict[int, list[dict]]] = {}
    for quota in opts.quotas:
        for world in opts.worlds:
            print(f"train q={quota} world={world}", flush=True)
            results.setdefault(quota, {})[world] = train_phases(root, inputs, quota, world)
    attr_inputs = attribution_inputs(root, opts)
    attribution = {}
    for world in opts.worlds:
        print(f"attribute world={world}", flush=True)
        attribution[world] = attribution_phase(root, attr_inputs, world)
    text = table(results, opts) + ATTRIBUTION_INTRO.format(**vars(opts)) + attribution_table(attribution)
    print(text)
    if opts.markdown:
        command = "python bench/bench_scale.py --markdown bench/scale.md"
        rows = law_bound(opts, max(opts.quotas), 1)[0] / MIB
        header = (
            f"{provenance.measured(command)} 1 thread per rank, gloo. Model: {opts.layers} layers, hidden "
            f"{opts.hidden}, intermediate {opts.intermediate}; rows at q={max(opts.quotas)}: {rows:.0f} MiB "
            "of fp32 rows + moments.\n\n"
        )
        files.write_text(opts.markdown, header + text + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
