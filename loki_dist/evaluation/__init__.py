"""Reading a model after implanting: `evaluate` (accuracy or perplexity, data-parallel), `forgetting`
(the paper's score against the base) and `chat`."""
