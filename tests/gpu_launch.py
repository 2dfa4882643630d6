"""The processes of tests/test_gpu.py: started all at once by one launcher, and the programs they run.

    python tests/gpu_launch.py cli ARGS...            `loki-dist ARGS` with deterministic kernels
    python tests/gpu_launch.py collectives DIR        every helper of collectives.py (under torchrun)
    python tests/gpu_launch.py load OUT MODEL_DIR...  tests/zero3_load_check.py (the ZeRO-3 loader)

Every process the GPU tests check is started by one fixture at the start (`Launch`): on one GPU they
share it, and the part's wall time is about that of its slowest process plus the one that must follow
another (a resume after a kill), not the sum of six process starts in a row (each one imports torch and
DeepSpeed and makes a CUDA context, 10-20 s on a GPU machine). Each process writes its output to a
temporary file, so that processes running side by side never block on a full pipe.

Training processes run with torch.use_deterministic_algorithms(True) (`cli`): CUDA's attention backward
is otherwise non-deterministic, and two identical runs could not agree bit for bit, resumed or not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FORCED = os.environ.get("LOKI_GPU_TEST_DEVICE")
DEVICE = torch.device(FORCED or "cuda")


def child_env() -> dict[str, str]:
    """Environment of every subprocess: CUDA hidden in CPU mode, cuBLAS deterministic."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    if DEVICE.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def command(args: list[str], nproc: int) -> list[str]:
    """This file as a program, one process or torchrun on loopback."""
    if nproc == 1:
        return [sys.executable, __file__, *args]
    from loki_dist.core.distributed import free_port

    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    return [*launcher, __file__, *args]


class Launch:
    """Processes started side by side, by name; `output(name)` waits for one and returns its output, or
    fails the test that asks for it with the output's end."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.outputs: dict[str, str] = {}

    def start(self, name: str, args: list[str], nproc: int = 1) -> None:
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - outlives this call; output() closes it
        proc = subprocess.Popen(command(args, nproc), env=child_env(), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        proc.log = log
        self.procs[name] = proc

    def output(self, name: str, timeout: float = 900) -> str:
        if name not in self.outputs:
            proc = self.procs[name]
            proc.wait(timeout=timeout)
            with proc.log:
                proc.log.seek(0)
                self.outputs[name] = proc.log.read()
            if proc.returncode != 0:
                raise AssertionError(
                    f"{name}: {proc.args} failed ({proc.returncode}):\n{self.outputs[name][-6000:]}"
                )
        return self.outputs[name]

    def kill_after_first_checkpoint(self, name: str, out: Path) -> None:
        """SIGKILL run `name` (one process, leader of its own group) once its first checkpoint exists."""
        proc, deadline = self.procs[name], time.time() + 600
        while not list(out.glob("checkpoint-*")):  # published by a rename: complete once it appears
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.log.close()
        self.outputs[name] = ""
        assert not (out / "final").exists(), "the run finished before it could be killed"

    def stop(self) -> None:
        """Whatever still runs (a test that failed early never asked for it) is killed."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ------------------------------------------------------------------------------------ entry points


def _collectives_worker(out: str) -> None:
    """Every helper of collectives.py on tensors on the rank's device and on the CPU, as attribution
    uses them at its end: int64 sums of uint8 counts (the statistics), scores streamed point to point to
    rank 0, variable-length gathers; many small pieces each."""
    from loki_dist.core import collectives, distributed

    world = distributed.world_from_env()
    device = distributed.device_for(world)
    distributed.init(world, always=True)
    import torch.distributed as dist

    result = {"backend": dist.get_backend(), "device_name": str(device), "cpu_name": "cpu"}
    for where, on in (("device", device), ("cpu", torch.device("cpu"))):
        r = world.rank
        tensors = {
            "sum_float32": torch.full((3,), r + 1.5, dtype=torch.float32, device=on),
            "sum_float64": torch.tensor([2.0**-r], dtype=torch.float64, device=on),
            "sum_int64": torch.full((2,), 10**r, dtype=torch.int64, device=on),
        }
        summed = {name: collectives.all_reduce_sum(t) for name, t in tensors.items()}
        sizes = [k + 2 for k in range(world.size)]
        local = (100 * r + torch.arange(sizes[r], dtype=torch.float32)).to(on)
        gathered = collectives.all_gather_varlen(local, sizes)
        counts = [
            torch.full((700,), 200 + r, dtype=torch.uint8, device=on),
            torch.arange(5, dtype=torch.uint8),
        ]
        reduced = [(i, piece.clone()) for i, piece in collectives.reduce_to_main(counts, torch.int64, 256)]
        streams = [300 + 7 * k for k in range(world.size)]
        scores = (1000 * r + torch.arange(streams[r], dtype=torch.float32)).to(on)
        streamed = [piece.clone() for piece in collectives.stream_to_main(scores, streams, 128)]
        distributed.barrier()
        result[where] = {
            **{name: t.tolist() for name, t in summed.items()},
            "gathered": gathered.tolist(),
            "devices": [str(t.device) for t in (*summed.values(), gathered)],
            "reduced": [[i, str(p.dtype), p.tolist()] for i, p in reduced],
            "streamed": torch.cat(streamed).tolist() if streamed else [],
            "streamed_pieces": len(streamed),
        }
    result["max"] = collectives.agree_max(10 * world.rank + 3)
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


def _cli(argv: list[str]) -> None:
    """`loki-dist ARGV` with deterministic kernels (module docstring). Uninitialised memory is left as it
    is (deterministic mode would fill it with NaN): that is DeepSpeed's business, not what is tested."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    from loki_dist.cli import main

    main(argv)


def _load(argv: list[str]) -> None:
    from zero3_load_check import main

    main(argv[0], argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    programs = {"cli": _cli, "collectives": lambda argv: _collectives_worker(*argv), "load": _load}
    programs[sys.argv[1]](sys.argv[2:])
