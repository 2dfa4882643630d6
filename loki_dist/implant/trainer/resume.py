"""Which checkpoint `loki-dist train` resumes from, chosen before any model loads, under the output
directory's run lock (runlock.py), so that no other run changes the directory meanwhile.

`--resume auto` takes the newest checkpoint in --output-dir that `checkpoint.damage` finds whole,
skipping newer damaged ones with a warning; a path is taken as given, if whole. Either must have been
saved by a run of the same base, positions, data, global batch size and --lora-rank (the world size may
differ; a checkpoint from before --lora-rank existed trained the rows themselves: rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loki_dist.core import distributed
from loki_dist.core.errors import UserError
from loki_dist.implant.artifacts import checkpoint
from loki_dist.implant.artifacts.checkpoint import FINAL_DIR
from loki_dist.implant.trainer import runlock
from loki_dist.implant.trainer.plan import Plan


def find_resume(plan: Plan) -> Path | None:
    """Take the output directory's run lock (rank 0; released by the recipe's cleanup), then choose the
    checkpoint to resume from, if any: under the lock, so that no other run changes the directory
    meanwhile."""
    lock = runlock.RunLock.acquire(plan.out) if plan.world.is_main else None
    try:
        path = _choose_checkpoint(plan)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    plan.lock = lock
    return path


def _choose_checkpoint(plan: Plan) -> Path | None:
    args, out = plan.args, plan.out
    if (out / FINAL_DIR).exists() and not args.overwrite:
        raise UserError(f"--output-dir {out}: already holds a finished run (pass --overwrite to start over)")
    if args.overwrite or args.resume == "never":
        return None
    if args.resume == "auto":
        path = _newest_loadable(out, plan.world)
    else:
        path = Path(args.resume)
        why = checkpoint.damage(path) if path.is_dir() else "not a directory"
        if why is not None:
            raise UserError(f"--resume {path}: not a loadable loki_dist checkpoint: {why}")
    if path is not None:
        saved = json.loads((path / checkpoint.STATE_FILE).read_text())
        expected = {
            "base_fingerprint": plan.base_print,
            "positions": plan.positions,
            "data_fingerprint": plan.data_print,
            "global_batch": plan.global_batch,
            "lora_rank": args.lora_rank,
            "train_bias": args.train_bias,
        }
        unset = {"lora_rank": 0, "train_bias": False}  # what a checkpoint from before either flag ran
        for key, value in expected.items():
            was = saved.get(key, unset.get(key))
            if was != value:
                raise UserError(
                    f"--resume {path}: its {key} ({was}) differs from this run's ({value}); resume needs "
                    "the same base, positions, data, global batch size, --lora-rank and --train-bias"
                )
    return path


def _newest_loadable(out: Path, world: distributed.World) -> Path | None:
    """The newest checkpoint in OUT that can be resumed from; a newer damaged one is skipped with a
    warning naming it, and a directory whose every checkpoint is damaged is refused."""
    damaged = []
    for path in reversed(checkpoint.checkpoint_dirs(out)) if out.is_dir() else []:
        why = checkpoint.damage(path)
        if why is None:
            break
        damaged.append(f"{path} ({why})")
    else:
        if damaged:
            raise UserError(
                f"--output-dir {out}: no checkpoint in it can be resumed from: {'; '.join(damaged)}; pass "
                "--resume never to start over beside them, or --overwrite to delete them first"
            )
        return None
    if world.is_main:
        for line in damaged:
            print(f"loki-dist train: warning: skipping damaged {line}; resuming from {path}", file=sys.stderr)
    return path
