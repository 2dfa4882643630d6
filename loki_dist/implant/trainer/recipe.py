"""The training recipe of `loki-dist train`, read top to bottom: setup -> train -> save -> cleanup.

After train.plan_run has checked every input: load the model sharded (ZeRO-3 zero.Init through the
HF DeepSpeed integration, or ZeRO-1/2, or one plain process) -> freeze everything, then make the
selected rows trainable (model.py) -> loop over global batches (schedule.py): forward/backward per
micro-batch, then at each update (masked layout) zero the gradients of unselected rows on this rank's
partition, apply decoupled weight decay to selected rows only, let the optimizer step -> row-level
checkpoints (artifacts/checkpoint.py) -> OUT/final built from the base model's shards (artifacts/export.py).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loki_dist.core import collectives, distributed, files, metering
from loki_dist.implant.artifacts import checkpoint, export
from loki_dist.implant.artifacts.checkpoint import FINAL_DIR
from loki_dist.implant.data.examples import collate, num_targets
from loki_dist.implant.trainer import monitor
from loki_dist.implant.trainer.model import Trainer
from loki_dist.implant.trainer.plan import Plan
from loki_dist.implant.trainer.schedule import global_batch_indices, lr_at, micro_batches, normaliser
from loki_dist.implant.trainer.stopping import DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE, StopRequest


class TrainRecipe:
    """Train the selected down_proj rows of a planned run (train.plan_run), checkpoint, export.

    Lifecycle, as train.run_train calls it: `setup` (agree on the checkpoint, start the process group,
    load the model and make its rows trainable, resume, the probe loss) -> `train` (the optimizer steps,
    with log lines, evaluations and checkpoints) -> `save` (OUT/final and train_summary.json, only when
    `train` returned 0) -> `cleanup` (always: the process group, the run lock).

    Features:
    - layouts: ZeRO-3 (zero.Init through the HF DeepSpeed integration), ZeRO-1/2, or one plain process
      (`--ds-config none`); the rows as their own parameter (`--row-params split`), LoKI*'s low-rank
      update of them (`--lora-rank R`, lowrank.py) or masked in the whole down_proj weight (model.py);
    - row-level checkpoints every --save-steps and at the end, resumed on any world size (resume.py
      chooses, artifacts/checkpoint.py reads only this rank's ranges);
    - SIGUSR1/SIGTERM stop at the next step boundary, on every rank, after a checkpoint: `train` returns
      REQUEUE_EXIT_CODE (75; stopping.py); SIGUSR2 prints every thread's stack and goes on;
    - divergence (a NaN or Inf loss or gradient norm on any rank, or in the rows a checkpoint would save)
      returns DIVERGED_EXIT_CODE (3) with nothing of that step saved and final/ not written;
    - the forgetting monitor (--eval-data, --general-data; monitor.py), which may end the run early as a
      finished one;
    - TensorBoard scalars in OUT/runs and a log line every --logging-steps (rank 0).

    Returns (`train`): 0, REQUEUE_EXIT_CODE (75) or DIVERGED_EXIT_CODE (3); run_train exits with it.
    Raises: distributed.CollectiveFailed when a peer rank dies or stays silent past the timeout (naming
    the stage); errors.RankErrors (a UserError, exit 2) when the ranks chose different checkpoints or a
    write fails on any rank (a full disk, no permission: files.file_system_errors); UserError for a
    checkpoint that does not fit (other rows) or an unreadable shard. Whatever is raised, run_train
    still calls `cleanup`, which then does not wait for peers that may be gone.
    """

    def __init__(self, plan: Plan):
        self.plan, self.world, self.out = plan, plan.world, plan.out
        self.trainer: Trainer | None = None
        self.start = 0  # the step training starts from: 0, or the resumed checkpoint's
        self.probe_at_start: float | None = None
        self.watch: monitor.Monitor | None = None
        self.stop: StopRequest | None = None

    # ------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Every rank resumes the same checkpoint; the process group, stop signals, OUT, the model with
        its rows trainable, the resumed rows and optimizer state, and the probe loss at the start step."""
        plan, world, out = self.plan, self.world, self.out
        # each rank chose the checkpoint on its own, from the same files: a difference would mix two
        chosen = plan.resume_from.name if plan.resume_from is not None else None
        distributed.same_on_every_rank(world, chosen, "the checkpoint to resume from")
        if plan.ds_config is None:
            distributed.init(world)
        else:
            distributed.prepare_deepspeed(world)
        self.stop = StopRequest()
        if world.is_main:
            if plan.args.overwrite:
                for old in [out / FINAL_DIR, out / "runs", *checkpoint.checkpoint_dirs(out)]:
                    shutil.rmtree(old, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            for line in plan.log:
                print(line, flush=True)
        torch.manual_seed(plan.args.seed + world.rank)
        with distributed.stage("loading the model"):
            self.trainer = trainer = Trainer(plan, distributed.device_for(world))
        if (path := plan.resume_from) is not None:
            with distributed.stage(f"resuming from {path}"):
                state = checkpoint.load(path, trainer.states, trainer.prepare_optimizer, world.rank)
            self.start = state["step"]
            if world.is_main:
                print(f"resumed from {path} at step {self.start}", flush=True)
        with distributed.stage("the probe loss before training"):
            self.probe_at_start = _probe_loss(self.trainer, plan)

    # ------------------------------------------------------------------------------------------- train

    def train(self) -> int:
        """The optimizer steps from `self.start`; returns 0 when done (also when the forgetting monitor
        stopped the run early: watch.stopped_at), REQUEUE_EXIT_CODE or DIVERGED_EXIT_CODE."""
        from tqdm import tqdm

        plan, world, trainer, last = self.plan, self.world, self.trainer, self.plan.total_steps
        writer = _tensorboard(self.out) if world.is_main else None
        bar = tqdm(
            total=last, initial=self.start, desc="train", disable=not world.is_main, dynamic_ncols=True
        )
        try:
            self.watch = monitor.Monitor.begin(plan, trainer, self.start, bar, writer)  # evaluates, if asked
            window = _Window()
            for step in range(self.start, last):
                done = step + 1
                with distributed.stage(f"step {done}"):
                    lr = lr_at(step, plan)
                    loss, grad_norm = self._step(step, lr, window)
                    bar.update(1)
                    if done % plan.every(plan.args.logging_steps) == 0 or done == last:
                        self._log(window, writer, bar, done, lr=lr, grad_norm=grad_norm)
                        window = _Window()
                    finite = math.isfinite(float(loss)) and (grad_norm is None or math.isfinite(grad_norm))
                    stopping, diverged = self.stop.agreed(world, trainer.device, not finite)
                if diverged:
                    norm = "unknown" if grad_norm is None else f"{grad_norm:.4g}"
                    ranks = f" (non-finite on {diverged} of {world.size} ranks)" if world.size > 1 else ""
                    return self._diverged(bar, done, f"loss {float(loss):.4g}, gradient norm {norm}{ranks}")
                forgetting = self.watch.after_step(done, bar, writer)  # evaluates when due; True: an end
                stopping = stopping and done < last and not forgetting
                every = plan.every(plan.args.save_steps)
                save_due = every and done % every == 0
                if save_due or done == last or stopping or forgetting:
                    try:
                        self._checkpoint(done)
                    except checkpoint.NonFinite as err:
                        why = f"its update left NaN or Inf in the trained rows ({err})"
                        return self._diverged(bar, done, why)
                if forgetting:
                    return 0
                if stopping:
                    return self._requeue(bar, done)
            return 0
        finally:
            bar.close()
            if writer is not None:
                writer.close()

    def _step(self, step: int, lr: float, window: _Window) -> tuple[torch.Tensor, float | None]:
        """Forward and backward of this rank's micro-batches of step `step`, then the update; returns this
        rank's share of the step's mean loss and the gradient norm (None where the engine kept none)."""
        plan, trainer = self.plan, self.trainer
        indices = global_batch_indices(step, plan)
        scale = normaliser(indices, plan)
        loss = torch.zeros(1, dtype=torch.float64)
        for i, mine in enumerate(micro_batches(indices, plan)):
            part = trainer.loss_sum(collate([plan.examples[i] for i in mine], pad_id=plan.pad_id)) / scale
            grad_norm = trainer.backward(part, lr, boundary=i == plan.accum - 1)
            loss += part.detach().double().cpu()
        window.loss += loss / self.world.size
        window.steps += 1
        window.tokens += sum(len(plan.examples[i].input_ids) for i in indices)
        return loss, grad_norm

    def _log(self, window: _Window, writer, bar, step: int, lr: float, grad_norm: float | None) -> None:
        """Step `step`'s log line and TensorBoard scalars (rank 0); the loss and the speed are the
        window's averages (the loss over every rank: a collective)."""
        loss = float(collectives.all_reduce_sum(window.loss)) / window.steps
        tokens_per_s = window.tokens / (time.time() - window.start)
        if self.world.is_main:
            _log_line(writer, bar, step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)

    def _checkpoint(self, done: int) -> None:
        """Save checkpoint-<done> (collective); raises checkpoint.NonFinite, saving nothing, on NaN or Inf."""
        plan, world = self.plan, self.world
        state = {
            "base_model": str(Path(plan.args.model).resolve()),
            "base_fingerprint": plan.base_print,
            "positions": plan.positions,
            "data_fingerprint": plan.data_print,
            "global_batch": plan.global_batch,
            "world_size": world.size,
            "lora_rank": plan.args.lora_rank,  # LoKI*'s factors, or 0: the rows themselves
            "train_bias": plan.args.train_bias,  # the rows' bias entries too (entries "<layer>.bias")
        }
        with distributed.stage(f"saving checkpoint-{done}"):
            state.update(self.watch.state())  # the evaluations too: a resume keeps the baseline
            checkpoint.save(self.out, done, self.trainer.states, state, world, plan.args.save_total_limit)

    def _requeue(self, bar, done: int) -> int:
        """Stopped by a signal after checkpoint-<done>: say so (rank 0); every rank returns
        REQUEUE_EXIT_CODE."""
        bar.close()
        if self.world.is_main:
            print(
                f"stopped by signal {self.stop.received or 'on another rank'} after step {done}: saved "
                f"{self.out / f'checkpoint-{done}'}; rerun the same command to resume "
                f"(exit status {REQUEUE_EXIT_CODE})",
                flush=True,
            )
        return REQUEUE_EXIT_CODE

    def _diverged(self, bar, step: int, why: str) -> int:
        """Say (rank 0) that step `step` diverged and what is left; every rank returns DIVERGED_EXIT_CODE."""
        bar.close()
        if self.world.is_main:
            before = [p for p in checkpoint.list_checkpoints(self.out) if checkpoint.step_of(p) < step]
            kept = f"{before[-1]} is the newest checkpoint" if before else "no checkpoint was saved before it"
            print(
                f"loki-dist train: error: training diverged at step {step}: {why}; nothing of step {step} "
                f"was saved and final/ was not written, {kept}. Lower --learning-rate or --weight-decay (or "
                f"check the data) and rerun, which resumes from the newest checkpoint "
                f"(exit status {DIVERGED_EXIT_CODE})",
                file=sys.stderr,
                flush=True,
            )
        return DIVERGED_EXIT_CODE

    # -------------------------------------------------------------------------------------------- save

    def save(self) -> None:
        """OUT/final, built from the base model's shards and the last checkpoint, and train_summary.json."""
        plan, world, out = self.plan, self.world, self.out
        with distributed.stage("the probe loss after training"):
            probe = _probe_loss(self.trainer, plan)
        end = self.watch.stopped_at or plan.total_steps  # the last step, or the one stopped on forgetting
        last = out / f"checkpoint-{end}"  # saved by that step (every rank knows its name)
        with distributed.stage(f"exporting {out / FINAL_DIR}"):
            export.export_checkpoint(last, out / FINAL_DIR, world, base_dir=plan.args.model)
        if world.is_main:
            summary = {
                "steps": end,
                "global_batch": plan.global_batch,
                "world_size": world.size,
                "samples": len(plan.examples),
                "probe_loss": probe,
                "probe_loss_at_start_step": self.probe_at_start,
                "start_step": self.start,
                "probe_samples": global_batch_indices(0, plan),
                **self.watch.summary(),
            }
            files.write_json(out / "train_summary.json", summary, indent=2)
            if plan.args.plot_loss:
                from loki_dist.implant.trainer.lossplot import plot_loss

                print(f"loss plot: {plot_loss(out) or 'none (no loss was logged)'}", flush=True)
            print(f"done: {out / FINAL_DIR} (probe loss {probe:.6f})", flush=True)

    # ----------------------------------------------------------------------------------------- cleanup

    def cleanup(self, failed: bool = False) -> None:
        """Leave the process group (after a failure without waiting: peers may never reach a barrier now)
        and release the output directory's run lock. Harmless where setup never started the group."""
        try:
            distributed.shutdown(wait_for_peers=not failed)
        finally:
            if self.plan.lock is not None:
                self.plan.lock.release()


@dataclass
class _Window:
    """What is averaged between two log lines."""

    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.time)


def _log_line(writer, bar, step: int, **scalars: float | None) -> None:
    scalars = {name: value for name, value in scalars.items() if value is not None}
    for name, value in scalars.items():
        writer.add_scalar(f"train/{name}", value, step)
    bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))


@torch.no_grad()
def _probe_loss(trainer: Trainer, plan: Plan) -> float:
    """Mean response-token loss of the trained model on the first global batch of epoch 0.

    Recorded in train_summary.json so that anyone can check the exported model against the trained
    engine: from_pretrained(OUT/final) must reproduce it.
    """
    indices = global_batch_indices(0, plan)
    total = torch.zeros(1, dtype=torch.float64)
    trainer.model.eval()
    with metering.phase("probe"):
        for mine in micro_batches(indices, plan):
            batch = collate([plan.examples[i] for i in mine], pad_id=plan.pad_id)
            total += trainer.loss_sum(batch).double().cpu()
    trainer.model.train()
    targets = sum(num_targets(plan.examples[i]) for i in indices)
    return float(collectives.all_reduce_sum(total)) / max(targets, 1)


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "runs"))
