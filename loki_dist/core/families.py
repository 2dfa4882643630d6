"""Where each model family keeps its FFN down-projections.

LoKI only ever touches one weight per decoder layer: the Linear F -> D that ends the MLP. Families name
it differently, so this module is the single place that knows the names; everything else asks it for
`down_proj_name(l)` (the tensor name in the safetensors files) or `down_projections(model)` (the
modules), and gets shapes from the config without loading any weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from loki_dist.core.errors import UserError


@dataclass(frozen=True)
class Family:
    layers: str  # attribute path from the *ForCausalLM module to the list of decoder layers
    down_proj: str  # attribute path from one decoder layer to its down-projection Linear


_DECODER = Family(layers="model.layers", down_proj="mlp.down_proj")

FAMILIES: dict[str, Family] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "phi3": _DECODER,
    "gpt_neox": Family(layers="gpt_neox.layers", down_proj="mlp.dense_4h_to_h"),
}


@dataclass(frozen=True)
class ModelSpec:
    """The shapes LoKI needs: L layers, each with a down_proj weight of torch shape [D, F]."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def down_proj_name(self, layer: int, what: str = "weight") -> str:
        """The tensor name of a layer's down_proj weight (or, `what="bias"`, of its bias)."""
        return f"{self.family.layers}.{layer}.{self.family.down_proj}.{what}"

    def layer_of(self, tensor_name: str, what: str = "weight") -> int | None:
        """The layer whose down_proj weight (or `what`) this tensor is, or None."""
        prefix, suffix = f"{self.family.layers}.", f".{self.family.down_proj}.{what}"
        if tensor_name.startswith(prefix) and tensor_name.endswith(suffix):
            middle = tensor_name[len(prefix) : -len(suffix)]
            if middle.isdigit():
                return int(middle)
        return None


def spec_from_config(config: dict | object, source: str = "the model config") -> ModelSpec:
    """Read the shapes from a config (a dict or a transformers PretrainedConfig)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    model_type = get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UserError(f"model type {model_type!r} is not supported; supported model types: {supported}")
    shapes = {}
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        value = get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{source}: `{key}` must be a positive integer, got {value!r}")
        shapes[key] = value
    return ModelSpec(
        model_type, shapes["num_hidden_layers"], shapes["hidden_size"], shapes["intermediate_size"]
    )


def read_config(model_dir: str | Path, flag: str = "--model") -> dict:
    """config.json of a Hugging Face model directory, as a JSON object, or a UserError saying why not."""
    from loki_dist.core.checks import read_json

    if not Path(model_dir).is_dir():
        raise UserError(f"{flag} {model_dir}: directory not found")
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise UserError(f"{flag} {model_dir}: no config.json there; expected a Hugging Face model directory")
    config = read_json(config_path, flag)
    if not isinstance(config, dict):
        raise UserError(f"{flag} {config_path}: expected a JSON object of settings")
    return config


def spec_from_dir(model_dir: str | Path, flag: str = "--model") -> ModelSpec:
    return spec_from_config(read_config(model_dir, flag), f"{flag} {Path(model_dir) / 'config.json'}")


def _walk(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers."""
    return _walk(model, spec_from_config(model.config).family.layers)


def down_proj_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every decoder layer's down_proj, in layer order: where to swap it."""
    spec = spec_from_config(model.config)
    *parent_path, attribute = spec.family.down_proj.split(".")
    layers = decoder_layers(model)
    return [(_walk(layer, ".".join(parent_path)) if parent_path else layer, attribute) for layer in layers]


def down_projections(model: nn.Module) -> list[nn.Linear]:
    """The down_proj Linear of every decoder layer, in layer order."""
    return [getattr(parent, attribute) for parent, attribute in down_proj_slots(model)]
