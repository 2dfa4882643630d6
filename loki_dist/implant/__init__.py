"""Method step 3, implanting: train only the selected down_proj rows. The `train` command (train.py)
runs the recipe (recipe.py); one optimizer step goes recipe -> schedule -> trainer -> rowstate. Also the
instruction data it reads, its checkpoints, `export` and `apply`, the forgetting monitor, and the Python
API (api.py) for other training loops."""
