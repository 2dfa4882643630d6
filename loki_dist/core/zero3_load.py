"""Loading a model straight into its ZeRO-3 partitions, each rank reading only its own share of the files.

transformers' ZeRO-3 path reads every weight on rank 0 (into its private memory) and, module by module,
gathers each parameter on every rank, copies the file's values in on rank 0 and broadcasts them back:
one reader for the 140 GB of a 70B model, and rank 0 holding all of it. Here the model is built empty
under `deepspeed.zero.Init` (every parameter partitioned as its module is created, random
initialisation skipped), and each rank fills its own partition, `param.ds_tensor`, which holds the flat
elements [p*n, (p+1)*n) of the parameter for partition rank p. Those elements lie in a run of whole
rows of the stored tensor, read with `safe_open(...).get_slice`, so a rank reads its share plus at most
one partial row at each end of each tensor, and nothing moves between ranks.

Stored names are matched to the model's parameters as transformers matches them (its renamings for the
family, the base prefix added or dropped); a tied output embedding is the input embedding's parameter
and is filled once. Anything the files lack, or hold in another shape, is refused before training
starts. A family whose stored tensors need merging or splitting (none of those loki_dist supports
today) is left to transformers' loader.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from loki_dist.core import metering
from loki_dist.core.errors import UserError


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Each stored tensor's safetensors file, from the index or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)  # noqa: SIM118 - safe_open is not a mapping


def _partition_without_broadcast():
    """zero.Init, except that a new parameter is partitioned as it is, without first broadcasting rank
    0's values to every rank: DeepSpeed does that so that random initial values agree, which would cost
    a whole-model broadcast here for values that fill_partitions overwrites on every rank."""
    from deepspeed.runtime.zero.partition_parameters import Init

    class EmptyInit(Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    if not all(hasattr(Init, name) for name in ("_zero_init_param", "_convert_to_deepspeed_param")):
        raise RuntimeError("this DeepSpeed's zero.Init lacks the methods loki_dist's loader overrides")
    return EmptyInit


def build_empty(model_dir: Path, dtype: torch.dtype, ds_config: dict) -> torch.nn.Module:
    """The model's architecture, partitioned as it is built, with no weight initialised.

    transformers' own ZeRO-3 construction (`_from_config` with a live HfDeepSpeedConfig) initialises
    every module afterwards by gathering it whole onto rank 0, and zero.Init broadcasts every new
    parameter from rank 0: two whole-model transfers of values that the files then overwrite. Built
    here under the same contexts without either.
    """
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # never a model's auto_map code
    # the class (and so its module) is resolved before zero.Init: a module imported inside it has its
    # classes' __init__ wrapped by zero.Init and then reset on exit to what the class body defined,
    # dropping any decorator's (transformers' kernel hooks), so that later models of it cannot run
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    contexts = [
        no_init_weights(),
        prevent_arange_dtype_change(),  # RoPE's buffers keep their float32 (it must come before zero.Init)
        # the config's bf16/fp16 setting gives the partitions' dtype (its `dtype` argument is ignored on
        # accelerators without fp16, the CPU among them)
        _partition_without_broadcast()(config_dict_or_path=ds_config),
        set_zero3_state(),  # transformers must not start a zero.Init (and its whole-model init) of its own
    ]
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does after loading: a tied head becomes the embedding's
    model.config._name_or_path = str(model_dir)
    return model


def stored_keys(model: torch.nn.Module, stored: Iterable[str]) -> dict[str, str] | None:
    """Each of the model's parameter and buffer names -> the stored tensor that holds it, as
    transformers maps them (its renamings for the family, the base prefix added or dropped); None
    where a stored tensor needs more than a new name (a merge or split of tensors)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict(keep_vars=True), True)
    prefix = getattr(model, "base_model_prefix", None)
    found = {}
    for key in stored:
        name, converted = rename_source_key(key, renamings, converters, prefix, names)
        if converted is not None:
            return None
        if name in names:
            found.setdefault(name, key)
    return found


def _flat_range(view, begin: int, end: int) -> torch.Tensor:
    """Flat elements [begin, end) of a stored tensor, reading only the rows (of its first dimension)
    that hold them."""
    shape = view.get_shape()
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = begin // row, (end - 1) // row + 1
    rows = view[first:last].reshape(-1)
    metering.count("read", rows.numel() * rows.element_size())
    return rows[begin - first * row : end - first * row]


def fill_partitions(model: torch.nn.Module, model_dir: Path, keys: dict[str, str]) -> None:
    """Copy into every parameter's partition on this rank the stored values of its flat range, and
    into every stored buffer (not partitioned) its whole value. `keys`: stored_keys(model, ...)."""
    import torch.distributed as dist
    from safetensors import safe_open

    files = weight_files(model_dir)
    aliases: dict[int, list[str]] = {}  # a tied parameter has several names; it is filled once
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    handles: dict[Path, object] = {}

    def view(key: str):
        if files[key] not in handles:
            handles[files[key]] = stack.enter_context(safe_open(str(files[key]), framework="pt"))
        return handles[files[key]].get_slice(key)

    with contextlib.ExitStack() as stack, torch.no_grad():
        for name, param in model.named_parameters():
            key = next((keys[alias] for alias in aliases[id(param)] if alias in keys), None)
            if key is None:
                raise UserError(f"--model {model_dir}: the weight files lack {name}")
            stored = view(key)
            if list(stored.get_shape()) != list(param.ds_shape):
                raise UserError(
                    f"--model {model_dir}: {key} holds shape {stored.get_shape()}, the model expects "
                    f"{list(param.ds_shape)}"
                )
            part = param.ds_tensor
            begin = part.ds_numel * dist.get_rank(group=param.ds_process_group)
            end = min(begin + part.ds_numel, param.ds_numel)
            if end > begin:
                part.data[: end - begin].copy_(_flat_range(stored, begin, end))
            if getattr(param, "ds_secondary_tensor", None) is not None:
                # ZeRO++'s in-node copy (zero_hpz_partition_size) was cut from the unfilled values:
                # dropped, DeepSpeed rebuilds it from the partitions at the first gather
                param.ds_secondary_tensor = None
        for name, buffer in model.named_buffers():
            if name in keys:
                value = view(keys[name])[:]
                metering.count("read", value.numel() * value.element_size())
                buffer.copy_(value)


def load_zero3(model_dir: str | Path, dtype: torch.dtype, ds_config: dict) -> torch.nn.Module | None:
    """The model ZeRO-3-partitioned over the process group, each rank having read only its share;
    None where the stored tensors need a conversion that only transformers' own loader makes."""
    model_dir = Path(model_dir)
    model = build_empty(model_dir, dtype, ds_config)
    keys = stored_keys(model, weight_files(model_dir))
    if keys is None:
        return None
    fill_partitions(model, model_dir, keys)
    _load_generation_config(model, model_dir)
    return model.eval()


def _load_generation_config(model: torch.nn.Module, model_dir: Path) -> None:
    """from_pretrained also reads generation_config.json (chat's decoding settings)."""
    if (model_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(model_dir)
