#!/usr/bin/env bash
# Inside a Slurm allocation: run one loki-dist sub-command on every node of the job, one srun task per
# node, each running launch/torchrun.sh (NPROC_PER_NODE ranks) joined through c10d rendezvous.
#
#   slurm/srun_torchrun.sh train --model M ... --output-dir out      (from an sbatch script)
#
# Requeue: on SIGUSR1 or SIGTERM (send `#SBATCH --signal=B:USR1@600` to the batch shell, which execs
# this script) it forwards SIGUSR1 to the training processes; `loki-dist train` finishes its step, saves
# a checkpoint and exits with 75; then this script runs `scontrol requeue` (unless REQUEUE=0) and exits
# 75. The requeued job runs the same command and resumes from the newest checkpoint (--resume auto).
#
# CPUs: each node's task gets the job's --cpus-per-task (or, without it, the fewest CPUs the job holds on
# any node) and is bound to those cores; its torchrun and all its ranks share them. Slurm >= 22.05 no
# longer passes the batch job's --cpus-per-task on to srun, and a step that asks for nothing gets one
# CPU per task: all ranks of a node on one core.
#
# Environment: NPROC_PER_NODE (default: SLURM_GPUS_ON_NODE, else the GPUs this node's task sees, else
# 1), RDZV_PORT (default: derived from the job id, so that two jobs sharing a node do not meet on one
# port), RDZV_HOST (skip the lookup below), REQUEUE (default 1), PYTHON.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/lib.sh
source "$here/../launch/lib.sh"
: "${SLURM_JOB_ID:?run this inside a Slurm allocation (sbatch or salloc)}"
if [[ $# -eq 0 ]]; then
    echo "usage: $(basename "$0") COMMAND [loki-dist flags...]" >&2
    exit 2
fi

# The rendezvous host: the job's first node. Its name is used when it resolves; otherwise its NodeAddr
# from `scontrol show node` (node names need not be resolvable host names). Never localhost: every node
# would then rendezvous with itself and wait forever.
rdzv_host() {
    if [[ -n "${RDZV_HOST:-}" ]]; then
        echo "$RDZV_HOST"
        return
    fi
    if ! command -v scontrol >/dev/null 2>&1; then
        echo "$(basename "$0"): scontrol not found, cannot find the first node of $SLURM_JOB_NODELIST;" \
            "set RDZV_HOST to its address" >&2
        return 1
    fi
    local first addr
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    if getent hosts "$first" >/dev/null 2>&1; then
        echo "$first"
        return
    fi
    addr="$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)"
    if [[ -z "$addr" ]]; then
        echo "$(basename "$0"): node $first does not resolve and scontrol shows no NodeAddr for it" >&2
        return 1
    fi
    echo "$addr"
}

# CPUs for each node's task: --cpus-per-task of the job, else the fewest it holds on any of its nodes
# (SLURM_JOB_CPUS_PER_NODE reads like "64(x2),32").
step_cpus() {
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        echo "$SLURM_CPUS_PER_TASK"
        return
    fi
    local fewest="" count
    for count in $(echo "${SLURM_JOB_CPUS_PER_NODE:-}" | tr ',' ' ' | sed 's/([^)]*)//g'); do
        if [[ -z "$fewest" ]] || ((count < fewest)); then
            fewest="$count"
        fi
    done
    echo "${fewest:-1}"
}

host="$(rdzv_host)"
cpus="$(step_cpus)"
# The c10d store listens on the first node, on a port of this job's own: derived from the job id as
# loki_dist derives a bare srun's (distributed.slurm_port, as for step 15). A fixed port is shared by
# every job that lands on that node, and a job that finds it taken joins the other job's store.
port="${RDZV_PORT:-$((20000 + (SLURM_JOB_ID * 16 + 15) % 10000))}"
export NNODES="${SLURM_NNODES:-1}" RDZV_ENDPOINT="$host:$port" RDZV_ID="$SLURM_JOB_ID"
export LOKI_DIST_LAUNCH="$here/../launch/torchrun.sh"
echo "+ rendezvous $RDZV_ENDPOINT, $NNODES node(s), job $SLURM_JOB_ID, CPUs per node: $cpus" >&2

stopping=0 step=""
# shellcheck disable=SC2317  # invoked by the trap
forward_stop() {
    stopping=1
    echo "$(basename "$0"): stop requested: asking loki-dist to checkpoint and exit" >&2
    if [[ -n "$step" ]]; then
        kill -USR1 "$step" 2>/dev/null || true  # srun passes SIGUSR1 on to every process of the step
    fi
}
trap forward_stop USR1 TERM

# The single quotes matter: $SLURM_NODEID must be expanded by each task's own shell (0, 1, ... per
# node), not once here (every node would claim to be node 0). `trap '' USR1` makes torchrun (and, until
# loki_dist installs its handler, its workers) ignore the SIGUSR1 Slurm delivers to every process of the
# step: torchrun would otherwise die of it and take the workers down mid-step.
# shellcheck disable=SC2016
srun --ntasks-per-node=1 --cpus-per-task="$cpus" --cpu-bind=cores --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1; NODE_RANK="$SLURM_NODEID" exec "$LOKI_DIST_LAUNCH" "$@"' loki-dist-node "$@" &
step=$!

wait_through_traps "$step"
rc="$WAITED_STATUS"

if (( stopping )); then
    if [[ "${REQUEUE:-1}" != 0 ]]; then
        echo "$(basename "$0"): requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 75
fi
exit "$rc"
