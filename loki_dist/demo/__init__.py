"""`loki-dist demo` and the selection study (bench/bench_selection.py): LoKI against random rows, full
fine-tuning and LoRA at equal task skill, on SmolLM2-135M or a tiny model taught a toy world in code."""
