"""Reaching a trainable down_proj weight's gradient, fp32 master copy and Adam state, however it is held.

Three layouts exist, and the trainer should not care which one it runs on. In each, a rank touches only
its own slice of the fp32 master and of Adam's moments; nothing here gathers a whole weight:
- ZeRO-3: each rank holds a padded slice of every tensor; DeepSpeed's local API reads and writes it.
  Its results may be copies (in bf16 an in-place edit is silently lost), so every edit is read, change,
  write back.
- ZeRO-1/2 (and bf16 at stage 0): parameters are whole on every rank, the fp32 master and the optimizer
  state are flat fragments; each parameter's `_hp_mapping` says which slice of it this rank's fragment is.
- Plain (one process without DeepSpeed, or ZeRO-0 in fp32): the parameter is its own master and
  `optimizer.state[param]` holds the Adam moments; every rank holds all of it, so rank 0 speaks for it.

The selected elements of a weight, taken in flat (row-major) order, form one sequence of k*F numbers per
layer; a rank's slice covers one contiguous range of it (`selected_range`). Checkpoints store and read
exactly those ranges, which is what lets a run resume on any number of ranks. LoKI* (lowrank.py) trains
two parameters per layer, its factors A [k, r] and B [r, F]: each is a state of its own, every one of its
rows selected, told apart by its `part` ("A", "B"; "" where the parameter holds the rows themselves).

The DeepSpeed internals used here are listed in `DEEPSPEED_INTERNALS`; `check_deepspeed_internals`
names the first one an upgrade removed, and a test runs it against real engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from loki_dist.implant.trainer.partition import RowPartition

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
#: DeepSpeed releases whose internals below are tested (pyproject pins the same range)
TESTED_DEEPSPEED = (">=0.19", "<0.20")
#: (where, attribute) pairs this module and the trainer read from DeepSpeed objects
DEEPSPEED_INTERNALS = {
    "zero3_param": ("ds_id", "ds_tensor", "ds_numel"),
    "zero3_partition": ("ds_numel",),
    "zero12_param": ("_hp_mapping",),
    "zero12_mapping": ("lp_fragment_address", "get_hp_fragment", "optim_fragment"),
    "zero12_optimizer": ("_lazy_init_hp_params_optimizer_state",),
}
#: the attribute holding the flat fp32 partitions Adam's state is keyed by: ZeRO-3, ZeRO-1/2, bf16 ZeRO-0
HOLDERS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


class Slice:
    """One quantity's local slice on this rank, and the one way to change it in every layout.

    A layout's tensor may be a view (an edit lands at once) or a copy (ZeRO-3: in bf16 an in-place edit
    alone is silently lost), so every edit is read, change, write back; `write` is None for views.
    """

    def __init__(
        self,
        get: Callable[[], torch.Tensor],
        write: Callable[[torch.Tensor], None] | None,
        partition: RowPartition,
    ):
        self._get, self._write, self.partition = get, write, partition

    def read(self) -> torch.Tensor:
        return self._get()[: self.partition.length]

    @contextmanager
    def edit(self) -> Iterator[torch.Tensor]:
        with torch.no_grad():  # masters are leaf tensors that require grad in some layouts
            local = self._get()
            yield local[: self.partition.length]
            if self._write is not None:
                self._write(local)

    def selected_range(self) -> tuple[int, int]:
        """[begin, end) of the layer's selected sequence that this slice covers."""
        p = self.partition
        return p.selected_before(p.start), p.selected_before(p.start + p.length)

    def take(self) -> torch.Tensor:
        """This rank's selected elements of the quantity, in flat order (its `selected_range`)."""
        return self.partition.take(self.read())

    def put(self, selected: torch.Tensor) -> None:
        """Inverse of take: write the selected elements of this rank's slice."""
        with self.edit() as local:
            self.partition.put_(local, selected.to(local.device))


