"""`loki-dist estimate-time`: what it says of a 70B run, and its refusals of numbers that mean nothing.

How its volumes relate to what the code moves is tests/test_comm.py's (the gather count) and
bench/bench_time.py's (the predicted seconds against measured runs)."""

from __future__ import annotations

import pytest
from conftest import assert_user_error


def test_estimate_time_finds_a_70b_attribution_gathering_less_than_the_model_per_prompt(capsys):
    """The 70B preset on 80 GB GPUs at attribute's defaults: at most one full-model gather per prompt."""
    from loki_dist.cli import main

    main(["estimate-time", "--preset", "llama-3-70b", "--nodes", "8"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "full-model gathers per prompt" in x)
    assert float(line.split(": ")[-1].split()[0]) <= 1.0, line
    stages = [x.split()[0] for x in out.splitlines()[-5:]]
    assert stages == ["load", "attribution", "training", "checkpoint", "export"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--nodes", "0"], "--nodes 0: must be at least 1"),
        (["--tflops", "inf"], "--tflops inf: expected a positive number"),
        (["--fs-gbps", "0"], "--fs-gbps 0.0: expected a positive number"),
        (["--chunk-memory-gb", "-2"], "--chunk-memory-gb -2.0: expected a positive number"),
        (["--epochs", "inf"], "--epochs inf: expected a positive number"),
        (["--latency-us", "-1"], "--latency-us -1.0: must be 0 or more"),
        (["--memory-gbps", "nan"], "--memory-gbps nan: expected a positive number"),
        (["--attention-tflops", "0"], "--attention-tflops 0.0: expected a positive number"),
        (["--quota", "0"], "--quota 0: must be in (0, 100]"),
        (["--gpu-memory-gb", "1"], "a GPU would hold its share of the model"),
    ],
)
def test_numbers_that_mean_nothing_are_one_line(flags, needle, capsys):
    assert_user_error(["estimate-time", "--preset", "llama-3-70b", *flags], capsys, needle)
