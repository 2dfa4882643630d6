"""Loading a causal LM whole, or straight into ZeRO-3 shards; and the inference side of that choice.

Under ZeRO-3 the model must never exist whole on one rank (a 70B model is 140 GB in bf16): it is built
empty under `deepspeed.zero.Init` and each rank reads its own partitions from the weight files
(zero3_load.py); the returned model is frozen and still to be wrapped by deepspeed.initialize.

The inference commands (attribute, evaluate) share their `--dtype` and `--ds-config` flags and the way
they load: whole on every rank, or ZeRO-3-sharded over the ranks (`load_for_inference`). A sharded model
gathers each layer's parameters collectively while it runs, so then every rank must call it the same
number of times, in the same order (the shapes of the inputs may differ between ranks).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist.core import dsconfig, flags, metering
from loki_dist.core.errors import UserError
from loki_dist.core.families import ModelSpec

log = logging.getLogger("loki_dist.modeling")


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype, ds_config: dict | None) -> torch.nn.Module:
    """The model with every parameter frozen: whole, or sharded if ds_config is a ZeRO-3 config (each
    rank then reads only its own share of the weight files: zero3_load.py)."""
    with metering.phase("load"):
        model = None
        if dsconfig.zero_stage(ds_config) == 3:
            from loki_dist.core.zero3_load import load_zero3

            model = load_zero3(model_dir, dtype, ds_config)
        if model is None:
            model = _load_with_transformers(model_dir, dtype, ds_config)
    model.requires_grad_(False)
    return model


def _load_with_transformers(model_dir: str | Path, dtype: torch.dtype, ds_config: dict | None):
    """from_pretrained, into ZeRO-3 shards while an HfDeepSpeedConfig of a stage-3 config is alive (rank
    0 then reads every file and broadcasts each parameter: only where zero3_load cannot map the files)."""
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if dsconfig.zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - from_pretrained reads it while it lives
    # transformers' own classes only (never a model's auto_map code); a .bin file as tensors only
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=False, weights_only=True
    )


def sized_for(ds_config: dict | None, model_dir: str | Path, world) -> dict | None:
    """A ZeRO-3 config with its model-sized settings filled for this model (dsconfig.ZERO3_SIZED) and,
    on several nodes, ZeRO++'s in-node copy (dsconfig.in_node_partition); other configs as they are."""
    if dsconfig.zero_stage(ds_config) != 3:
        return ds_config
    from loki_dist.core.distributed import ranks_per_node
    from loki_dist.core.families import read_config
    from loki_dist.planning.memory import architecture

    arch = architecture(read_config(model_dir))
    sized = dsconfig.size_zero3(ds_config, arch.layer_params, arch.hidden_size)
    return dsconfig.in_node_partition(sized, ranks_per_node(world), world.size)


def check_weights(
    model_dir: str | Path,
    flag: str = "--model",
    safetensors_only: bool = False,
    spec: ModelSpec | None = None,
) -> list[Path]:
    """The weight files that from_pretrained will read, each checked whole from its header alone.

    The files are the ones transformers picks (model.safetensors, or the shards its index names); a
    missing, truncated or damaged one is found here in a few MB of reads, not as a traceback after the
    process group has formed. With the `spec` of config.json, every layer's down_proj must be in the
    headers with that shape (a config that does not describe its weights fails in transformers after
    the model has loaded). A model kept as PyTorch .bin files (pickles) is read here as transformers
    reads it, with torch's weights_only unpickler, but only its structure and shapes; refused with
    `safetensors_only` (training and export read the safetensors shards themselves).
    """
    from loki_dist.core.checks import safetensors_header

    model_dir = Path(model_dir)
    named = _named_weights(model_dir, flag)
    safetensors = ("model.safetensors.index.json", "model.safetensors")
    if named is not None and safetensors_only and _listed(model_dir, "model.safetensors", flag) != named:
        raise UserError(
            f"{flag} {model_dir}: its config.json names other weights to load (`transformers_weights`) than "
            "the model.safetensors (or model.safetensors.index.json and its shards) this command reads"
        )
    if named is not None or any((model_dir / name).is_file() for name in safetensors):
        shards = named or _listed(model_dir, "model.safetensors", flag)
        shapes = {}
        for shard in shards:
            header = safetensors_header(shard, flag)[1]
            shapes.update({k: entry.get("shape") for k, entry in header.items() if k != "__metadata__"})
    elif (model_dir / "pytorch_model.bin").is_file() or (
        model_dir / "pytorch_model.bin.index.json"
    ).is_file():
        if safetensors_only:
            raise UserError(
                f"{flag} {model_dir}: holds PyTorch .bin weights; this command reads safetensors only "
                "(convert them: from_pretrained(DIR).save_pretrained(NEW_DIR) writes safetensors)"
            )
        shards = _listed(model_dir, "pytorch_model.bin", flag)
        shapes = {name: shape for shard in shards for name, shape in _pickled_shapes(shard, flag).items()}
    else:
        raise UserError(
            f"{flag} {model_dir}: no model weights (model.safetensors, or model.safetensors.index.json "
            "and its shards)"
        )
    if spec is not None:
        expected = [spec.hidden_size, spec.intermediate_size]
        for layer in range(spec.num_layers):
            found = shapes.get(spec.down_proj_name(layer))
            if found != expected:
                raise UserError(
                    f"{flag} {model_dir}: config.json describes {spec.num_layers} layers with a down_proj of "
                    f"shape {expected}, but the weights of layer {layer} hold {found or 'none'}"
                )
    return shards


