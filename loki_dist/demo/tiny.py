"""Tiny models and a tokenizer built in code, for the tests and the offline demo.

No hub is reachable where loki_dist is tested, so every model here comes from a transformers config
class with random weights, and the tokenizer is a small byte-level BPE trained on a few lines of text:
it encodes any string (no unknown tokens) and carries a chat template, like a real instruct model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "There is a single choice question about High School Biology.",
    "Answer the question by replying A, B, C or D.",
    "Question: Which of the following is the capital of the country? Choices: A. B. C. D. Answer:",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
    "Write a function that returns the sum of two numbers. def add(a, b): return a + b",
    "instruction input output user assistant system the of and to in is that for it as with was on",
]


def build_tokenizer(vocab_size: int = 512, corpus: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with a chat template.

    `corpus` adds text to learn merges from: the demo's invented names then take a token or two instead
    of one per byte, which makes its prompts (and so its training) almost half as long.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([*_CORPUS, *corpus] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    model_type: str = "llama",
    *,
    vocab_size: int = 512,
    num_layers: int = 2,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 1024,
):
    """A transformers config of the given family, small enough to train in seconds on a CPU."""
    head_dim = hidden_size // num_heads
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=5,
    )
    if model_type == "gpt_neox":
        return AutoConfig.for_model(model_type, rotary_pct=1.0, use_parallel_residual=True, **common)
    common.update(num_key_value_heads=num_kv_heads, head_dim=head_dim)
    if model_type == "phi3":
        common.pop("head_dim")
        common.update(pad_token_id=0)
    if model_type in ("gemma2", "gemma3_text"):
        common.update(query_pre_attn_scalar=head_dim, sliding_window=64)
    return AutoConfig.for_model(model_type, **common)


def build_model(model_type: str = "llama", seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A randomly initialised causal LM of the family, identical for the same seed."""
    config = tiny_config(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def sharpen_(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the decoder layers' weights up 3x and the output head 40x, in place: a random tiny model
    predicts nearly uniformly (perplexity about the vocabulary size, whatever its weights), a sharpened
    one has opinions, so that different prompts get different answers and a change of weights shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layers" in name and "norm" not in name:
                param.mul_(3)
        model.lm_head.weight.mul_(40)
    return model


def save_tiny(
    out_dir: str | Path,
    model_type: str = "llama",
    seed: int = 0,
    dtype=torch.float32,
    max_shard_size: str | None = None,
    sharp: bool = False,
    **config_kwargs,
) -> Path:
    """Write a tiny model and the tokenizer as a standard Hugging Face directory (in several safetensors
    shards when `max_shard_size` is small, as big models come); sharp: sharpen_ it first."""
    out_dir = Path(out_dir)
    model = build_model(model_type, seed=seed, **config_kwargs)
    model = (sharpen_(model) if sharp else model).to(dtype)
    shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, safe_serialization=True, **shards)
    build_tokenizer(vocab_size=model.config.vocab_size).save_pretrained(out_dir)
    return out_dir
