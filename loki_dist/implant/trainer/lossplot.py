"""`train --plot-loss` (LLaMA-Factory's `plot_loss`): the logged training loss as OUT/training_loss.png.

Drawn from what the run logged to TensorBoard (OUT/runs), not from memory, so that a run resumed after
a requeue draws its whole history: TensorBoard's reader keeps, where a resumed run logged a step again,
the later value. Raw values faint, a smoothed curve over them (an exponential moving average, as
TensorBoard's slider and LLaMA-Factory's plot draw it), so the trend reads through a noisy loss.
"""

from __future__ import annotations

from pathlib import Path

from loki_dist.core import plotting

FILE = "training_loss.png"
SMOOTHING = 0.9  # weight of the running average; 0 would draw the raw values


def losses(runs: Path) -> list[tuple[int, float]]:
    """(step, loss) of every `train/loss` scalar under `runs`, in step order, one per step."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    reader = EventAccumulator(str(runs), size_guidance={SCALARS: 0})  # 0: keep every value
    reader.Reload()
    if "train/loss" not in reader.Tags()[SCALARS]:
        return []
    by_step = {event.step: event.value for event in reader.Scalars("train/loss")}
    return sorted(by_step.items())


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """The exponential moving average, debiased at the start as TensorBoard's is."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out


def plot_loss(out: Path) -> Path | None:
    """Write OUT/training_loss.png from OUT/runs; None (and no file) where nothing was logged."""
    points = losses(out / "runs")
    if not points:
        return None
    plt = plotting.pyplot("--plot-loss")
    steps, values = zip(*points, strict=True)
    fig, axis = plt.subplots(figsize=(7, 4.2))
    axis.plot(steps, values, color="tab:blue", alpha=0.3, label="logged")
    axis.plot(steps, smoothed(list(values)), color="tab:blue", label=f"smoothed ({SMOOTHING:g})")
    axis.set(xlabel="optimizer step", ylabel="training loss", title=f"training loss of {out}")
    axis.legend()
    fig.tight_layout()
    plotting.save(fig, out / FILE)
    return out / FILE
