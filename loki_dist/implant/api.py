"""The Python API: LoKI's row training inside any Hugging Face training loop, PEFT-shaped.

    model = AutoModelForCausalLM.from_pretrained(base)      # whole, or sharded by HF's ZeRO-3 zero.Init
    model = loki_dist.implant_rows(model, "positions.json")  # only the selected down_proj rows train
    ...                                                      # transformers.Trainer, accelerate, a loop
    loki_dist.save_implant(model, "implant.safetensors", base=base)
    merged = loki_dist.merge_rows(model)                     # plain nn.Linear again: save_pretrained

The rows become their own parameter per layer (rowsplit.RowSplitLinear), or, with `rank=R`, LoKI*'s
low-rank factors A and B of W_S = W_S0 + A B (lowrank.RowLowRankLinear), so any optimizer's weight decay
touches only them, any ZeRO stage shards only them, and every other tensor is not a parameter that trains
at all. `loki-dist train` builds its default (split) layout and LoKI*'s through `implant_rows` as well.
Whatever the layout, `save_implant` and `merge_rows` write plain trained rows.

Under ZeRO-3 `save_implant` and `merge_rows` are collective (every rank calls them, as it calls HF's own
save under ZeRO-3): they gather one layer at a time, so no rank ever holds more than one layer's weight.
Before the first gather every rank has made the same checks and come to the same decision (a rank that
refused alone would leave its peers waiting in a gather): the output (never over one of the call's
inputs, as the CLI's outputs) and the rows (finite, as `apply` wants them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from loki_dist.core import checks, collectives, distributed, positions
from loki_dist.core.errors import UserError
from loki_dist.core.families import down_proj_slots, spec_from_config, spec_from_dir
from loki_dist.implant.artifacts.export import BaseShards, non_finite_rows
from loki_dist.implant.artifacts.implant_file import RowSource, fingerprint, write_implant
from loki_dist.implant.trainer import lowrank, rowsplit


def implant_rows(
    model: nn.Module,
    rows: str | Path | Sequence[Sequence[int]],
    rank: int = 0,
    seed: int = 0,
    *,
    ds_config: dict | None = None,
    bias: bool = False,
) -> nn.Module:
    """Freeze `model` and make trainable only the down_proj rows in `rows`, a positions file or L lists.

    rank 0: the rows themselves train (parameters `...down_proj.trained`, [k, F]); with `bias`, their
    bias entries too (`...down_proj.trained_bias`, [k]; the down_proj must have a bias). rank R > 0: LoKI*,
    the rows are W_S0 + A B with A [k, R] (zero at first) and B [R, F] (kaiming-uniform as PEFT draws
    lora_A, from a generator seeded with `seed`: the same on every rank), parameters `...down_proj.A` and
    `...down_proj.B` (trainer/lowrank.py). Returns the same model, changed in place (as PEFT's get_peft_model
    wraps it): call it before the optimizer is built, so that the optimizer sees what trains and nothing
    else. ds_config: under ZeRO-3, the run's DeepSpeed config (no "auto" left), so that the new
    parameters are partitioned as the model's own (offload, ZeRO++'s in-node copy); without it they
    follow where the base weight's partition lives.
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
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise UserError(f"implant_rows: rank {rank!r}: expected an integer, 0 (the rows) or more (LoKI*)")
    lowrank.check_rank(rank, chosen, spec.intermediate_size, "implant_rows: rank")
    if bias and rank:
        raise UserError("implant_rows: bias=True trains bias entries beside the rows; LoKI* (rank > 0) "
                        "trains A and B only")  # fmt: skip
    if bias and any(getattr(parent, attribute).bias is None for parent, attribute in down_proj_slots(model)):
        raise UserError("implant_rows: bias=True, but this model's down_proj has no bias to train")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for (parent, attribute), layer_rows in zip(down_proj_slots(model), chosen, strict=True):
        if not layer_rows:
            continue
        if rank:
            module = lowrank.attach(parent, attribute, layer_rows, rank, generator, ds_config)
        else:
            module = rowsplit.split(parent, attribute, layer_rows, ds_config, bias=bias)
        for param in module.parts().values():
            param.requires_grad_(True)
    return model


