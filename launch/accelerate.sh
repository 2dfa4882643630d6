#!/usr/bin/env bash
# Run any loki-dist sub-command under `accelerate launch`, passing its flags through unchanged.
#
#   launch/accelerate.sh train --model M ...                                       # this node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 launch/accelerate.sh train ...        # on node001
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node001 launch/accelerate.sh train ...        # on node002
#
# Environment: ACCELERATE_CONFIG (default launch/accelerate.yaml), NPROC_PER_NODE (default: the GPUs
# nvidia-smi lists, or 1), NNODES (default 1), NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/lib.sh
source "$here/lib.sh"
need_command "$@"

nproc="$(nproc_per_node)"
nnodes="${NNODES:-1}"

cmd=(accelerate launch --config_file "${ACCELERATE_CONFIG:-$here/accelerate.yaml}"
    --num_machines "$nnodes" --num_processes "$((nproc * nnodes))")
if [[ "$nnodes" != 1 ]]; then
    cmd+=(--machine_rank "${NODE_RANK:?NNODES > 1 needs NODE_RANK}"
        --main_process_ip "${MASTER_ADDR:?NNODES > 1 needs MASTER_ADDR}"
        --main_process_port "${MASTER_PORT:-29500}")
fi
cmd+=(-m loki_dist "$@")
run_launcher "${cmd[@]}"
