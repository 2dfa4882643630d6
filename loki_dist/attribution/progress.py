"""The partial progress of `loki-dist attribute`: each rank's partial statistics, saved as it scores.

Every `--checkpoint-every` samples each rank writes its running statistics (stats.py) to one file of
`--checkpoint-dir` (default OUTPUT.partial), `rank{r}-step{s}.safetensors`, so that `--resume` continues a
killed run where all ranks had got to instead of scoring every sample again. A file carries the run's
identity (model, data, settings) in its metadata, and progress of another run is refused. A rank removes
its previous file only once every rank has written the new one, so `--resume` always finds a step that
all ranks share, even when a job was killed half-way through writing.
"""

from __future__ import annotations

from pathlib import Path

from loki_dist.core.errors import UserError

# the layout of partial progress: progress of another layout (an older loki_dist) is refused on --resume.
# 3: the magnitude rule's histograms and |score| sum (attribution format v2) beside the signed ones
PROGRESS_FORMAT = "3"


class PartialProgress:
    """Per-rank partial statistics, `rank{r}-step{s}.safetensors`: one per rank between saves.

    A save writes the new step beside the old one and removes the old one only once every rank has
    written the new one (a barrier), so the second file lives only for the length of that commit
    and the ranks' newest steps never differ by more than one, which `restore` relies on.
    """

    def __init__(self, directory: Path, rank: int, identity: dict[str, str]):
        self.directory, self.rank, self.identity = directory, rank, identity

    def _path(self, step: int) -> Path:
        return self.directory / f"rank{self.rank}-step{step:09d}.safetensors"

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        prefix = f"rank{self.rank}-step"
        return sorted(int(p.stem[len(prefix) :]) for p in self.directory.glob(f"{prefix}*.safetensors"))

    def check_resumable(self) -> None:
        """--resume: this rank's newest partial statistics must be of this very run, found before the
        model loads."""
        from safetensors import safe_open

        steps = self.steps()
        if not steps:
            return
        path = self._path(steps[-1])
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as err:  # safetensors raises several types for a damaged file
            raise UserError(f"--resume: {path} is unreadable ({err}); pass --overwrite instead") from None
        self._refuse_other_run(metadata)

    def _refuse_other_run(self, metadata: dict[str, str]) -> None:
        """Statistics of other settings must not be summed into this run's."""
        differs = [key for key, value in self.identity.items() if metadata.get(key) != value]
        if differs:
            raise UserError(
                f"--resume: the partial progress in {self.directory} was made with other settings "
                f"({', '.join(differs)}); pass --overwrite instead of --resume to discard it"
            )

    def save(self, stats, step: int) -> None:
        from loki_dist.core import metering
        from loki_dist.core.distributed import barrier
        from loki_dist.core.files import save_tensors_streaming

        with metering.phase("attribute_progress_save"):
            tensors = stats.tensors()  # views: written as they are, never copied whole
            layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
            metadata = {**self.identity, "step": str(step)}
            save_tensors_streaming(self._path(step), layout, tensors.items(), metadata)
            barrier()  # every rank has `step` now, so older ones can go
            for old in self.steps():
                if old < step:
                    self._path(old).unlink(missing_ok=True)

    def restore(self, stats, world_size: int) -> int:
        """Load the newest step every rank has; returns the number of batches already done."""
        import torch

        from loki_dist.attribution.stats import load_file
        from loki_dist.core.collectives import all_gather_varlen

        mine = self.steps()
        latest = torch.tensor([mine[-1] if mine else 0], dtype=torch.int64)
        common = int(all_gather_varlen(latest, [1] * world_size).min())
        if common == 0:
            return 0
        if common not in mine:
            raise UserError(f"--resume: {self.directory} lacks step {common} for rank {self.rank}")
        tensors, metadata = load_file(self._path(common), flag="--resume")
        self._refuse_other_run(metadata)  # the step all ranks share may be older than the one checked
        stats.load(tensors)
        return common

    def clear(self, world_size: int) -> None:
        """Remove this rank's partial statistics, and what killed writers on this host left half-written;
        rank 0 also those of ranks this run does not have (an earlier run on more ranks left them)."""
        from loki_dist.core.files import remove_stale_temporaries

        for step in self.steps():
            self._path(step).unlink(missing_ok=True)
        if self.rank == 0 and self.directory.is_dir():
            for path in self.directory.glob("rank*-step*.safetensors"):
                owner = path.name[len("rank") :].partition("-")[0]
                if owner.isdigit() and int(owner) >= world_size:
                    path.unlink(missing_ok=True)
        remove_stale_temporaries(self.directory)
