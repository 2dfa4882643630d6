# shellcheck shell=bash
# Shared by the launch/*.sh wrappers (sourced, not run).

# GPUs this process may use: those CUDA_VISIBLE_DEVICES lists where it is set (Slurm sets it for a
# task's GPUs; set and empty: none), else those nvidia-smi lists (0 without nvidia-smi or GPUs).
gpus_on_node() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local -a listed
        IFS=',' read -r -a listed <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#listed[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Processes per node: NPROC_PER_NODE, else the GPUs Slurm gave this node (SLURM_GPUS_ON_NODE), else one
# per GPU found, else 1, saying which on stderr (a CPU machine gets one process unless NPROC_PER_NODE
# says otherwise, which surprises whoever expected more).
nproc_per_node() {
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        echo "$NPROC_PER_NODE"
        return
    fi
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]] && ((SLURM_GPUS_ON_NODE > 0)); then
        echo "$(basename "$0"): NPROC_PER_NODE not set: $SLURM_GPUS_ON_NODE processes per node, one per GPU" \
            "Slurm gave this node" >&2
        echo "$SLURM_GPUS_ON_NODE"
        return
    fi
    local gpus
    gpus="$(gpus_on_node)"
    if ((gpus > 0)); then
        echo "$(basename "$0"): NPROC_PER_NODE not set: $gpus processes per node, one per GPU" >&2
        echo "$gpus"
    else
        echo "$(basename "$0"): NPROC_PER_NODE not set and no GPU found: 1 process per node" >&2
        echo 1
    fi
}

# Print the command, shell-quoted (so every log shows exactly what ran, ready to paste), run it, and exit
# with the status the loki-dist ranks agreed on.
#
# Stop signals: SIGUSR1 or SIGTERM sent to this script reaches the loki-dist workers as SIGUSR1 (training
# then finishes its step, saves a checkpoint and exits with 75). The launcher runs with SIGUSR1 ignored,
# so that one sent to the whole process group does not kill it; the workers install their own handler.
# SIGINT (Ctrl-C) reaches the launcher directly (same process group), which stops its workers.
#
# Exit status: torchrun and accelerate exit with 1 whenever a worker fails, whatever its status. Each
# loki-dist rank writes its own into LOKI_DIST_STATUS_DIR; when the launcher failed and the ranks that
# wrote one agree on a non-zero status, that is this script's: 75 stopped after a checkpoint, 3 diverged,
# 2 a user mistake, 1 a crash. Ranks on other nodes report to their own node's wrapper.
run_launcher() {
    {
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    } >&2
    local status_dir launcher rc
    status_dir="$(mktemp -d)"
    export LOKI_DIST_STATUS_DIR="$status_dir"
    (
        trap '' USR1
        exec "$@"
    ) &
    launcher=$!
    # shellcheck disable=SC2064  # the launcher's pid, now
    trap "forward_stop $launcher" USR1 TERM
    trap ':' INT # keep waiting: the launcher got the same SIGINT and is stopping its workers
    wait_through_traps "$launcher"
    trap - USR1 TERM INT
    rc="$(agreed_status "$status_dir" "$WAITED_STATUS")"
    rm -rf "$status_dir"
    exit "$rc"
}

# Wait for the background process $1 and set WAITED_STATUS to its exit status. A trapped signal
# interrupts `wait` with a status > 128 while the process still runs: then wait again. (A variable, not
# output: `wait` in a command substitution's subshell cannot wait for this shell's children.)
wait_through_traps() {
    while :; do
        WAITED_STATUS=0
        wait "$1" || WAITED_STATUS=$?
        if ((WAITED_STATUS > 128)) && kill -0 "$1" 2>/dev/null; then
            continue
        fi
        return 0
    done
}

# SIGUSR1 to the loki-dist processes the launcher ($1) started, at any depth (the deepspeed launcher
# starts them from a child of its own); nothing else of the tree (a helper a worker runs) is signalled.
forward_stop() {
    echo "$(basename "$0"): stop requested: asking loki-dist to save a checkpoint and exit" >&2
    local pid
    for pid in $(loki_dist_descendants "$1"); do
        kill -USR1 "$pid" 2>/dev/null || true
    done
}

loki_dist_descendants() {
    local pid args
    while read -r pid args; do
        if [[ "$args" == *loki_dist* ]]; then
            echo "$pid"
        fi
        loki_dist_descendants "$pid"
    done < <(ps -o pid=,args= --ppid "$1" 2>/dev/null)
}

# The status the ranks wrote into $1 when they agree on a non-zero one and the launcher failed ($2 is its
# status); otherwise the launcher's.
agreed_status() {
    local statuses
    if [[ "$2" != 0 ]]; then
        statuses="$(cat "$1"/rank* 2>/dev/null | sort -u)"
        if [[ -n "$statuses" && "$statuses" != *$'\n'* && "$statuses" != 0 ]]; then
            if [[ "$statuses" != "$2" ]]; then
                echo "$(basename "$0"): the launcher exited with $2, the loki-dist ranks with $statuses" >&2
            fi
            echo "$statuses"
            return
        fi
    fi
    echo "$2"
}

# Refuse to start without a sub-command: the wrappers pass everything else to loki-dist unchanged.
need_command() {
    if [[ $# -eq 0 ]]; then
        echo "usage: $(basename "$0") COMMAND [loki-dist flags...]   (e.g. train --model ...)" >&2
        exit 2
    fi
}
