"""`loki-dist demo`, the README's main command, end to end at a reduced size."""

import json

from conftest import run_cli


def test_demo_runs_every_stage_and_keeps_frozen_weights(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(["demo", "--output-dir", str(out), "--steps", "4", "--nproc", "2"], timeout=600)
    assert "weights outside the selected rows that changed: 0 (LoKI promises 0)" in proc.stdout
    positions = json.loads((out / "positions.json").read_text())
    assert [len(rows) for rows in positions] == [16, 16, 16, 16]  # 25% of hidden 64, every layer
    assert (out / "merged" / "model.safetensors").is_file()
    assert (out / "run" / "final" / "implant.safetensors").is_file()
    again = run_cli(["demo", "--output-dir", str(out)], check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
