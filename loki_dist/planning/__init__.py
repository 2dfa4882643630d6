"""Before booking a cluster: `estimate-memory`, the per-GPU memory of LoKI, full fine-tuning and LoRA."""
