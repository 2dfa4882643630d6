"""`loki-dist pipeline --config pipeline.yaml`: attribute -> select -> train from one YAML file.

stages.py turns the YAML into the three stages' command lines, checks every one before the first starts,
and keeps the record that says whether a stage's output is current; run.py is the command, which runs
each stage that is not current as its own `loki-dist` process.
"""
