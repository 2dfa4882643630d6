"""The trained rows of a down_proj as their own parameter (`train --row-params split`).

Masking keeps a whole [D, F] weight trainable and throws most of its gradient away; at q = 10% autograd
still computes the full dW = dY^T X, and Adam keeps fp32 state for every element. Splitting the weight
instead makes only the selected rows a parameter, [k, F]:

    y = x W^T  with columns S replaced by  x R^T,   R = W[S] (trainable), W frozen

so autograd computes dR = dY[:, S]^T X only (k/D of the weight-gradient work), the input gradient still
flows through all of W, and the optimizer (and DeepSpeed's fp32 master) holds state for k*F elements
instead of D*F. W itself never changes, so every unselected row is bit-identical by construction.
Checkpoints, exports and implants are the same as with masking: they only ever hold the rows.

A down_proj with a bias (GPT-NeoX, Llama with mlp_bias) can train its selected rows' bias entries too
(`train --train-bias`, `implant_rows(bias=True)`; the LoKI reference trains them): b[S] becomes its own
parameter [k] beside R, written back with the rows wherever rows are written (checkpoints hold it as the
entry "<layer>.bias", implant files as `layers.<l>.bias`). Every other bias entry stays the base's.

RowLinear is what every row layout shares (the frozen base Linear, the rows, and how the API reads the
trained rows back); LoKI*'s low-rank rows (lowrank.py) are the other layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowLinear(nn.Module):
    """A down_proj whose rows `rows` train in some parametrisation, over the frozen base Linear.

    The base's weight and bias are this module's parameters too (shared, frozen), so that ZeRO-3 gathers
    them for its forward; the base module itself is kept aside for merge_rows to put back.
    """

    def __init__(self, base: nn.Linear, rows: list[int], device: torch.device):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the frozen base parameters, shared
        self.__dict__["base"] = base  # not a submodule: merge_rows puts it back, state_dict skips it
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long, device=device), persistent=False)

    def parts(self) -> dict[str, nn.Parameter]:
        """What trains, by the name a checkpoint gives it ("" where the parameter is the rows)."""
        raise NotImplementedError

    def inputs(self) -> list[nn.Parameter]:
        """The parameters whose whole values `rows_value` reads (to gather first under ZeRO-3)."""
        raise NotImplementedError

    def rows_value(self, dtype: torch.dtype) -> torch.Tensor:
        """The trained rows [k, F] in `dtype`, from the whole values of `inputs()`."""
        raise NotImplementedError

    def bias_value(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The trained bias entries [k] in `dtype` (None where the bias does not train)."""
        return None


class RowSplitLinear(RowLinear):
    """A Linear whose rows `rows` come from the trainable `trained` [k, in] instead of `weight`, and
    their bias entries from `trained_bias` [k] where given (else from the frozen bias)."""

    def __init__(
        self, base: nn.Linear, rows: list[int], trained: torch.Tensor, bias: torch.Tensor | None = None
    ):
        super().__init__(base, rows, trained.device)
        self.trained = nn.Parameter(trained)
        self.trained_bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        bias = self.trained_bias
        if bias is None and self.bias is not None:
            bias = self.bias[self.rows]
        return out.index_copy(-1, self.rows, F.linear(x, self.trained, bias))

    def parts(self) -> dict[str, nn.Parameter]:
        parts = {"": self.trained}
        return parts if self.trained_bias is None else {**parts, "bias": self.trained_bias}

    def inputs(self) -> list[nn.Parameter]:
        return list(self.parts().values())

    def rows_value(self, dtype: torch.dtype) -> torch.Tensor:
        return self.trained.data.to(dtype)

    def bias_value(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.trained_bias is None else self.trained_bias.data.to(dtype)


def selected_rows(linear: nn.Linear, rows: list[int], of: str = "weight") -> torch.Tensor:
    """A copy of linear.weight[rows] (or of its bias), gathered first if ZeRO-3 has partitioned it."""
    param = getattr(linear, of)
    index = torch.tensor(rows, dtype=torch.long)
    if not hasattr(param, "ds_id"):
        return param.data[index.to(param.device)].clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.data[index.to(param.device)].clone()


def split(
    parent: nn.Module, attribute: str, rows: list[int], ds_config: dict | None = None, bias: bool = False
) -> RowSplitLinear:
    """Replace parent.<attribute> (a Linear) by a RowSplitLinear, which it returns (ds_config: install's);
    `bias`: the rows' bias entries train too (the Linear must have a bias)."""
    base = getattr(parent, attribute)
    trained_bias = selected_rows(base, rows, "bias") if bias else None
    split_linear = RowSplitLinear(base, rows, selected_rows(base, rows), trained_bias)
    return install(parent, attribute, split_linear, ds_config)


def install(parent: nn.Module, attribute: str, module: RowLinear, ds_config: dict | None = None) -> RowLinear:
    """Put `module` in the place of parent.<attribute>, its new parameters partitioned at once under
    ZeRO-3, where the base weight's partition lives. Left whole, every rank would hold every layer's new
    parameters until deepspeed.initialize (3.8 GB at 70B, q = 10, bf16, for the split rows).

    With the run's DeepSpeed config (`ds_config`, what `loki-dist train` passes) they are partitioned
    exactly as the model's own parameters were: offloaded where its `offload_param` says (CPU or NVMe,
    pinned or not), with ZeRO++'s in-node copy in the base weight's group, quantized where it says.
    Without it (a caller's own model), they follow where the base weight's partition lives (CPU or not).
    """
    weight = module.weight
    if hasattr(weight, "ds_id"):
        import deepspeed

        new = next(iter(module.parts().values()))
        if ds_config is not None:
            deepspeed.zero.Init(
                module=module,
                config_dict_or_path=ds_config,
                dtype=new.dtype,  # what a config without bf16 or fp16 leaves it
                zero_param_parallel_group=getattr(weight, "ds_zero_param_process_group", None),
            )
        else:
            held = weight.ds_tensor
            offloaded = held.device.type == "cpu" and new.device.type != "cpu"
            deepspeed.zero.Init(
                module=module,
                remote_device="cpu" if offloaded else None,
                pin_memory=offloaded and held.is_pinned(),
                dtype=new.dtype,
            )
    setattr(parent, attribute, module)
    return module