class RowState:
    """One layer's trainable weight on this rank, the slice of it this rank owns, and one named method
    per quantity, each returning that quantity's `Slice`.

    grad(), master() (fp32 weights the optimizer updates), exp_avg() and exp_avg_sq() (Adam's moments)
    cover `partition`, this rank's slice of the optimizer's view; model() (the weight the forward pass
    uses, possibly bf16) covers `model_partition`.
    """

    #: gradients of this layout are masked by a tensor hook rather than edited after backward
    masks_by_hook = False
    #: whether this rank's slice is its own (sharded layouts) or a copy every rank holds (plain)
    owns_slice = True

    def __init__(self, layer: int, param: torch.nn.Parameter, partition: RowPartition, rows: torch.Tensor):
        self.layer, self.param, self.partition, self.rows = layer, param, partition, rows
        self.model_partition = partition
        self.part = ""  # which of the layer's trained parameters: "" (the rows), "A" or "B" (LoKI*)

    @property
    def key(self) -> str:
        """The state's name in a checkpoint: the layer, and its part where the layer has several."""
        return f"{self.layer}.{self.part}" if self.part else str(self.layer)

    @property
    def shape(self) -> list[int]:
        """The parameter's whole shape [rows, row length], however it is held."""
        return [self.partition.selected.numel(), self.partition.row_len]

    @property
    def needs_mask(self) -> bool:
        """False when every row of the parameter trains (the split layout): nothing to mask."""
        return not bool(self.partition.selected.all())

    @property
    def num_selected(self) -> int:
        """k*F: the length of the layer's selected sequence."""
        return int(self.partition.selected.sum()) * self.partition.row_len

    def grad(self) -> Slice:
        raise NotImplementedError

    def master(self) -> Slice:
        raise NotImplementedError

    def exp_avg(self) -> Slice:
        raise NotImplementedError

    def exp_avg_sq(self) -> Slice:
        raise NotImplementedError

    def model(self) -> Slice:
        raise NotImplementedError


class PlainRowState(RowState):
    """No DeepSpeed: the parameter is its own master, `optimizer.state[param]` holds the moments; every
    accessor is a view, so edits land at once."""

    owns_slice = False  # replicated: every rank holds the same values

    def __init__(self, layer, param, partition, rows, optimizer: torch.optim.Optimizer):
        super().__init__(layer, param, partition, rows)
        self.optimizer = optimizer

    def grad(self) -> Slice:
        return Slice(lambda: self.param.grad.view(-1), None, self.partition)

    def master(self) -> Slice:
        return Slice(lambda: self.param.data.view(-1), None, self.partition)

    def exp_avg(self) -> Slice:
        return Slice(lambda: self.optimizer.state[self.param]["exp_avg"].view(-1), None, self.partition)

    def exp_avg_sq(self) -> Slice:
        return Slice(lambda: self.optimizer.state[self.param]["exp_avg_sq"].view(-1), None, self.partition)

    def model(self) -> Slice:
        return Slice(lambda: self.param.data.view(-1), None, self.model_partition)


def _zero3_api():
    """deepspeed.utils, whose safe_{get,set}_local_* reach a rank's own ZeRO-3 slice (imported on use:
    DeepSpeed is heavy)."""
    from deepspeed import utils

    return utils


class Zero3RowState(RowState):
    """ZeRO-3: DeepSpeed's local API; its results may be copies, so each edit is written back."""

    def grad(self) -> Slice:
        ds = _zero3_api()
        return Slice(
            lambda: ds.safe_get_local_grad(self.param),
            lambda value: ds.safe_set_local_grad(self.param, value),
            self.partition,
        )

    def master(self) -> Slice:
        ds = _zero3_api()
        return Slice(
            lambda: ds.safe_get_local_fp32_param(self.param),
            lambda value: ds.safe_set_local_fp32_param(self.param, value),
            self.partition,
        )

    def exp_avg(self) -> Slice:
        return self._moment("exp_avg")

    def exp_avg_sq(self) -> Slice:
        return self._moment("exp_avg_sq")

    def _moment(self, key: str) -> Slice:
        """`key`: DeepSpeed's (and torch Adam's) name of the moment, one of ADAM_STATE_KEYS."""
        ds = _zero3_api()
        return Slice(
            lambda: ds.safe_get_local_optimizer_state(self.param, key),
            lambda value: ds.safe_set_local_optimizer_state(self.param, value, key),
            self.partition,
        )

    def model(self) -> Slice:
        return Slice(lambda: self.param.ds_tensor.data.view(-1), None, self.model_partition)


class FragmentRowState(RowState):
    """ZeRO-1/2: this rank's fp32 fragment of a whole parameter, read and written in place."""

    masks_by_hook = True

    def __init__(self, layer, param, partition, rows):
        super().__init__(layer, param, partition, rows)
        self.model_partition = RowPartition.whole(partition.selected, partition.row_len)
        self.mapping = param._hp_mapping  # None where this rank's partition misses the parameter

    def grad(self) -> Slice:
        def refuse() -> torch.Tensor:
            raise RuntimeError("ZeRO-1/2 gradients are masked by a tensor hook, not edited")

        return Slice(refuse, None, self.partition)

    def master(self) -> Slice:
        return self._fragment(None)

    def exp_avg(self) -> Slice:
        return self._fragment("exp_avg")

    def exp_avg_sq(self) -> Slice:
        return self._fragment("exp_avg_sq")

    def _fragment(self, key: str | None) -> Slice:
        """`key`: DeepSpeed's name of an optimizer state, None for the fp32 master. Fragments are views
        of the optimizer's flat partitions: edits land at once."""

        def get() -> torch.Tensor:
            if self.mapping is None:
                return torch.empty(0)
            return self.mapping.get_hp_fragment(key).view(-1)

        return Slice(get, None, self.partition)

    def model(self) -> Slice:
        return Slice(lambda: self.param.data.view(-1), None, self.model_partition)


