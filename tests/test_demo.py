"""`loki-dist demo`, the README's main command, end to end at a reduced size."""

import importlib.util
import json

from conftest import run_cli


def test_demo_runs_every_method_and_writes_table_and_plot(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--people", "6", "--hidden-size", "32", "--teach-steps", "10"]
    proc = run_cli([*argv, "--task-steps", "5", "--nproc", "1"], timeout=600)
    assert "LoKI: weights outside the selected rows that changed: 0 (LoKI promises 0)" in proc.stdout
    assert "random rows: weights outside the selected rows that changed: 0" in proc.stdout
    assert "LoKI via loki-dist train: weights outside the selected rows that changed: 0" in proc.stdout
    assert (out / "merged" / "model.safetensors").is_file()  # the real train + apply stages ran
    for label in ("positions.json", "positions_random.json"):
        positions = json.loads((out / label).read_text())
        assert [len(rows) for rows in positions] == [8, 8, 8, 8]  # 25% of hidden 32, every layer
    results = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods[:4] == ["base (taught)", "LoKI", "random rows", "full fine-tuning"]
    assert "LoKI via loki-dist train" in methods
    if importlib.util.find_spec("peft"):
        assert any(m.startswith("LoRA r=") for m in methods)
    else:
        assert "LoRA skipped: the peft library is not installed" in proc.stdout
    for row in results["rows"]:
        assert row["method"] in proc.stdout
        assert 0 <= row["task_accuracy"] <= 1 and 0 <= row["general_accuracy"] <= 1
        assert row["general_kept"] == row["general_accuracy"] / results["rows"][0]["general_accuracy"]
        assert row["steps"] <= 5
    loki = results["rows"][1]
    assert loki["trainable_params"] == 4 * 8 * (32 * 11 // 4)  # layers * rows * intermediate
    assert (out / "trade_off.png").stat().st_size > 1000
    assert (out / "base" / "model.safetensors").is_file()
    again = run_cli(["demo", "--output-dir", str(out)], check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
