"""Method step 3, implanting: train only the selected down_proj rows. The `train` command (train.py)
settles a plan and runs the row trainer (trainer/: plan, recipe, one optimizer step recipe -> schedule ->
model -> rowstate, the monitor); it reads the instruction data (data/) and leaves checkpoints and an
implant, with `export` and `apply` (artifacts/). api.py is the Python API for other training loops."""