def check_known_to_transformers(config: dict, source: str) -> None:
    """Refuse a model type that transformers has no class for: loading it would take code shipped with
    the model (its config's auto_map), which loki_dist never runs. transformers itself would ask on
    stdin whether to run it (and a piped answer would), or fail after the process group has formed."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        code = "; its auto_map names code shipped with the model, which loki_dist never runs"
        raise UserError(
            f"{source}: model type {model_type!r} is not one that transformers {transformers.__version__} "
            f"has a class for{code if 'auto_map' in config else ''}"
        )


def _listed(model_dir: Path, single: str, flag: str) -> list[Path]:
    """The weight files of `single` (model.safetensors or pytorch_model.bin): the shards its index
    (`single`.index.json) names, or the one file."""
    index = model_dir / f"{single}.index.json"
    return _shards_of(index, flag) if index.is_file() else [model_dir / single]


def _shards_of(index: Path, flag: str) -> list[Path]:
    """The shard files a weights index names, all present; its `metadata` too (transformers needs it)."""
    from loki_dist.core.checks import read_json

    listed = read_json(index, flag)
    weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{flag} {index}: no `weight_map` of tensor names to shard files")
    if not isinstance(listed.get("metadata"), dict):
        raise UserError(f"{flag} {index}: no `metadata` object (transformers reads the total size there)")
    shards = [index.parent / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise UserError(
            f"{flag} {index.parent}: shard(s) {', '.join(missing)} named by {index.name} are missing"
        )
    return shards


def _named_weights(model_dir: Path, flag: str) -> list[Path] | None:
    """The weight files config.json names in `transformers_weights`, which transformers loads instead of
    model.safetensors (a .safetensors file or index inside the directory); None where it names none."""
    from loki_dist.core.checks import read_json

    config = read_json(model_dir / "config.json", flag) if (model_dir / "config.json").is_file() else None
    name = config.get("transformers_weights") if isinstance(config, dict) else None
    if name is None:
        return None
    inside = isinstance(name, str) and not Path(name).is_absolute() and ".." not in Path(name).parts
    if not inside or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise UserError(
            f"{flag} {model_dir / 'config.json'}: `transformers_weights` must name a .safetensors file or "
            f"index inside the model directory, got {str(name)[:200]!r}"
        )
    if name.endswith(".index.json"):
        return _shards_of(model_dir / name, flag)
    if not (model_dir / name).is_file():
        raise UserError(f"{flag} {model_dir}: {name}, which config.json names as its weights, is missing")
    return [model_dir / name]


def _pickled_shapes(path: Path, flag: str) -> dict[str, list[int]]:
    """Tensor shapes of a .bin weights file, read without its data and without running anything."""
    from loki_dist.core.checks import UnsafeTorchLoad, read_torch_pickle

    try:
        state = read_torch_pickle(path, "meta")
    except UnsafeTorchLoad as err:
        raise UserError(
            f"{flag} {path}: a .bin file is a pickle and {err}; convert it to safetensors"
        ) from None
    except (ValueError, OSError) as err:
        raise UserError(f"{flag} {path}: cannot be read as weights: {err}") from None
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state.items()
    ):
        raise UserError(f"{flag} {path}: does not hold a state dict (tensors by name)")
    return {name: list(tensor.shape) for name, tensor in state.items()}


def load_tokenizer(model_dir: str | Path, flag: str = "--model", chat_template: str | None = None):
    """The model's tokenizer; one that transformers cannot build is a UserError, not a page of traceback.
    `chat_template`: a --chat-template value (a file or a built-in name) that replaces the tokenizer's."""
    from transformers import AutoTokenizer

    from loki_dist.implant.data import chat_templates

    found = [next(Path(model_dir).glob(p), None) for p in ("tokenizer*", "vocab*", "*.model")]
    if Path(model_dir).is_dir() and not any(found):
        raise UserError(f"{flag} {model_dir}: no tokenizer there (tokenizer.json, tokenizer_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError... for a missing tokenizer
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{flag} {model_dir}: cannot load its tokenizer ({first})") from None
    return chat_templates.apply(tokenizer, chat_template)


def zero3_share(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model): proof of sharding."""
    held = sum(
        p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in model.parameters()
    )
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return held, total


# -------------------------------------------------------------------------------------------- inference


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dtype`, `--ds-config` and `--chat-template`, as every inference command spells them."""
    from loki_dist.implant.data.chat_templates import add_chat_template_argument

    add_chat_template_argument(parser)
    flags.add_dtype(parser)
    flags.add_ds_config(
        parser,
        None,
        "to shard the model with ZeRO-3: a path or the shipped name zero3_infer (without it, each rank "
        "holds the whole model)",
    )


def torch_dtype(name: str) -> torch.dtype:
    """A --dtype value (either spelling) as a torch dtype; `auto` is bfloat16 on GPU and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, flags.torch_name(name))


def read_inference_config(name: str, dtype: torch.dtype) -> dict:
    """The --ds-config of an inference command whose model is in `dtype`: ZeRO stage 3, no optimizer, no
    precision but the model's, and values DeepSpeed can read (its "auto" filled as any batch size and
    model would fill them); or a UserError."""
    config = dsconfig.load(name)
    stage = dsconfig.zero_stage(config)
    if config is None or stage != 3:
        raise UserError(f"--ds-config {name}: inference shards with ZeRO stage 3, this has stage {stage}")
    if "optimizer" in config:
        raise UserError(f"--ds-config {name}: an inference config must not define an optimizer")
    for key, half in (("bf16.enabled", torch.bfloat16), ("fp16.enabled", torch.float16)):
        enabled = dsconfig.settle(config, key, key, None, None)  # the config's own value, unless "auto"
        if enabled is not None and enabled != (dtype == half):  # DeepSpeed would cast the model to it
            raise UserError(
                f"--ds-config {name}: {key} {str(enabled).lower()} contradicts --dtype "
                f'{str(dtype).removeprefix("torch.")}: leave it "auto" (the model\'s dtype) or change --dtype'
            )
    dsconfig.check_with_deepspeed(dsconfig.size_zero3(fill_inference_config(config, 1, 1, dtype), 1, 1), name)
    return config


def fill_inference_config(config: dict, batch_size: int, world_size: int, dtype: torch.dtype) -> dict:
    """DeepSpeed wants concrete batch sizes and precision even without training. The batch sizes, which
    nothing trains with, are loki_dist's (--batch-size): a config's own would only have to agree with a
    world size it cannot know, and failed DeepSpeed's check once the model had loaded. The precision is
    the model's dtype (read_inference_config refused a config that says otherwise)."""
    return dsconfig.fill(
        config,
        {
            "train_micro_batch_size_per_gpu": batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": batch_size * world_size,
            "bf16.enabled": dtype == torch.bfloat16,
            "fp16.enabled": dtype == torch.float16,
        },
    )


