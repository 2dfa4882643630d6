"""Each stage's wall time on a cluster, from what it computes and what it moves: the model behind
`loki-dist estimate-time` (whose command line and table are estimate_time.py's).

Nothing here is timed: every volume is one the code is known to move (the counts tests/test_comm.py,
tests/test_loading.py and tests/test_scale.py guard, per rank and per kind of collective), and every
computation a count of FLOPs (attention's apart, at its fused kernel's rate) or of the bytes that the
element-wise work between the matrix products moves (norms, rotary embeddings, residual additions,
SiLU; layer_elementwise_elements). The cluster turns them into seconds: FLOP/s per GPU, the device
memory's bandwidth, the bandwidth a GPU gets inside its node and between nodes and each gathered
module's fixed cost, and what a node reads from or writes to the file system. A stage's time is its
compute plus its communication plus its I/O, none overlapped (DeepSpeed's prefetch hides some of the
gathers: the estimate errs on the slow side).

* load: each rank reads its share of the weight files (zero3_load.py); a node reads model/N.
* attribution of P prompts of T tokens, B per batch (attribute's defaults): per batch one forward of the
  prompts, then the chunks chunks.plan_chunks makes for the device's memory, each row running from its
  own layer up, forward and input-gradient backward; under ZeRO-3 it gathers the model once for the
  prompts and, per chunk, its layers and the head twice (chunks.gathered_elements).
* training: per token 2 FLOPs a weight forward and 2 backward (the frozen weights need only their
  inputs' gradients), the rows' own weight gradients besides; per micro-step the model is gathered in
  the forward and again in the backward, inside the node where ZeRO++'s in-node copy is on (several
  nodes: dsconfig.in_node_partition), and the rows' gradients are reduce-scattered in fp32.
* checkpoint: the rows' fp32 master values and Adam moments, each rank writing its share.
* export: the base's shards copied with the rows written in, the ranks of every node sharing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from loki_dist.attribution import chunks
from loki_dist.planning.memory import Architecture, loki_rows_per_layer

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    tflops: float  # dense FLOP/s one GPU sustains in the run's precision, in 1e12
    intra_gbps: float  # GB/s a GPU receives inside its node (NVLink)
    inter_gbps: float  # GB/s a GPU receives from other nodes (its share of the node's network)
    fs_gbps: float  # GB/s one node reads from, or writes to, the file system
    memory_gb: float  # device memory per GPU
    chunk_gb: float | None = None  # attribution's chunk budget (--chunk-memory-gb); None: from memory_gb
    latency_s: float = (
        0.0  # seconds one collective call costs however small (the network's and the library's)
    )
    memory_gbps: float = 3000.0  # GB/s a GPU's element-wise kernels move through its memory
    attention_tflops: float | None = None  # TFLOP/s of its fused attention kernel; None: tflops

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def compute(self, flops: float) -> float:
        return flops / (self.tflops * 1e12)

    def gather(self, whole_bytes: float, calls: int = 1, in_node: bool = False) -> float:
        """Seconds of `calls` all-gathers of tensors of `whole_bytes` in all: what each rank receives, at
        the slowest link it crosses (the network where the group spans nodes), and each call's latency."""
        group = self.gpus_per_node if in_node or self.nodes == 1 else self.world
        bandwidth = self.intra_gbps if in_node or self.nodes == 1 else self.inter_gbps
        return calls * self.latency_s + whole_bytes * (group - 1) / group / (bandwidth * GB)

    def attention(self, flops: float) -> float:
        return flops / ((self.attention_tflops or self.tflops) * 1e12)

    def elementwise(self, moved_bytes: float) -> float:
        return moved_bytes / (self.memory_gbps * GB)

    def file_system(self, node_bytes: float) -> float:
        return node_bytes / (self.fs_gbps * GB)


@dataclass(frozen=True)
class Workload:
    prompts: int = 5000
    prompt_tokens: int = 300
    attribution_batch: int = 4
    steps: int = 7  # Riemann steps m
    samples: int = 10000
    sample_tokens: int = 2048
    epochs: float = 1.0
    global_batch: int = 64
    micro_batch: int = 1
    quota: Fraction = Fraction(10)
    element: int = 2  # bytes per weight and activation (bf16)


