"""The 1/world law of training, by counting: no rank gathers, reads or writes more rows than its share.

Every run here is a real 2-rank DeepSpeed job with metering on (LOKI_DIST_METER): each rank reports,
per phase, the bytes every torch.distributed collective (DeepSpeed's included) left on it, the bytes it
read from checkpoint files and the largest single read. The bounds are computed here from the positions
alone: a layer's selected sequence has k*F elements, and a rank's share of a layer is at most
ceil(k*F / W) (split layout under ZeRO-3) or its fragment of the weight plus one row (ZeRO-1/2).
Nothing is timed; bench/bench_scale.py measures the memory these counts stand for.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from test_training import make_data

from loki_dist.demo.tiny import save_tiny

LAYERS, HIDDEN, INTERMEDIATE = 3, 64, 384
# Every other row (a different parity per layer), and a smaller layer 1: q = 50% and 25%.
POSITIONS = [list(range(0, HIDDEN, 2)), list(range(1, HIDDEN, 4)), list(range(1, HIDDEN, 2))]
ROW_COUNTS = [len(rows) for rows in POSITIONS]
TOTAL = sum(ROW_COUNTS) * INTERMEDIATE  # selected elements over all layers
WORLD = 2
NO_TRAFFIC = 64  # bytes: room for the one-integer agreements a phase may hold, never for a row


@pytest.fixture(scope="module")
def scale(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale")
    base = save_tiny(
        root / "base", "llama", seed=3, num_layers=LAYERS, hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE, max_shard_size="200KB",
    )  # fmt: skip
    assert len(list(base.glob("*.safetensors"))) >= 3, "the export test needs a base in several shards"
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    return {"root": root, "base": base, "positions": positions, "data": make_data(root / "data.jsonl", n=16)}


def train(scale, out: Path, meter: Path, *extra: str) -> None:
    args = [
        "train", "--model", str(scale["base"]), "--positions", str(scale["positions"]),
        "--data", str(scale["data"]), "--output-dir", str(out), "--max-steps", "2", "--save-steps", "1",
        "--learning-rate", "1e-3", "--weight-decay", "0.1", "--logging-steps", "1", *extra,
    ]  # fmt: skip
    run_cli(args, nproc=WORLD, env={"LOKI_DIST_METER": str(meter)})


def phases(meter: Path) -> list[dict]:
    return [json.loads((meter / f"rank{r}.json").read_text())["phases"] for r in range(WORLD)]


def shard_elements(checkpoint: Path) -> list[int]:
    """Selected elements each rank's shard holds (one quantity), from the shard headers."""
    counts = []
    for rank in range(WORLD):
        with safe_open(str(checkpoint / f"rows-{rank:05d}-of-{WORLD:05d}.safetensors"), "pt") as handle:
            names = [n for n in handle.keys() if n.endswith(".master")]  # noqa: SIM118
            counts.append(sum(handle.get_slice(n).get_shape()[0] for n in names))
    return counts


@pytest.fixture(scope="module")
def zero3_split(scale) -> dict[str, Path]:
    out, meter = scale["root"] / "zero3", scale["root"] / "meter_zero3"
    train(scale, out, meter)
    return {"out": out, "meter": meter}


def test_zero3_checkpoint_save_moves_nothing_and_each_rank_writes_its_share(zero3_split):
    share = sum(math.ceil(k * INTERMEDIATE / WORLD) for k in ROW_COUNTS)  # <= TOTAL / WORLD + LAYERS
    counts = shard_elements(zero3_split["out"] / "checkpoint-2")
    assert sum(counts) == TOTAL, counts  # the shards tile the rows exactly: nothing twice, nothing lost
    assert all(0 < c <= share for c in counts), (counts, share)
    for report in phases(zero3_split["meter"]):
        assert report["checkpoint_save"]["calls"] == 2
        assert report["checkpoint_save"]["received"] <= NO_TRAFFIC, report["checkpoint_save"]


def test_zero3_export_reads_one_layer_at_a_time_and_agrees_without_gathering(zero3_split):
    one_layer = max(ROW_COUNTS) * INTERMEDIATE * 4
    for report in phases(zero3_split["meter"]):
        assert report["export"]["received"] <= NO_TRAFFIC, report["export"]
        assert report["export"]["largest_read"] <= one_layer, report["export"]


def test_resume_on_two_ranks_reads_only_each_ranks_slices(scale, zero3_split):
    out, meter = scale["root"] / "resumed", scale["root"] / "meter_resume"
    shutil.copytree(zero3_split["out"] / "checkpoint-1", out / "checkpoint-1")
    train(scale, out, meter)
    counts = shard_elements(zero3_split["out"] / "checkpoint-1")  # the slices a 2-rank run owns
    for rank, report in enumerate(phases(meter)):
        # master, both moments and the model copy of exactly this rank's slice, as fp32
        assert report["resume"]["read"] == 4 * 4 * counts[rank], (rank, report["resume"], counts)
        assert report["resume"]["received"] <= NO_TRAFFIC, report["resume"]
    for name in sorted(p.name for p in (zero3_split["out"] / "final").iterdir()):  # same weights, too
        assert (out / "final" / name).read_bytes() == (zero3_split["out"] / "final" / name).read_bytes(), name


