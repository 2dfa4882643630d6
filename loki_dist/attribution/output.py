"""The end of `loki-dist attribute`: the ranks' statistics brought to rank 0, which writes the file.

The statistics are summed into rank 0 a bounded piece at a time (CHUNK_BYTES) and rank 0 streams them,
then every rank's scores, sent to it point to point in rank (= data) order, into the attribution file
(stats.file_layout) as they arrive: no rank ever holds the whole sums or another rank's whole scores,
and only rank 0 receives. The sums (score and |score|) are added exactly, so the file is the same to the
bit on any number of ranks. Once the file is written, the run's partial progress (progress.py) is removed.
"""

from __future__ import annotations

import logging
import os

from loki_dist import __version__
from loki_dist.attribution.progress import PartialProgress
from loki_dist.attribution.settings import AttributeSettings
from loki_dist.attribution.stats import FORMAT
from loki_dist.core import flags, sharding

log = logging.getLogger("loki_dist.attribute")

CHUNK_BYTES = 64 << 20  # at the end, what a rank holds of the summed statistics or of another's scores
_CHUNK_ENV = "LOKI_DIST_TEST_CHUNK_BYTES"  # tests and benches only: a smaller CHUNK_BYTES, many pieces


def finish(
    settings: AttributeSettings, world, spec, stats, prompts, identity, progress: PartialProgress, zero3: bool
) -> None:
    """Bring the statistics to rank 0, which writes the file as they arrive; then remove the progress."""
    from loki_dist.core import metering
    from loki_dist.core.distributed import barrier, shutdown

    with metering.phase("attribute_finish"):
        metadata = _metadata(settings, identity, prompts, zero3)
        _write_attribution(settings, world, spec, stats, len(prompts.input_ids), metadata)
        barrier()
        progress.clear(world.size)
        barrier()  # every rank's files are gone before rank 0 looks at the directory
        if world.is_main and progress.directory.is_dir() and not any(progress.directory.iterdir()):
            progress.directory.rmdir()
    shutdown()


def _write_attribution(
    settings: AttributeSettings, world, spec, stats, num_samples: int, metadata: dict[str, str]
) -> None:
    """Sum the ranks' statistics into rank 0 piece by piece, and stream them and the scores to the file.

    At 70B (L=80, D=8192, 2850 samples) the summed histograms are 3.1 GB and the scores 7.5 GB: no
    rank may hold either whole. The sums reach only rank 0, CHUNK_BYTES at a time, widened there to
    the file's int64; the scores travel point to point from each rank to rank 0, in rank (= data)
    order, while rank 0 appends them to the file. The other ranks receive nothing.
    """
    import torch

    from loki_dist.attribution.stats import HISTOGRAMS, SUMS, file_layout
    from loki_dist.core.collectives import reduce_to_main, stream_to_main
    from loki_dist.core.files import save_tensors_streaming

    layout = file_layout(spec.num_layers, spec.hidden_size, num_samples, settings.save_scores)
    tensors = stats.tensors()
    chunk = int(os.environ.get(_CHUNK_ENV, CHUNK_BYTES))

    def summed(names: tuple[str, ...]):
        parts = reduce_to_main([tensors[n] for n in names], layout[names[0]][0], chunk)
        return ((names[index], piece) for index, piece in parts)

    # the small sums first, kept on rank 0 for the summary (a piece is only valid until the next one)
    count = [p.clone() for _, p in summed(("num_samples",))]
    sums = {name: _exact_sum(stats.sums[name], stats.errors[name], world.size, chunk) for name in SUMS}

    def pieces():
        yield from (("num_samples", piece) for piece in count)
        if world.is_main:
            yield from ((name, total.view(-1)) for name, total in sums.items())
        yield from summed(HISTOGRAMS)
        if settings.save_scores:
            per_rank = sharding.block_sizes(num_samples, world.size, settings.batch_size)
            sizes = [n * spec.num_layers * spec.hidden_size for n in per_rank]
            yield from (("scores", p) for p in stream_to_main(tensors["scores"], sizes, chunk))

    if not world.is_main:
        for _ in pieces():  # the collectives, in the same order as on rank 0
            pass
        return
    save_tensors_streaming(settings.output, layout, pieces(), metadata)
    _summary(sums["score_sum"], int(torch.cat(count).item()), spec)


def _exact_sum(local, local_error, world_size: int, chunk: int):
    """A sum (score_sum, abs_score_sum) over all ranks on rank 0 (None elsewhere), the same to the bit
    on any number of ranks: a sum reduction would add the ranks' float64 sums in an order that depends
    on the world size, so each rank's sum and its rounding error go to rank 0 point to point, a piece
    at a time, and rank 0 adds them with stats.exact_add. Rank 0 holds two [L, D] float64 tensors per
    sum (10 MB a sum at 70B).
    """
    import torch

    from loki_dist.attribution.stats import exact_add
    from loki_dist.core.collectives import stream_to_main

    total, error = torch.zeros_like(local), torch.zeros_like(local)
    flat_total, flat_error, numel = total.view(-1), error.view(-1), total.numel()
    received = False
    for part, exact in ((local, True), (local_error, False)):
        at = 0  # every rank sends numel elements, in rank order, and no piece spans two ranks
        for piece in stream_to_main(part, [numel] * world_size, chunk):
            where = slice(at % numel, at % numel + piece.numel())
            if exact:
                exact_add(flat_total[where], flat_error[where], piece.double())
            else:
                flat_error[where] += piece
            at, received = at + piece.numel(), True
    return total + error if received else None


def _metadata(settings: AttributeSettings, identity: dict[str, str], prompts, zero3: bool) -> dict[str, str]:
    asked = settings.questions
    metadata = {
        **identity,
        "format": FORMAT,
        "model": str(settings.model),
        "algorithm": settings.algorithm,
        "prompt": "mmlu single choice (DESIGN.md)",
        "chat_template": str(prompts.chat_template),
        "shots": str(asked.shots),
        "per_subject": str(asked.per_subject),
        "subjects": asked.subjects or "all",
        "split": asked.split,
        "data": str(settings.data),
        "dtype": flags.torch_name(
            settings.dtype
        ),  # as torch names it (float32), whichever spelling was given
        "zero3": str(zero3),
        "loki_dist_version": __version__,
    }
    for key in ("batch_size", "progress_format"):  # of the run, not of the result
        del metadata[key]
    return metadata


def _summary(score_sum, n: int, spec) -> None:
    mean = score_sum / max(n, 1)
    lines = [f"attribution: {n} samples"]
    for layer in range(spec.num_layers):
        row = mean[layer]
        lines.append(
            f"  layer {layer:3d}: mean score {row.mean().item():+.3e}  "
            f"(min {row.min().item():+.3e}, max {row.max().item():+.3e})"
        )
    log.info("\n".join(lines))
