# shellcheck shell=bash
# Shared by the launch/*.sh wrappers (sourced, not run).

# GPUs on this node as nvidia-smi lists them; 1 where there is none (one CPU process).
gpus_per_node() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || echo 1
    else
        echo 1
    fi
}

# Print the command, shell-quoted (so every log shows exactly what ran, ready to paste), then become it.
show_and_exec() {
    {
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    } >&2
    exec "$@"
}

# Refuse to start without a sub-command: the wrappers pass everything else to loki-dist unchanged.
need_command() {
    if [[ $# -eq 0 ]]; then
        echo "usage: $(basename "$0") COMMAND [loki-dist flags...]   (e.g. train --model ...)" >&2
        exit 2
    fi
}
