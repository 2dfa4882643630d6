"""DeepSpeed configs: find them, and fill their "auto" values from the command line.

A value written in the config and a flag given on the command line must agree: silently preferring one
of them is how a run ends up with a batch size nobody asked for. A flag left out takes the config's value
when the config has one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NoReturn

from loki_dist.core import checks
from loki_dist.core.errors import UserError

AUTO = "auto"
SHIPPED = Path(__file__).resolve().parents[1] / "ds_configs"


def resolve_path(name: str) -> Path | None:
    """`none` -> no DeepSpeed; a path; or the name of a config shipped with loki_dist (zero3, zero2...)."""
    if name.lower() == "none":
        return None
    path = Path(name)
    if path.is_file():
        return path
    if str(path.parent) in (".", "ds_configs"):  # the repository's relative path, run from elsewhere
        shipped = SHIPPED / f"{path.stem}.json"
        if shipped.is_file():
            return shipped
    raise UserError(
        f"--ds-config {name}: file not found (give a path, a shipped name such as zero3, or none)"
    )


def load(name: str) -> dict | None:
    path = resolve_path(name)
    if path is None:
        return None
    config = checks.read_json(path, "--ds-config")  # one line for unreadable, invalid or too deep JSON
    if not isinstance(config, dict):
        raise UserError(f"--ds-config {path}: expected a JSON object of DeepSpeed settings")
    check_values(config, path)
    return config


# --------------------------------------------------------------------------------------- value checks

# the settings loki_dist reads or fills, by what they must hold; "auto" where HF and loki_dist fill it
_COUNTS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_SWITCHED = ("bf16", "fp16")  # {"enabled": true, false or "auto", ...}


def check_values(config: dict, path: Path | str) -> None:
    """The values loki_dist reads (or fills) must be of the type DeepSpeed expects, or "auto" where it is
    filled: `"bf16": true` or a batch size of "4" otherwise ends in a traceback after the process group
    has formed (or, as 2.5 accumulation steps, in the data sampler)."""

    def refuse(key: str, value, expected: str) -> NoReturn:
        raise UserError(f"--ds-config {path}: {key} {_shown(value)}: expected {expected}")

    for key in _COUNTS:
        value = config.get(key)
        if value is not None and value != AUTO and not (_is_int(value) and value >= 1):
            refuse(key, value, 'a positive integer or "auto"')
    clip = config.get("gradient_clipping")
    if clip is not None and clip != AUTO and not (_is_number(clip) and math.isfinite(clip) and clip >= 0):
        refuse("gradient_clipping", clip, 'a number, 0 or more, or "auto"')
    for key in _SWITCHED:
        if key in config and not isinstance(config[key], dict):
            refuse(key, config[key], 'an object such as {"enabled": "auto"}')
        enabled = _get(config, f"{key}.enabled")
        if enabled is not None and enabled != AUTO and not isinstance(enabled, bool):
            refuse(f"{key}.enabled", enabled, 'true, false or "auto"')
    if "zero_optimization" in config and not isinstance(config["zero_optimization"], dict):
        refuse("zero_optimization", config["zero_optimization"], 'an object such as {"stage": 3}')
    stage = _get(config, "zero_optimization.stage")
    if stage is not None and not (_is_int(stage) and stage in (0, 1, 2, 3)):
        refuse("zero_optimization.stage", stage, "0, 1, 2 or 3")
    every = config.get("steps_per_print")  # DeepSpeed takes the step modulo it: 0 fails the first step
    if every is not None and not (_is_int(every) and every >= 1):
        refuse("steps_per_print", every, "a positive integer")


def check_training(config: dict, name: str, micro: int, accum: int, ranks: int) -> None:
    """What `loki-dist train` fills must not overrule the config unsaid: a concrete train_batch_size is
    micro batch x accumulation x ranks (it was replaced by that), and fp16, which train does not run
    (--precision: bf16 or fp32), is not enabled."""
    batch = micro * accum * ranks
    given = settle(config, "train_batch_size", "train_batch_size", None, batch)
    if given != batch:
        raise UserError(
            f"--ds-config {name}: train_batch_size {given} is not --micro-batch-size {micro} x "
            f'--gradient-accumulation {accum} x {ranks} ranks = {batch}; leave it "auto"'
        )
    if settle(config, "fp16.enabled", "fp16.enabled", None, False) is True:
        raise UserError(
            f"--ds-config {name}: fp16.enabled true: loki-dist train runs in bf16 or fp32 (--precision); "
            'set it to false or "auto"'
        )


def _is_int(value) -> bool:
    return type(value) is int  # JSON's true is a bool, which Python counts as an int


def _is_number(value) -> bool:
    return type(value) in (int, float)


def _shown(value) -> str:
    """A value as the JSON file spells it, bounded: a whole object or list is not worth a long line."""
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[...]"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(config: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def settle(config: dict | None, key: str, flag: str, given, default):
    """One setting's value: the flag if given, else the config's concrete value, else the default.

    A concrete config value that differs from a given flag is an error naming both.
    """
    in_config = _get(config, key) if config is not None else None
    if isinstance(in_config, dict) and "enabled" in in_config:
        in_config = in_config["enabled"]
    concrete = in_config is not None and in_config != AUTO
    if given is not None:
        if concrete and in_config != given:
            raise UserError(f"{flag} {given} contradicts {key}={in_config!r} in the DeepSpeed config")
        return given
    return in_config if concrete else default


def fill(config: dict, values: dict[str, object]) -> dict:
    """A copy of the config with the given dotted keys set (their settled values)."""
    filled = json.loads(json.dumps(config))
    for key, value in values.items():
        _set(filled, key, value)
    return filled


# ZeRO-3 settings whose right value follows the model's size, in elements, from one decoder layer's
# parameters and the hidden size. DeepSpeed's fixed defaults suit none of the sizes loki_dist runs: a
# prefetch bucket of 5e7 is less than one MLP weight of a 70B model (no prefetch at all), while live and
# reuse limits of 1e9 keep a model below a billion parameters gathered whole from its forward into its
# backward (a rank then holds the whole model, not its share). Filled where a config says "auto" or
# leaves the key out (the shipped configs leave out the two that transformers' own "auto" does not know).
ZERO3_SIZED = {
    # fetch the next decoder layer while this one runs
    "zero_optimization.stage3_prefetch_bucket_size": lambda layer, hidden: layer,
    # the running layer and the prefetched one: never the whole model
    "zero_optimization.stage3_max_live_parameters": lambda layer, hidden: 2 * layer,
    # keep gathered only what is used again within a layer's worth of work (the last layer's forward
    # into its backward), not everything used again within a billion elements
    "zero_optimization.stage3_max_reuse_distance": lambda layer, hidden: layer,
    # norms and biases stay whole on every rank (transformers' "auto" value)
    "zero_optimization.stage3_param_persistence_threshold": lambda layer, hidden: 10 * hidden,
}


def size_zero3(config: dict, layer_params: int, hidden: int) -> dict:
    """A copy of a ZeRO-3 config with ZERO3_SIZED filled for a model whose decoder layer has
    `layer_params` elements, where the config says "auto" or leaves them out; concrete values stay."""
    values = {}
    for key, size in ZERO3_SIZED.items():
        if _get(config, key) in (None, AUTO):
            values[key] = size(layer_params, hidden)
    return fill(config, values)


HPZ = "zero_optimization.zero_hpz_partition_size"


def in_node_partition(config: dict, ranks_per_node: int, world_size: int) -> dict:
    """A ZeRO-3 config with ZeRO++'s in-node secondary partition (each node keeps its own copy of the
    weights, split over its ranks) where the job spans several nodes and the config leaves it out.

    The frozen 99% of the model never changes, so its copy is cut once and every later gather of it, in
    the forward and the backward, stays inside the node instead of crossing the network; the rows, the
    only trained weights, are re-gathered from their partitions after each step (DeepSpeed does that).
    It costs each rank the model's bytes / ranks per node (17.5 GB at 70B in bf16 on 8 GPUs a node);
    `"zero_hpz_partition_size": 1` in the config turns it off."""
    several = 1 < ranks_per_node < world_size and world_size % ranks_per_node == 0
    if _get(config, HPZ) is not None or not several:
        return config
    return fill(config, {HPZ: ranks_per_node})


def zero_stage(config: dict | None) -> int | None:
    """None when DeepSpeed is not used at all."""
    if config is None:
        return None
    return int(_get(config, "zero_optimization.stage") or 0)


def check_with_deepspeed(config: dict, name: str) -> None:
    """Have DeepSpeed read a filled config now, before the model loads: any other value it cannot take
    (a bucket size of "auto", an offload device "gpu", a section that is not an object) is one line
    naming the setting, not a traceback from deepspeed.initialize once the model is in memory.

    The batch arithmetic is left out (DeepSpeed checks train_batch_size against the world size, which it
    does not know before the process group forms; loki_dist computes it itself).
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    def refusal(trial: dict) -> Exception | None:
        try:
            DeepSpeedConfig(trial)
        except Exception as err:  # whatever DeepSpeed raises on a value it cannot read
            return err
        return None

    trial = {key: value for key, value in config.items() if key != "train_batch_size"}
    err = refusal(trial)
    if err is None:
        return
    # the setting to blame: the first top-level key that DeepSpeed refuses on its own
    batch = {key: trial[key] for key in _COUNTS[:2] if key in trial}
    culprit = next((key for key in trial if key not in batch and refusal({**batch, key: trial[key]})), None)
    errors = getattr(err, "errors", None)  # pydantic's ValidationError: where, what it was, why
    if callable(errors) and errors():
        first = errors()[0]
        where = ".".join([culprit or "", *(str(part) for part in first.get("loc", ()))]).strip(".")
        raise UserError(f"--ds-config {name}: {where} {_shown(first.get('input'))}: {first.get('msg')}")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    setting = f"{culprit} {_shown(trial[culprit])}: " if culprit else ""
    raise UserError(f"--ds-config {name}: {setting}DeepSpeed cannot read it ({detail})")
