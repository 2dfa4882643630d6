"""Per-GPU memory of LoKI, full fine-tuning and LoRA, before booking a cluster: the model behind
`loki-dist estimate-memory` (whose command line and table are estimate_memory.py's).

Everything is computed from the model config alone (no weights, no GPU). Per GPU, four parts:

* **parameters**: the 16-bit (or fp32) weights a rank holds. ZeRO-3 shards them, P/N each, plus the one
  module that is gathered whole while it runs (the largest); ZeRO-2 keeps all P on every rank.
* **gradients**: ZeRO-3 keeps each rank's gradient partition in the model's dtype (DeepSpeed's default
  `grad_accum_dtype`), and during the step an fp32 copy of one optimizer sub-group (`sub_group_size`,
  10^9 elements by default) at a time; it also holds the 16-bit gradient of the largest trainable module
  before that is reduce-scattered. ZeRO-2 keeps a 16-bit and an fp32 gradient partition.
* **optimizer state**: Adam's fp32 master weights, momentum and variance (12 bytes per trainable element
  in bf16; 8 in fp32, where the weight is its own master), sharded over all ranks in both stages.
* **activations**: what the forward pass saves for backward (formula in `activation_bytes`).

These model-state rules are DeepSpeed's own estimator's (`estimate_zero3_model_states_mem_needs`,
`estimate_zero2_model_states_mem_needs`, without its CPU `additional_buffer_factor`) except for ZeRO-3's
gradients, which that estimator counts as one fp32 partition (4 bytes per element) while DeepSpeed 0.19
holds a 16-bit partition plus the fp32 sub-group copy (measured in tests/memory_probe.py); the tests pin
both the agreement and this difference. With offload the CPU side keeps DeepSpeed's accounting. Then
the methods differ only in which elements are trainable:

* LoKI (masked): the whole down_proj weight of every trained layer, since masking the gradient leaves
  the dense gradient and the dense Adam state in place, although only q% of their rows ever move.
* LoKI (compact, `train --row-params split`): gradients and Adam state only for the selected rows,
  L * floor(q*D/100) * F elements, which are also held a second time as their own 16-bit parameter.
* LoKI* (`train --lora-rank r`): the selected rows' update as A [k, r] and B [r, F] per layer, so
  L * (k*r + r*F) elements have gradients and Adam state, held as parameters of their own beside the
  frozen weight; the layer saves B's r-wide output for A's gradient as well.
* full fine-tuning: every parameter.
* LoRA r=16 on every Linear of a layer (q, k, v, o, gate, up, down): the frozen base stays in 16 bits
  and is sharded like any parameter; the adapters add r*(in+out) parameters each, with their gradients
  and Adam state.

`--offload` follows the shipped `ds_configs/zero3_offload.json`: under ZeRO-3 the parameter partitions,
gradient partitions and optimizer state live in CPU memory and the GPU keeps only the gathered working
module; under ZeRO-2 (which cannot offload parameters) the gradient partitions and optimizer state move.
What moves is reported as CPU memory per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from loki_dist.core.errors import UserError
from loki_dist.core.families import spec_from_config

GIB = 2**30
SUB_GROUP_SIZE = 10**9  # DeepSpeed's default zero_optimization.sub_group_size (elements)
LORA_RANK = 16
STAR_RANK = 32  # LoKI*'s rank in the paper's Table 2 (q = 30, r = 32 on Llama-3.1-8B)
METHODS = ("loki_masked", "loki_compact", "loki_star", "full", "lora")
PARTS = ("parameters", "gradients", "optimizer_state", "activations")

# Built-in configs, in the Hugging Face config.json form, so that they go through the same code as a file.
PRESETS: dict[str, dict] = {
    "llama-3-8b": {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "llama-3-70b": {
        "model_type": "llama",
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "vocab_size": 128256,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Architecture:
    """The shapes that decide memory: every Linear of one decoder layer, plus what lies outside the layers."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    kv_size: int  # num_key_value_heads * head_dim: the width of k and v, smaller than D with GQA
    layer_linears: tuple[Linear, ...]
    layer_norm_params: int  # norm weights (and biases) inside one decoder layer
    outer_norm_params: int  # the final norm
    tied_embeddings: bool

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        return sum(linear.numel for linear in self.layer_linears) + self.layer_norm_params

    @property
    def total_params(self) -> int:
        """Counted once when the output head shares the embedding matrix, like `model.parameters()`."""
        heads = 1 if self.tied_embeddings else 2
        return heads * self.embedding_params + self.num_layers * self.layer_params + self.outer_norm_params

    @property
    def largest_module_params(self) -> int:
        """The largest module's own parameters: what ZeRO-3 gathers whole at once (DeepSpeed's definition)."""
        return max(self.embedding_params, *(linear.numel for linear in self.layer_linears))

    @property
    def down_proj_params(self) -> int:
        return self.hidden_size * self.intermediate_size


