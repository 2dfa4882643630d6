"""Method step 2, `loki-dist select`: the rows to train, chosen from an attribution file (strategies.py),
how stable that choice is (stability.py) and its plot (plot.py); select.py is the command."""
