"""The parts of bench/gpu_check.py, one module each; that script is the entry point and runs them."""