def attention_flops(arch: Architecture, tokens: float, keys: float) -> float:
    """FLOPs of one layer's attention, scores and values, for `tokens` queries over `keys` keys each
    (a causal pass over t tokens: (t + 1) / 2 keys on average, as its kernel skips the masked half)."""
    return tokens * 2 * 2 * arch.num_heads * (arch.hidden_size // arch.num_heads) * keys


def layer_flops(arch: Architecture, tokens: float, keys: float) -> float:
    """FLOPs of one decoder layer's forward for `tokens` queries over `keys` keys."""
    weights = sum(linear.in_features * linear.out_features for linear in arch.layer_linears)
    return tokens * 2 * weights + attention_flops(arch, tokens, keys)


def layer_elementwise_elements(arch: Architecture) -> float:
    """Elements one decoder layer's forward reads and writes per token outside its matrix products and
    its fused attention: two RMS norms (square, mean, scale, weight: ~7 D each), rotary embeddings on
    queries and keys (~10 passes over their widths: two products, the half-rotation's copy, the sum),
    two residual additions (3 D each), and SiLU(gate) * up (5 F). A backward moves about twice as much."""
    return 30 * arch.hidden_size + 10 * arch.kv_size + 5 * arch.intermediate_size


def head_elementwise_elements(arch: Architecture) -> float:
    """Per token at the output head: the logits' softmax (read, max, exp, sum, scale: ~4 passes)."""
    return 4 * arch.vocab_size


def gathered_modules(arch: Architecture, layers: int) -> int:
    """ZeRO-3 gathers each module's weights with one call: a layer's linears and norms, `layers` of
    them, and the head with the final norm."""
    return layers * (len(arch.layer_linears) + 2) + 2


def head_flops(arch: Architecture, tokens: int) -> float:
    return 2 * tokens * arch.hidden_size * arch.vocab_size


def _bytes(arch: Architecture, elements: float, work: Workload) -> float:
    return elements * work.element


def load_seconds(arch: Architecture, cluster: Cluster, work: Workload) -> float:
    return cluster.file_system(_bytes(arch, arch.total_params, work) / cluster.nodes)


def _shape(arch: Architecture, work: Workload) -> chunks.Shape:
    return chunks.Shape(
        num_layers=arch.num_layers,
        hidden=arch.hidden_size,
        intermediate=arch.intermediate_size,
        query_width=arch.hidden_size,
        vocab=arch.vocab_size,
        element=work.element,
        prefix=work.prompt_tokens - 1,
    )


def held_bytes(arch: Architecture, cluster: Cluster, work: Workload) -> float:
    """What a GPU holds before any work under ZeRO-3: its share of the model and two gathered layers."""
    return _bytes(arch, arch.total_params / cluster.world + 2 * arch.layer_params, work)


def attribution_plan(arch: Architecture, cluster: Cluster, work: Workload) -> list[tuple[int, int]]:
    """The chunks `attribute` cuts a batch into on this cluster's GPUs (its default budget, after the
    rank's share of the model and two gathered layers)."""
    from loki_dist.attribution.settings import CUDA_BUDGET_SHARE

    free = cluster.memory_gb * GB - held_bytes(arch, cluster, work)
    budget = cluster.chunk_gb * 2**30 if cluster.chunk_gb else CUDA_BUDGET_SHARE * free
    return chunks.plan_chunks(_shape(arch, work), work.attribution_batch, work.steps, int(budget))


def attribution_batch(arch: Architecture, cluster: Cluster, work: Workload) -> dict[str, float]:
    """One batch of `attribute` on one rank: FLOPs, gathered bytes, chunks, and seconds."""
    plan = attribution_plan(arch, cluster, work)
    batch, t, m, L = work.attribution_batch, work.prompt_tokens, work.steps, arch.num_layers
    flops = batch * (L * layer_flops(arch, t, (t + 1) / 2) + head_flops(arch, 1))  # the prompt pass
    attention = batch * L * attention_flops(arch, t, (t + 1) / 2)
    moved = batch * (L * t * layer_elementwise_elements(arch) + head_elementwise_elements(arch))
    for start, end in plan:
        for rows in chunks.rows_per_layer(
            _shape(arch, work), start, end, m
        ):  # forward, and the inputs' gradients
            flops += 2 * batch * layer_flops(arch, rows, t + rows)
            attention += 2 * batch * attention_flops(arch, rows, t + rows)
            moved += 3 * batch * rows * layer_elementwise_elements(arch)
        flops += 2 * batch * head_flops(arch, end - start)
        moved += 3 * batch * (end - start) * head_elementwise_elements(arch)
    head = arch.embedding_params + arch.outer_norm_params  # the output head (tied or not) and final norm
    gathered = chunks.gathered_elements(arch.layer_params, head, arch.total_params, plan, m, L)
    calls = (
        gathered_modules(arch, L) + 1 + sum(2 * gathered_modules(arch, L - start // m) for start, _ in plan)
    )
    if cluster.world == 1:
        gathered, calls = 0, 0
    compute = cluster.compute(flops - attention) + cluster.attention(attention)
    elementwise = cluster.elementwise(_bytes(arch, moved, work))
    seconds = compute + elementwise + cluster.gather(_bytes(arch, gathered, work), calls)
    return {"flops": flops, "gathered_elements": gathered, "chunks": len(plan), "seconds": seconds}


def attribution_seconds(arch: Architecture, cluster: Cluster, work: Workload) -> float:
    batches = math.ceil(math.ceil(work.prompts / cluster.world) / work.attribution_batch)
    return batches * attribution_batch(arch, cluster, work)["seconds"]


def train_step(arch: Architecture, cluster: Cluster, work: Workload) -> dict[str, float]:
    """One optimizer step on one rank: its micro-steps' FLOPs and gathers, the rows' reduce-scatter."""
    micro_steps = max(1, work.global_batch // (cluster.world * work.micro_batch))
    tokens = work.micro_batch * work.sample_tokens
    rows = arch.num_layers * loki_rows_per_layer(arch.hidden_size, work.quota) * arch.intermediate_size
    forward = arch.num_layers * layer_flops(arch, tokens, work.sample_tokens / 2) + head_flops(arch, tokens)
    flops = micro_steps * (2 * forward + 2 * tokens * rows)  # forward + inputs' gradients; the rows' own
    attention = micro_steps * 2 * arch.num_layers * attention_flops(arch, tokens, work.sample_tokens / 2)
    compute = cluster.compute(flops - attention) + cluster.attention(attention)
    per_token = arch.num_layers * layer_elementwise_elements(arch) + head_elementwise_elements(arch)
    elementwise = cluster.elementwise(_bytes(arch, micro_steps * 3 * tokens * per_token, work))
    in_node = cluster.nodes > 1  # the in-node copy of the frozen weights
    whole, calls = _bytes(arch, arch.total_params, work), gathered_modules(arch, arch.num_layers)
    gathers = micro_steps * 2 * cluster.gather(whole, calls, in_node=in_node) if cluster.world > 1 else 0.0
    reduce = cluster.gather(4 * rows, arch.num_layers) if cluster.world > 1 else 0.0  # as much as a gather
    seconds = compute + elementwise + gathers + reduce
    return {"flops": flops, "micro_steps": micro_steps, "seconds": seconds}


def train_seconds(arch: Architecture, cluster: Cluster, work: Workload) -> float:
    steps = math.ceil(work.epochs * work.samples / work.global_batch)
    return steps * train_step(arch, cluster, work)["seconds"]


def checkpoint_seconds(arch: Architecture, cluster: Cluster, work: Workload) -> float:
    rows = arch.num_layers * loki_rows_per_layer(arch.hidden_size, work.quota) * arch.intermediate_size
    return cluster.file_system(3 * 4 * rows / cluster.nodes)


def export_seconds(arch: Architecture, cluster: Cluster, work: Workload) -> float:
    """Every shard read and written once, the nodes sharing them."""
    return 2 * cluster.file_system(_bytes(arch, arch.total_params, work) / cluster.nodes)


STAGES = {
    "load": load_seconds,
    "attribution": attribution_seconds,
    "training": train_seconds,
    "checkpoint": checkpoint_seconds,
    "export": export_seconds,
}


def estimate(arch: Architecture, cluster: Cluster, work: Workload) -> dict[str, float]:
    """Seconds of each stage."""
    return {name: stage(arch, cluster, work) for name, stage in STAGES.items()}
