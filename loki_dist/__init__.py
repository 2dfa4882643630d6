"""loki_dist: distributed LoKI (Low-damage Knowledge Implanting) for Hugging Face causal LMs."""

__version__ = "0.1.0"