def implanted_layers(model: nn.Module) -> list[tuple[int, rowsplit.RowLinear]]:
    """(layer, module) of every down_proj whose rows train, in layer order."""
    found = []
    for layer, (parent, attribute) in enumerate(down_proj_slots(model)):
        module = getattr(parent, attribute)
        if isinstance(module, rowsplit.RowLinear):
            found.append((layer, module))
    return found


def _gathered(*params: nn.Parameter, modifier_rank: int | None = None):
    """The whole tensors of ZeRO-3 partitioned parameters for the block (a collective); else nothing.
    Each parameter once, however often it is named (LoKI*'s rows read the base weight itself)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    unique = list({id(p): p for p in params}.values())
    return deepspeed.zero.GatheredParameters(unique, modifier_rank=modifier_rank)


def merge_rows(model: nn.Module) -> nn.Module:
    """Write the trained rows into their down_proj weights and put back the plain nn.Linear modules.

    Returns the same model with standard Hugging Face modules only (save_pretrained, from_pretrained and
    any inference engine see an ordinary model). Under ZeRO-3 rank 0's merged weight is re-partitioned.
    The merged down_proj weights stay frozen, as every other base tensor.
    """
    layers = implanted_layers(model)
    if not layers:
        raise UserError("merge_rows: the model has no implanted rows (implant_rows was not called)")
    _refuse_non_finite("merge_rows", _trained_values(layers, {layer: m.weight.dtype for layer, m in layers}))
    slots = down_proj_slots(model)
    for layer, module in layers:
        base = module.base
        trained_bias = module.parts().get("bias") is not None
        written = [base.weight, base.bias] if trained_bias else [base.weight]
        with _gathered(*written, *module.inputs(), modifier_rank=0), torch.no_grad():
            rows = module.rows_value(base.weight.dtype)
            base.weight.data[module.rows.to(base.weight.device)] = rows.to(base.weight.device)
            if trained_bias:
                values = module.bias_value(base.bias.dtype)
                base.bias.data[module.rows.to(base.bias.device)] = values.to(base.bias.device)
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
        module = self.modules[layer]
        with _gathered(*module.inputs()):
            return module.rows_value(dtype).detach().to("cpu", copy=True)

    def has_bias(self, layer: int) -> bool:
        return "bias" in self.modules[layer].parts()

    def bias(self, layer: int, dtype: torch.dtype) -> torch.Tensor | None:
        module = self.modules[layer]
        if not self.has_bias(layer):
            return None
        with _gathered(*module.inputs()):
            return module.bias_value(dtype).detach().to("cpu", copy=True)


def save_implant(
    model: nn.Module, path: str | Path, base: str | Path | None = None, overwrite: bool = False
) -> Path | None:
    """Write the implant file of an implanted model: its rows in the base model's dtype, per layer.

    `base` is the base model's directory (default: where `model` was loaded from); the file records its
    fingerprint, so that `loki-dist apply` merges it into that base only. Collective under ZeRO-3; rank 0
    writes (atomically) and returns the path, other ranks return None. An existing file is refused
    unless `overwrite`; a path that is, lies in or holds the base or the model's own directory (through
    symlinks) is refused whatever `overwrite` says.
    """
    source = _ModelRows(model)
    trained = [p for m in source.modules.values() for p in m.parts().values()]
    with _checked_together(_sharded(trained)):
        if not source.layers():
            raise UserError("save_implant: the model has no implanted rows (save it before merge_rows)")
        base_dir = Path(base if base is not None else getattr(model.config, "_name_or_path", "") or ".")
        spec = spec_from_dir(base_dir, "base")
        if spec != spec_from_config(model.config):
            raise UserError(f"save_implant: base {base_dir} is not the model's architecture ({spec})")
        path = Path(path)
        loaded_from = getattr(model.config, "_name_or_path", "") or None
        inputs = {"base": base_dir, "the model's directory": loaded_from}
        checks.refuse_output_over_inputs("save_implant: path", path, inputs)
        if path.exists() and not overwrite:
            raise UserError(f"save_implant: {path} exists (pass overwrite=True to replace it)")
        checks.check_writable("save_implant", path)
        dtypes = BaseShards.read(base_dir, spec).dtypes
        missing = [layer for layer in source.layers() if layer not in dtypes]
        if missing:
            raise UserError(f"save_implant: base {base_dir} has no down_proj weight for layers {missing}")
    _refuse_non_finite("save_implant", _trained_values(list(source.modules.items()), dtypes))
    if not _is_main():
        for layer in source.layers():  # take part in each layer's gathers, as rank 0 does while writing
            source.weight(layer, torch.float32)
            source.bias(layer, torch.float32)
        return None
    write_implant(path, source, spec, dtypes, fingerprint(base_dir))
    return path


def _sharded(params: Iterable[nn.Parameter]) -> bool:
    """Whether ZeRO-3 has partitioned these parameters (then the call is a collective)."""
    return any(hasattr(param, "ds_id") for param in params)


def _checked_together(sharded: bool):
    """Where a call's checks run: under ZeRO-3 (a collective call) on every rank, and the ranks agree on
    what any of them found (a file one node does not see) before the first gather. Otherwise in the
    calling process alone, which may be rank 0 alone (as a DDP script saves): no collective at all."""
    if not sharded:
        return contextlib.nullcontext()
    return distributed.agreement(distributed.joined_world(), choose_device=False)


def _trained_values(
    layers: list[tuple[int, rowsplit.RowLinear]], dtypes: dict[int, torch.dtype]
) -> list[tuple[int, nn.Parameter, torch.dtype]]:
    """(layer, parameter, dtype to check it in) for what trains in each layer: the rows in the dtype they
    are written in (`dtypes`); LoKI*'s factors A and B in their own (a non-finite factor makes every
    merged row it touches non-finite)."""
    return [
        (layer, param, dtypes[layer] if name in ("", "bias") else param.dtype)
        for layer, module in layers
        for name, param in module.parts().items()
    ]


def _refuse_non_finite(caller: str, values: list[tuple[int, nn.Parameter, torch.dtype]]) -> None:
    """Refuse trained values that hold NaN or Inf in the dtype they are checked in ((layer, parameter,
    dtype) triples), naming the first such layer, before anything is gathered or written.

    Under ZeRO-3 no rank holds a layer's rows whole: each counts the non-finite values of its own
    partition and one all-reduce sums the counts (no gather), so every rank reaches the same decision
    from the same numbers. Otherwise the calling process holds every row itself and decides alone.
    """
    counts = torch.tensor([_non_finite_held(p, dtype) for _, p, dtype in values], dtype=torch.int64)
    if _sharded(param for _, param, _ in values):
        collectives.all_reduce_sum(counts)
    for (layer, _, dtype), count in zip(values, counts.tolist(), strict=True):
        if count:
            raise non_finite_rows(caller, layer, count, dtype)


def _non_finite_held(param: nn.Parameter, dtype: torch.dtype) -> int:
    """NaN or Inf (once in `dtype`) among the elements of `param` this rank holds: its ZeRO-3 partition
    (rank r holds flat elements [r*n, (r+1)*n), the last rank's zero-padded), else the whole tensor."""
    held = param.data
    if hasattr(param, "ds_tensor"):
        per_rank = param.ds_tensor.ds_numel
        start = min(torch.distributed.get_rank() * per_rank, param.ds_numel)
        held = param.ds_tensor.data.view(-1)[: min(per_rank, param.ds_numel - start)]
    return int((~torch.isfinite(held.to(dtype))).sum())


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