@dataclass(frozen=True)
class InferenceModel:
    """A frozen model in eval mode, on `device`, whole or ZeRO-3-sharded.

    Call `model` itself, also when sharded: ZeRO-3's parameter gathering lives in hooks on the modules
    (forward and backward), while the engine's own forward arms backward hooks that refuse any backward
    without an optimizer (engine.backward would step one). `engine` is kept only so that those hooks
    live as long as the model is used: destroying the engine removes them.
    """

    model: torch.nn.Module
    device: torch.device
    engine: object | None = None

    @property
    def sharded(self) -> bool:
        return self.engine is not None


def load_for_inference(
    model_dir: str | Path, world, dtype: torch.dtype, ds_config: dict | None, batch_size: int
) -> InferenceModel:
    """Join the process group and load the model: whole on every rank, or ZeRO-3-sharded if ds_config
    (a config from read_inference_config) is given; batch_size fills the config's "auto" batch sizes."""
    from loki_dist.core.distributed import device_for, init, prepare_deepspeed

    device = device_for(world)
    if ds_config is None:
        init(world)
        return InferenceModel(load_causal_lm(model_dir, dtype, None).to(device).eval(), device)
    import deepspeed

    prepare_deepspeed(world)
    config = sized_for(fill_inference_config(ds_config, batch_size, world.size, dtype), model_dir, world)
    model = load_causal_lm(model_dir, dtype, config).eval()
    with metering.phase("ds_initialize"):
        engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    held, total = zero3_share(model)
    log.info(f"ZeRO-3: rank {world.rank} holds {held:,} of {total:,} parameters")
    return InferenceModel(model, device, engine)
