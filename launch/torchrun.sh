#!/usr/bin/env bash
# Run any loki-dist sub-command under torchrun, passing its flags through unchanged.
#
#   launch/torchrun.sh train --model M --positions P --data D --output-dir out    # this node, every GPU
#   NNODES=4 RDZV_ENDPOINT=node001:29400 launch/torchrun.sh train ...             # the same line on 4 nodes
#
# One node (NNODES=1, the default) uses torchrun --standalone. Several nodes use c10d rendezvous: start
# the same command on every node; RDZV_ENDPOINT is host:port of any one of them (the c10d store runs
# there). Under c10d the rendezvous assigns global ranks, so global rank 0 may land on any node: nothing
# here or in loki_dist assumes that node 0 holds rank 0.
#
# Environment: NPROC_PER_NODE (default: the GPUs nvidia-smi lists, or 1), NNODES (default 1),
# RDZV_ENDPOINT (required when NNODES > 1), RDZV_ID (default loki_dist; the same on every node),
# NODE_RANK (passed on for the logs only), PYTHON (default python).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/lib.sh
source "$here/lib.sh"
need_command "$@"

nproc="$(nproc_per_node)"
nnodes="${NNODES:-1}"
cmd=("${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$nproc")
if [[ "$nnodes" == 1 ]]; then
    cmd+=(--standalone)
else
    if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
        echo "$0: NNODES=$nnodes needs RDZV_ENDPOINT=host:port of one of the nodes" >&2
        exit 2
    fi
    cmd+=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT"
        --rdzv_id "${RDZV_ID:-loki_dist}")
    if [[ -n "${NODE_RANK:-}" ]]; then
        cmd+=(--node_rank "$NODE_RANK")
    fi
fi
cmd+=(-m loki_dist "$@")
run_launcher "${cmd[@]}"
