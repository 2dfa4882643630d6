"""loki_dist: distributed LoKI (Low-damage Knowledge Implanting) for Hugging Face causal LMs.

The Python API (loki_dist/implant/api.py), for any training loop:
    model = loki_dist.implant_rows(model, "positions.json")  # only the selected down_proj rows train
    # (implant_rows(model, "positions.json", rank=32): LoKI*, their update W_S0 + A B trains instead)
    loki_dist.save_implant(model, "implant.safetensors", base=base_dir)
    merged = loki_dist.merge_rows(model)                     # plain Hugging Face modules again
"""

from loki_dist.core import quiet as _quiet

__version__ = "0.1.0"
__all__ = ["implant_rows", "implanted_layers", "merge_rows", "save_implant"]

_quiet.deprecated_collectives()  # DeepSpeed's calls of deprecated torch collectives (core/quiet.py) only


def __dir__() -> list[str]:
    """The API too (it is imported on first use, so it is not among the module's globals yet)."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str):
    """The API on first use: `import loki_dist` stays light, and loki_dist's modules can import
    __version__ from here without a cycle."""
    if name in __all__:
        from loki_dist.implant import api

        return getattr(api, name)
    raise AttributeError(f"module 'loki_dist' has no attribute {name!r}")
