"""The Python API: LoKI's row training inside any Hugging Face training loop, PEFT-shaped.

    model = AutoModelForCausalLM.from_pretrained(base)      # whole, or sharded by HF's ZeRO-3 zero.Init
    model = loki_dist.implant_rows(model, "positions.json")  # only the selected down_proj rows train
    ...                                                      # transformers.Trainer, accelerate, a loop
    loki_dist.save_implant(model, "implant.safetensors", base=base)
    merged = loki_dist.merge_rows(model)                     # plain nn.Linear again: save_pretrained

The rows become their own parameter per layer (rowsplit.RowSplitLinear), so any optimizer's weight decay
touches only them, any ZeRO stage shards only them, and every other tensor is not a parameter that trains
at all. `loki-dist train` builds its default (split) layout through `implant_rows` as well.

Under ZeRO-3 `save_implant` and `merge_rows` are collective (every rank calls them, as it calls HF's own
save under ZeRO-3): they gather one layer at a time, so no rank ever holds more than one layer's weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from loki_dist.core import checks, positions
from loki_dist.core.errors import UserError
from loki_dist.core.families import down_proj_slots, spec_from_config, spec_from_dir
from loki_dist.implant import rowsplit
from loki_dist.implant.export import BaseShards
from loki_dist.implant.implant_file import RowSource, fingerprint, write_implant


def implant_rows(model: nn.Module, rows: str | Path | Sequence[Sequence[int]]) -> nn.Module:
    """Freeze `model` and make trainable only the down_proj rows in `rows`, a positions file or L lists.

    Returns the same model, changed in place (as PEFT's get_peft_model wraps it): call it before the
    optimizer is built, so that the optimizer sees the row parameters and nothing else.
    """
    spec = spec_from_config(model.config)
    if isinstance(rows, (str, Path)):
        chosen = positions.load(rows, spec)
    else:
        chosen = positions.validate([list(r) for r in rows], spec, source="rows")
    if implanted_layers(model):
        raise UserError("implant_rows: the model already has implanted rows (call merge_rows first)")
    if not any(chosen):
        raise UserError("implant_rows: every layer list is empty, nothing would train")
    model.requires_grad_(False)
    for (parent, attribute), layer_rows in zip(down_proj_slots(model), chosen, strict=True):
        if layer_rows:
            rowsplit.split(parent, attribute, layer_rows).requires_grad_(True)
    return model


def implanted_layers(model: nn.Module) -> list[tuple[int, rowsplit.RowSplitLinear]]:
    """(layer, module) of every down_proj whose rows train, in layer order."""
    found = []
    for layer, (parent, attribute) in enumerate(down_proj_slots(model)):
        module = getattr(parent, attribute)
        if isinstance(module, rowsplit.RowSplitLinear):
            found.append((layer, module))
    return found


def _gathered(*params: nn.Parameter, modifier_rank: int | None = None):
    """The whole tensors of ZeRO-3 partitioned parameters for the block (a collective); else nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def merge_rows(model: nn.Module) -> nn.Module:
    """Write the trained rows into their down_proj weights and put back the plain nn.Linear modules.

    Returns the same model with standard Hugging Face modules only (save_pretrained, from_pretrained and
    any inference engine see an ordinary model). Under ZeRO-3 rank 0's merged weight is re-partitioned.
    The merged down_proj weights stay frozen, as every other base tensor.
    """
    layers = implanted_layers(model)
    if not layers:
        raise UserError("merge_rows: the model has no implanted rows (implant_rows was not called)")
    slots = down_proj_slots(model)
    for layer, module in layers:
        base = module.base
        with _gathered(base.weight, module.trained, modifier_rank=0), torch.no_grad():
            base.weight.data[module.rows.to(base.weight.device)] = module.trained.data.to(base.weight.dtype)
        parent, attribute = slots[layer]
        setattr(parent, attribute, base)
    return model


class _ModelRows(RowSource):
    """The trained rows of an implanted model in memory, one layer gathered at a time."""

    def __init__(self, model: nn.Module):
        self.modules = dict(implanted_layers(model))

    def layers(self) -> list[int]:
        return list(self.modules)

    def rows(self, layer: int) -> torch.Tensor:
        return self.modules[layer].rows.cpu()

    def weight(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        trained = self.modules[layer].trained
        with _gathered(trained):
            return trained.data.detach().to("cpu", dtype, copy=True)


def save_implant(
    model: nn.Module, path: str | Path, base: str | Path | None = None, overwrite: bool = False
) -> Path | None:
    """Write the implant file of an implanted model: its rows in the base model's dtype, per layer.

    `base` is the base model's directory (default: where `model` was loaded from); the file records its
    fingerprint, so that `loki-dist apply` merges it into that base only. Collective under ZeRO-3; rank 0
    writes (atomically) and returns the path, other ranks return None. An existing file is refused
    unless `overwrite`.
    """
    source = _ModelRows(model)
    if not source.layers():
        raise UserError("save_implant: the model has no implanted rows (save it before merge_rows)")
    base_dir = Path(base if base is not None else getattr(model.config, "_name_or_path", "") or ".")
    spec = spec_from_dir(base_dir, "base")
    if spec != spec_from_config(model.config):
        raise UserError(f"save_implant: base {base_dir} is not the model's architecture ({spec})")
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"save_implant: {path} exists (pass overwrite=True to replace it)")
    # every check on every rank before the gathers start: a rank that raised after its peers had entered
    # the first gather would leave them waiting there until the process group's timeout
    checks.check_writable("save_implant", path)
    dtypes = BaseShards.read(base_dir, spec).dtypes
    if not _is_main():
        for layer in source.layers():  # take part in each layer's gather, as rank 0 does while writing
            source.weight(layer, torch.float32)
        return None
    write_implant(path, source, spec, dtypes, fingerprint(base_dir))
    return path


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
