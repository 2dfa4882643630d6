"""What every part of bench/gpu_check.py shares: the sizes it runs at, the child processes it runs in, and
how it reads a device's memory.

Each part measures in child processes of bench/gpu_check.py (`--worker NAME`), so that a crash, a hang or
an out-of-memory costs only that part and a peak of memory is that child's own; this module starts them
under a deadline, kills their whole process tree when it passes, and reads back what they wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
ENTRY = BENCH / "gpu_check.py"  # what a worker runs: the entry point again, with --worker
sys.path[:0] = [str(REPO), str(BENCH)]  # the checkout's loki_dist (it need not be installed), bench_*.py
# the words of the made-up prompts (part 2) and training answers (part 3)
WORDS = ["the", "of", "cell", "energy", "group", "ring", "god", "faith", "number", "prime", "protein",
         "water", "light", "field", "root", "which"]  # fmt: skip


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
    """`python ARGS` of one worker: the entry point with --worker, at the parent's device, dtype and sizes."""
    common = ["--device", opts.device, "--dtype", opts.dtype, *(["--tiny"] if opts.tiny else [])]
    return [str(ENTRY), "--worker", worker, "--result", str(result), *common, *extra]


def last_line(log: Path) -> str:
    """The last non-empty line a failed child wrote (its exception, usually)."""
    lines = [line for line in log.read_text(errors="replace")[-20000:].splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def size_text(value: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"
