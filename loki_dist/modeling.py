"""Loading a causal LM whole, or straight into ZeRO-3 shards.

Under ZeRO-3 the model must never exist whole on one rank (a 70B model is 140 GB in bf16). transformers
loads into `deepspeed.zero.Init` shards, one checkpoint shard at a time, while an HfDeepSpeedConfig of a
stage-3 config is alive; the returned model is frozen and still to be wrapped by deepspeed.initialize.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype, ds_config: dict | None) -> torch.nn.Module:
    """The model with every parameter frozen: whole, or sharded if ds_config is a ZeRO-3 config."""
    from transformers import AutoModelForCausalLM

    from loki_dist.dsconfig import zero_stage

    keep_alive = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - from_pretrained reads it while it lives
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.requires_grad_(False)
    return model


def zero3_share(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model): proof of sharding."""
    held = sum(
        p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in model.parameters()
    )
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return held, total