def test_zero2_decay_and_checkpoints_stay_on_each_ranks_fragment(scale):
    """ZeRO-1/2 used to all-reduce every trained layer's full fp32 weight for decay and checkpoints."""
    out, meter = scale["root"] / "zero2", scale["root"] / "meter_zero2"
    train(scale, out, meter, "--ds-config", "zero2", "--row-params", "masked")
    counts = shard_elements(out / "checkpoint-2")
    assert sum(counts) == TOTAL, counts
    slack = LAYERS * INTERMEDIATE  # a fragment boundary may cut one row per layer
    assert all(c <= TOTAL / WORLD + slack for c in counts), counts
    for report in phases(meter):
        assert report["update"]["calls"] == 2
        for phase in ("update", "checkpoint_save"):
            assert report[phase]["received"] <= NO_TRAFFIC, (phase, report[phase])


def test_parallel_export_on_a_slow_rank_equals_one_process_export_byte_for_byte(scale, zero3_split, tmp_path):
    """Two ranks export, one of them slow (it sleeps 0.3 s after each piece it writes, a slow file system
    on its node: its share of 8 shards and the implant, about 19 pieces, takes about 6 s), twice the
    collective timeout (3 s here): the other waits by its progress, not by the timeout, and the export
    is finished, not discarded. Before, the closing agreement timed out and the export was lost."""
    checkpoint = zero3_split["out"] / "checkpoint-2"
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(["export", "--checkpoint", str(checkpoint), "--output", str(one)])
    slow = {"LOKI_DIST_TIMEOUT_MINUTES": "0.05", "LOKI_DIST_TEST_SLOW_PROGRESS": "1:0.3"}
    run_cli(["export", "--checkpoint", str(checkpoint), "--output", str(two)], nproc=WORLD, env=slow)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    # independently of loki_dist: every base tensor is bit-identical but the implant's rows
    implant = load_file(str(one / "implant.safetensors"))
    base, exported = {}, {}
    for shard in scale["base"].glob("*.safetensors"):
        base.update(load_file(str(shard)))
        exported.update(load_file(str(one / shard.name)))
    assert base.keys() == exported.keys()
    for name, tensor in base.items():
        expected = tensor.clone()
        if ".mlp.down_proj." in name:
            layer = int(name.split(".")[2])
            rows = implant[f"layers.{layer}.rows"]
            assert rows.tolist() == POSITIONS[layer]
            expected[rows] = implant[f"layers.{layer}.weight"]
            assert not torch.equal(expected[rows], tensor[rows]), f"{name}: the rows did not train"
        assert torch.equal(expected, exported[name]), name


def test_export_jobs_spread_over_the_nodes_largest_first():
    """A 70B base's 31 shards (the last one smaller) on 64 ranks of 8 nodes: 3 or 4 jobs per node, each
    on a rank of its own, instead of all on ranks 0-30 (the first 4 nodes) while the rest wait."""
    from loki_dist.implant.artifacts.export import _assign

    sizes = [4_900_000_000] * 30 + [1_100_000_000]
    owner = _assign(sizes, 64, per_node=8)
    per_node = [sum(rank // 8 == node for rank in owner) for node in range(8)]
    assert sorted(per_node) == [3] * 1 + [4] * 7 and len(set(owner)) == 31
    assert _assign([5, 4, 3, 2], 4, per_node=2) == [0, 2, 1, 3]  # node 0, node 1, then the second ranks
    assert _assign([5, 4, 3, 2], 4) == [0, 1, 2, 3]  # one node: in rank order, as before


def last_tensor_bytes(shard: Path) -> int:
    length = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8 : 8 + length])
    begin, end = max(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    return end - begin


def test_damaged_base_shard_is_found_by_every_ranks_checks(scale, zero3_split, tmp_path):
    """A truncated base shard: found by every rank's checks before anything is written; every rank ends
    with the message, nobody waits, no output."""
    broken = tmp_path / "broken_base"
    shutil.copytree(scale["base"], broken)
    shard = next(s for s in sorted(broken.glob("model-*.safetensors")) if last_tensor_bytes(s) > 8192)
    shard.write_bytes(shard.read_bytes()[:-1000])  # past the first 4 KiB the fingerprint reads
    out = tmp_path / "out"
    args = ["export", "--checkpoint", str(zero3_split["out"] / "checkpoint-2"), "--base", str(broken)]
    proc = run_cli([*args, "--output", str(out)], nproc=WORLD, check=False, timeout=120)
    assert proc.returncode != 0
    assert f"--base {shard}: truncated or damaged safetensors file" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_a_failure_mid_export_on_one_rank_ends_every_rank_with_its_message(scale, zero3_split, tmp_path):
    """Rank 1 fails after writing its first shard (a fault injected there: one machine cannot aim a real
    disk failure at one rank): rank 0 is not left waiting, the message names rank 1, nothing is
    published and the staging directory is left for the next export to remove."""
    out = tmp_path / "out"
    args = ["export", "--checkpoint", str(zero3_split["out"] / "checkpoint-2"), "--output", str(out)]
    proc = run_cli(args, nproc=WORLD, check=False, timeout=120, env={"LOKI_DIST_TEST_FAIL_IN_EXPORT": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank 1: crashed (OSError: injected write failure on rank 1" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    run_cli(args, nproc=WORLD)  # the next export succeeds over what the failed one left
    assert (out / "implant.safetensors").is_file() and not list(tmp_path.glob(".out*"))