def build(
    layer: int,
    param: torch.nn.Parameter,
    selected: torch.Tensor,
    row_len: int,
    rank: int,
    optimizer: torch.optim.Optimizer,
    rows: list[int],
    part: str = "",
) -> RowState:
    """Pick the layout from the parameter itself (ZeRO-3 params carry ds_id, ZeRO-1/2 _hp_mapping).

    `selected` marks the parameter's rows that train, each `row_len` long; `rows` names the down_proj
    rows they are (all of the parameter's rows in the split layout, where it holds only the selected
    ones), or, for one of LoKI*'s factors (`part` "A" or "B"), the down_proj rows it updates.
    """
    row_ids = torch.tensor(rows, dtype=torch.long)
    if hasattr(param, "ds_id"):
        partition = RowPartition.of_rank(selected, row_len, rank, param.ds_tensor.ds_numel)
        state: RowState = Zero3RowState(layer, param, partition, row_ids)
    elif hasattr(param, "_hp_mapping"):  # None on ranks whose partition misses this param, but present
        address = param._hp_mapping.lp_fragment_address if param._hp_mapping is not None else None
        start, length = (address.start, address.numel) if address is not None else (0, 0)
        state = FragmentRowState(layer, param, RowPartition(start, length, row_len, selected), row_ids)
    else:
        state = PlainRowState(layer, param, RowPartition.whole(selected, row_len), row_ids, optimizer)
    state.part = part
    return state


def ensure_adam_state(optimizer: torch.optim.Optimizer, step: int, holders: list[torch.Tensor]) -> None:
    """Create (or overwrite the step of) torch Adam's lazily created state, so a resume can fill it.

    torch.optim.Adam/AdamW create `step`, `exp_avg`, `exp_avg_sq` at the first step(); a resumed run
    must write its saved moments before that, and Adam's bias correction must see the saved step.
    `holders` are the tensors the state is keyed by: the parameters, or DeepSpeed's flat fp32 partitions
    (ZeRO-3 hands them to the optimizer only inside step()).
    """
    for p in holders:
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        old = state.get("step")
        device = old.device if isinstance(old, torch.Tensor) else torch.device("cpu")
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


def optimizer_state_holders(
    optimizer: torch.optim.Optimizer, zero_optimizer: object | None
) -> list[torch.Tensor]:
    """The tensors Adam's state is keyed by, for each layout (see ensure_adam_state)."""
    for name in HOLDERS:
        if zero_optimizer is not None and hasattr(zero_optimizer, name):
            return list(getattr(zero_optimizer, name))
    return [p for group in optimizer.param_groups for p in group["params"]]


def _internal_objects(engine) -> Iterator[tuple[str, object]]:
    """(kind, object) pairs to check, each reached only through the ones checked before it."""
    stage = engine.zero_optimization_stage()
    trainable = [p for p in engine.module.parameters() if p.requires_grad][:1]
    if stage == 3:
        for param in trainable:
            yield "zero3_param", param
            yield "zero3_partition", param.ds_tensor
    elif stage in (1, 2):
        yield "zero12_optimizer", engine.optimizer
        for param in trainable:
            yield "zero12_param", param
            if param._hp_mapping is not None:
                yield "zero12_mapping", param._hp_mapping


def check_deepspeed_internals(engine) -> None:
    """Raise naming the first DeepSpeed internal this code relies on that `engine` lacks.

    loki_dist reads a few private attributes of DeepSpeed (no public API reaches a rank's own slice of
    the master weights and moments). An upgrade that renamed one would otherwise surface as a wrong
    layout or a silent no-op; this makes it one clear error at start-up.
    """
    import deepspeed

    def missing(what: str) -> RuntimeError:
        return RuntimeError(
            f"DeepSpeed {deepspeed.__version__}: {what}, which loki_dist relies on; loki_dist is tested "
            f"with deepspeed{','.join(TESTED_DEEPSPEED)}"
        )

    zero = engine.optimizer
    if engine.zero_optimization_stage() > 0 and not any(hasattr(zero, name) for name in HOLDERS):
        raise missing(f"{type(zero).__name__} has none of {', '.join(HOLDERS)}")
    for kind, obj in _internal_objects(engine):
        for attribute in DEEPSPEED_INTERNALS[kind]:
            if not hasattr(obj, attribute):
                raise missing(f"{type(obj).__name__} has no attribute {attribute!r} ({kind})")
