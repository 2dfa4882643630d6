"""What a run leaves behind and what is made from it: training checkpoints (checkpoint.py, each rank's RNG
state in them: rngstate.py), the implant file (implant_file.py), and the commands that write Hugging Face
models, `export` (export.py) and `apply` (apply.py)."""
