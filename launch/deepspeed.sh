#!/usr/bin/env bash
# Run any loki-dist sub-command under the deepspeed launcher, passing its flags through unchanged.
#
#   launch/deepspeed.sh train --model M ...                          # this node, every GPU
#   HOSTFILE=hostfile launch/deepspeed.sh train --model M ...        # every host in the hostfile
#
# A hostfile lists one host per line with its GPU count ("node001 slots=8"). With a hostfile the
# launcher starts the other nodes through pdsh/ssh, so it needs password-less ssh from this node to
# every host. Without ssh, run the same line on every node with NO_SSH=1, NODE_RANK=<0..N-1> and
# MASTER_ADDR=<first host>: each node then starts only its own processes.
#
# Environment: HOSTFILE, NUM_GPUS (per node), MASTER_ADDR, MASTER_PORT (default 29500), NO_SSH, NODE_RANK.
# --no_local_rank: loki_dist reads LOCAL_RANK from the environment and takes no --local_rank flag.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/lib.sh
source "$here/lib.sh"
need_command "$@"

cmd=(deepspeed --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    cmd+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${NUM_GPUS:-}" ]]; then
    cmd+=(--num_gpus "$NUM_GPUS")
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then
    cmd+=(--master_addr "$MASTER_ADDR")
fi
if [[ -n "${NO_SSH:-}" ]]; then
    cmd+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH needs NODE_RANK}")
fi
cmd+=(--module loki_dist "$@")
run_launcher "${cmd[@]}"
