"""A hub data set fetched once for all ranks: rank 0 downloads it and saves a local copy, every rank reads it.

`load_dataset(NAME)` on every rank at once is 64 processes contacting the hub and sharing one cache
through file locks: it fails on nodes without internet access and on file systems mounted without
flock (Lustre often is). So rank 0 alone calls `load_dataset` and saves the data set with `save_to_disk`
to DIR/loki_dist_data/<owner>__<name>[__<config>] (DIR: the directory of the command's output), and then
every rank reads that copy; the other ranks wait for it by rank 0's being alive (progress_wait.py), not
by the collective timeout, since a download may take longer. A copy that exists is used as it is: a
requeued job does not download again, and a job on nodes without internet access finds a copy made
beforehand where a login node could reach the hub (delete the directory to fetch a newer version).
"""

from __future__ import annotations

from pathlib import Path

from loki_dist.core import distributed, files, progress_wait
from loki_dist.core.errors import UserError

DIR_NAME = "loki_dist_data"


def is_hub_name(source: str) -> bool:
    """`owner/name` that is no local path: what `--data` reads from the hub."""
    path = Path(source)
    return (
        not path.exists() and not path.is_absolute() and not source.startswith(".") and source.count("/") == 1
    )


def copy_path(source: str, config: str | None, near: Path) -> Path:
    """Where the local copy of hub data set `source` (configuration `config`) lives, beside `near`."""
    name = source.replace("/", "__") + (f"__{config}" if config else "")
    return near / DIR_NAME / name


def download(source: str, config: str | None):
    """`load_dataset(source, config)`, or a one-line error saying so (never a data set's own script)."""
    try:
        from datasets import load_dataset

        return load_dataset(source, config, trust_remote_code=False)
    except Exception as err:
        raise UserError(
            f"--data {source}: not a local file or folder, and loading it from the hub failed ({err})"
        ) from None


def fetch_once(source: str, config: str | None, world: distributed.World, near: Path) -> str:
    """What the ranks read for `--data source`: `source` itself, or for a hub name the local copy
    (made by rank 0 where there is none yet). Collective for a hub name with several ranks."""
    if not is_hub_name(source):
        return source
    target = copy_path(source, config, near)
    if world.size > 1:
        distributed.init(world)
    with progress_wait.waiting(world, f"fetching {source}") as progress:
        if world.is_main and not files.is_real_dir(target):
            with progress.keep_alive():
                _save_copy(download(source, config), target)
    if not target.is_dir():  # rank 0 failed, and its own error says why
        raise UserError(f"--data {source}: rank 0 could not make its local copy {target}")
    return str(target)


def command_data(source: str, config: str | None, output: str | Path, world: distributed.World) -> str:
    """fetch_once for a command's --data and --data-config, the copy beside its --output; every rank
    agrees on the outcome (one error, said once, if rank 0 could not fetch it)."""
    with distributed.agreement(world):
        return fetch_once(source, config, world, Path(output).parent)


def _save_copy(loaded, target: Path) -> None:
    """The data set saved to `target` whole or not at all (a staging directory, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(target.parent)
    staging = files.make_staging(target)
    loaded.save_to_disk(str(staging))
    files.publish(staging, target)
