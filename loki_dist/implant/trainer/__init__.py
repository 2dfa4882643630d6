"""The row trainer `train` runs: the run's plan (plan.py), the recipe (recipe.py) and one optimizer step
through schedule.py -> model.py -> rowstate.py; the row layouts (rowsplit.py, lowrank.py, partition.py),
how a run stops, resumes and locks its output directory, and the forgetting monitor."""