def architecture(config: dict | object) -> Architecture:
    """Read the layer layout of a supported family from a config dict or a transformers config.

    Llama, Mistral, Qwen2/3 and Gemma 2/3 have separate q, k, v, o, gate, up and down projections;
    Phi-3 fuses qkv and gate/up; GPT-NeoX fuses qkv and has biases and LayerNorms everywhere.
    """
    spec = spec_from_config(config)  # refuses unsupported families with the list of supported ones
    if isinstance(config, dict):  # the config class fills what the file leaves out (biases, tying, head_dim)
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config)

    def get(key: str, default: object = None) -> object:
        return getattr(config, key, default)

    d, f, kind = spec.hidden_size, spec.intermediate_size, spec.model_type
    heads = int(get("num_attention_heads"))
    head_dim = int(get("head_dim", None) or d // heads)
    kv_size = int(get("num_key_value_heads", None) or heads) * head_dim
    q_size = heads * head_dim
    if kind == "gpt_neox":
        linears = (
            Linear("query_key_value", d, 3 * d, True),
            Linear("dense", d, d, True),
            Linear("dense_h_to_4h", d, f, True),
            Linear("dense_4h_to_h", f, d, True),
        )
        layer_norms, outer_norms = 4 * d, 2 * d  # LayerNorm has weight and bias
    else:
        attention_bias = bool(get("attention_bias", False)) or kind == "qwen2"  # Qwen2: q, k, v biased
        mlp_bias = bool(get("mlp_bias", False))
        if kind == "phi3":
            attention = (Linear("qkv_proj", d, q_size + 2 * kv_size, False),)
            mlp_in = (Linear("gate_up_proj", d, 2 * f, False),)
        else:
            attention = tuple(
                Linear(n, d, w, attention_bias) for n, w in (("q", q_size), ("k", kv_size), ("v", kv_size))
            )
            mlp_in = (Linear("gate_proj", d, f, mlp_bias), Linear("up_proj", d, f, mlp_bias))
        o_bias = attention_bias and kind != "qwen2"
        linears = (
            *attention,
            Linear("o_proj", q_size, d, o_bias),
            *mlp_in,
            Linear("down_proj", f, d, mlp_bias),
        )
        norms_per_layer = 4 if kind in ("gemma2", "gemma3_text") else 2
        qk_norms = 2 * head_dim if kind in ("qwen3", "gemma3_text") else 0
        layer_norms, outer_norms = norms_per_layer * d + qk_norms, d
    tied = bool(get("tie_word_embeddings"))
    return Architecture(
        model_type=kind,
        num_layers=spec.num_layers,
        hidden_size=d,
        intermediate_size=f,
        vocab_size=int(get("vocab_size")),
        num_heads=heads,
        kv_size=kv_size,
        layer_linears=linears,
        layer_norm_params=layer_norms,
        outer_norm_params=outer_norms,
        tied_embeddings=tied,
    )


def loki_rows_per_layer(hidden_size: int, quota: Fraction) -> int:
    """k = floor(q*D/100), docs/method.md's layer-balanced count."""
    return math.floor(quota * hidden_size / 100)


def loki_star_params(arch: Architecture, rows: int, rank: int = STAR_RANK) -> int:
    """A [k, r] and B [r, F] of every layer: L * (k*r + r*F)."""
    return arch.num_layers * rank * (rows + arch.intermediate_size)


def lora_params(arch: Architecture, rank: int = LORA_RANK) -> int:
    """A and B of every Linear of every layer: rank * (in + out) each."""
    per_layer = sum(rank * (linear.in_features + linear.out_features) for linear in arch.layer_linears)
    return arch.num_layers * per_layer


@dataclass(frozen=True)
class Setup:
    world_size: int = 8
    zero: int = 3
    offload: bool = False
    micro_batch: int = 1
    seq_len: int = 4096
    gradient_checkpointing: bool = False
    precision: str = "bf16"

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU for one method; `cpu_offload` is what --offload moved to CPU memory, per rank."""

    trainable_params: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    cpu_offload: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations


@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes on the GPU; with offload the partitions go to `cpu` instead."""

    parameters: int
    gradients: int
    optimizer_state: int
    cpu: int


def model_states(
    held_params: int, trainable: int, largest_module: int, largest_trainable_module: int, setup: Setup
) -> ModelStates:
    """Parameters, gradients and Adam state on one rank, as DeepSpeed lays them out (module docstring).

    held_params: every parameter the engine holds (frozen ones included); trainable: how many elements
    have gradients and optimizer state; the largest modules set ZeRO-3's gathered working set.
    """
    n, w = setup.world_size, setup.weight_bytes
    optimizer_bytes = 12 if setup.precision == "bf16" else 8
    optimizer = optimizer_bytes * trainable // n
    if setup.zero == 3:
        param_partition = w * held_params // n
        working_params, working_grads = w * largest_module, w * largest_trainable_module
        if setup.offload:
            cpu = param_partition + 4 * trainable // n + optimizer
            return ModelStates(working_params, working_grads, 0, cpu)
        grads = w * trainable // n + 4 * min(trainable // n, SUB_GROUP_SIZE)
        return ModelStates(working_params + param_partition, working_grads + grads, optimizer, 0)
    # ZeRO-2: whole 16-bit model on every rank; gradients reduce-scattered into fp32 partitions
    if setup.offload:
        return ModelStates(w * held_params, 0, 0, 4 * trainable // n + optimizer)
    low_precision_grads = w if setup.precision == "bf16" else 0
    return ModelStates(w * held_params, (low_precision_grads + 4) * trainable // n, optimizer, 0)


def activation_bytes(arch: Architecture, setup: Setup, method: str, star_rank: int = STAR_RANK) -> int:
    """Bytes autograd saves for backward in one micro-batch on one GPU (held until backward frees them).

    Per decoder layer and token, in the spirit of Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models") but for pre-RMSNorm SwiGLU layers with a fused attention
    kernel (no s x s matrix), w = bytes per element of `precision`, as PyTorch and transformers save them:

    * each of the two RMSNorms: its input upcast to fp32 (4D) and 1/rms (4); plus, in full fine-tuning,
      the normalised input its own weight's gradient needs (wD); plus its output (wD) when a trainable
      weight reads it (q/k/v/gate/up in full fine-tuning, LoRA's A). A frozen weight saves no input,
      which is why LoKI, training only down_proj, keeps less than full fine-tuning.
    * attention: rotated q (D), k and v (2kv) and the output (D) in w bytes, the fp32 log-sum-exp (4H);
    * MLP: gate, up, SiLU(gate) and their product (4F) in w bytes, needed by every method because the
      SiLU-product gradient flows to the (trained or not) layers below and down_proj's input is needed
      whenever any down_proj trains;
    * LoRA only: each adapter's r-wide intermediate (r per adapted Linear); LoKI* likewise B's output,
      r per layer (`star_rank`), beside down_proj's input that every LoKI layout saves, and, once per
      layer whatever the tokens, the [D, r] matrix its forward builds from A (lowrank.py).

    Outside the layers: the final norm (same rule; only full fine-tuning trains lm_head), the fp32
    log-softmax the loss saves (4V) and the w-byte logits the forward returns (wV); they dominate short
    models with large vocabularies. Left out as negligible at scale: token ids and rotary tables.
    Below the lowest trainable weight nothing needs a gradient, so autograd records nothing there. With
    frozen embeddings that saves, in LoKI, everything of the first layer but down_proj's input (wF; with
    layer-balanced selection every layer has rows at q >= 100/D, so the first trained layer is layer 0),
    and in LoRA the first norm's fp32 input and 1/rms. With gradient checkpointing each layer keeps only
    its input (wD per token), plus one layer's full set while it is recomputed. Other families (fused
    projections, LayerNorm, GELU) are approximated by the same formula.
    """
    d, w = arch.hidden_size, setup.weight_bytes

    def norm(own_weight_trains: bool, output_read_by_trainable: bool) -> int:
        return 4 * d + 4 + w * d * (int(own_weight_trains) + int(output_read_by_trainable))

    full, lora = method == "full", method == "lora"
    attention = w * (2 * d + 2 * arch.kv_size) + 4 * arch.num_heads
    adapters = {"lora": w * LORA_RANK * len(arch.layer_linears), "loki_star": w * star_rank}.get(method, 0)
    per_token_layer = 2 * norm(full, full or lora) + attention + w * 4 * arch.intermediate_size + adapters
    if setup.gradient_checkpointing:
        per_token_layers = arch.num_layers * w * d + per_token_layer
    elif method.startswith("loki_"):
        per_token_layers = (arch.num_layers - 1) * per_token_layer + w * arch.intermediate_size + adapters
    else:
        per_token_layers = arch.num_layers * per_token_layer - (4 * d + 4 if lora else 0)
    head = norm(full, full) + (4 + w) * arch.vocab_size
    per_layer = w * d * star_rank if method == "loki_star" else 0
    return setup.micro_batch * setup.seq_len * (per_token_layers + head) + arch.num_layers * per_layer


def estimate(
    arch: Architecture, quota: Fraction, setup: Setup, star_rank: int = STAR_RANK
) -> dict[str, Estimate]:
    """The methods' per-GPU bytes (LoKI* of rank `star_rank`); they differ only in what trains (module
    docstring)."""
    k = loki_rows_per_layer(arch.hidden_size, quota)
    if k == 0:
        raise UserError(
            f"--quota {float(quota):g}: selects no row of a layer with hidden size {arch.hidden_size} "
            f"(k = floor(q*D/100) = 0); use a quota of at least {Fraction(100, arch.hidden_size)}"
        )
    total, largest, down = arch.total_params, arch.largest_module_params, arch.down_proj_params
    adapters = lora_params(arch)
    largest_adapter = max(LORA_RANK * max(lin.in_features, lin.out_features) for lin in arch.layer_linears)
    selected = arch.num_layers * k * arch.intermediate_size
    star = loki_star_params(arch, k, star_rank)
    # method: (params held, elements with gradients and Adam state, the largest such module, params that move)
    methods = {
        "loki_masked": (total, arch.num_layers * down, down, selected),
        # the split layout holds the selected rows twice: in the frozen weight and as their own parameter
        "loki_compact": (total + selected, selected, k * arch.intermediate_size, selected),
        # A and B beside the frozen weight; the largest module with gradients is a down_proj's A and B
        "loki_star": (total + star, star, star // arch.num_layers, star),
        "full": (total, total, largest, total),
        "lora": (total + adapters, adapters, largest_adapter, adapters),
    }
    result = {}
    for name, (held, with_state, largest_with_state, moving) in methods.items():
        states = model_states(held, with_state, largest, largest_with_state, setup)
        result[name] = Estimate(
            trainable_params=moving,
            parameters=states.parameters,
            gradients=states.gradients,
            optimizer_state=states.optimizer_state,
            activations=activation_bytes(arch, setup, name, star_rank),
            cpu_offload=states.cpu,
        )
    return result
