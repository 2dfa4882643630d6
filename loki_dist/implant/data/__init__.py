"""The training data `train` reads: files of alpaca or conversation rows, LLaMA-Factory's dataset_info.json
and its YAML keys, chat templates rendered within bounds, tokenised with labels on the answers only, and
the held-out task set the forgetting monitor scores."""
