"""Method step 1, `loki-dist attribute`: KVA scores of every down_proj row on general-knowledge prompts
(MMLU layout), accumulated data-parallel into the attribution file."""
