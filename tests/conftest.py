"""Shared fixtures: tiny models written as real Hugging Face directories, and a torchrun runner."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loki_dist.core.distributed import free_port  # tests import it from here

REPO = Path(__file__).resolve().parent.parent


#: .ci/run sets CI=true: there a missing system component or optional asset fails its tests instead of
#: skipping them, so that CI cannot pass by not running them
IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(autouse=True)
def _own_environment():
    """Each test sees the environment pytest started with: an in-process run that joins a process group
    sets RANK, WORLD_SIZE, MASTER_PORT..., and a later test's subprocess (srun, torchrun) must not inherit
    them as if a launcher had said so."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def missing_component(reason: str) -> None:
    """Skip the test for a reason that only a machine without the component has; fail it in CI."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def cli_command(args: list[str], nproc: int = 1) -> list[str]:
    """`python -m loki_dist ARGS`, under torchrun on loopback when nproc > 1."""
    if nproc == 1:
        return [sys.executable, "-m", "loki_dist", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip
    return [*launcher, "-m", "loki_dist", *args]


def run_cli(
    args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `loki-dist ARGS`, as one plain process or under torchrun with NPROC ranks on loopback."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = cli_command(args, nproc)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(argv: list[str], capsys, needle: str) -> None:
    """In-process CLI call that must fail as a user mistake: exit 2 and one stderr line containing needle."""
    from loki_dist.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def loki_dist_traceback(stderr: str) -> bool:
    """Whether a traceback passes through loki_dist's own modules (torchrun reports a failed worker with
    a traceback of its own). Matched on the package's directory, not on the word: a checkout or a venv
    named loki_dist puts that word in torch's paths too."""
    import loki_dist

    # the checkout's package (what `python -m loki_dist` runs from REPO) and the imported one
    packages = {
        f'File "{path}{os.sep}' for path in (REPO / "loki_dist", Path(loki_dist.__file__).resolve().parent)
    }
    return any(package in line for line in stderr.splitlines() for package in packages)


def zero3_rank0_share(log: str) -> tuple[int, int]:
    """(parameter elements rank 0 holds, elements of the whole model) from an inference command's log."""
    found = re.search(r"ZeRO-3: rank 0 holds ([\d,]+) of ([\d,]+) parameters", log)
    assert found, log[-2000:]
    held, total = (int(x.replace(",", "")) for x in found.groups())
    return held, total


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32, intermediate 48) with the built-in tokenizer."""
    from loki_dist.demo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=0)
