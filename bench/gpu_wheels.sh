#!/usr/bin/env bash
# The wheels the GPU machine lacks, into .whl/ at the repository root, for `bench/gpu_check.py` there.
#
# That machine (bench/README.md, "GPU") has Python 3.12, torch, transformers, accelerate, peft,
# safetensors, tensorboard and pytest, but no network and no DeepSpeed. What `import deepspeed` and
# loki_dist's train/attribute/evaluate paths import beyond those is brought here: DeepSpeed as the
# pure-Python wheel its sdist builds, the rest as cp312 manylinux x86-64 wheels (or pure Python ones).
# Pinned to the versions the CPU development environment runs, so both sides run the same code.
# loki_dist reads `datasets` only for saved-dataset directories and hub names, which the check never
# uses, so it is not brought (it would pull pyarrow and pandas, tens of MiB).
#
# GPU_PYTHON (default 3.12) and WHEEL_DIR (default .whl) exist to rehearse the same set on another
# Python, e.g. a CPU virtual environment laid out like the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${WHEEL_DIR:-.whl}
rm -rf "$out"
mkdir -p "$out"

# DeepSpeed: its sdist builds a py3-none-any wheel (no ops compiled; it JIT-builds an op only if used).
pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$out" deepspeed==0.19.8

# DeepSpeed's imports (hjson, msgpack, einops, pydantic and its three helpers, psutil; py-cpuinfo and
# ninja for its op builders) and a typing-extensions new enough for that pydantic (>= 4.16; a newer one
# shadowing the machine's own is harmless).
binary=(
    --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --no-deps
)
pip download --quiet --disable-pip-version-check "${binary[@]}" --dest "$out" \
    hjson==3.1.0 msgpack==1.2.4 einops==0.8.2 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 psutil==7.2.2 py-cpuinfo==9.0.0 ninja==1.13.2

total=$(du -cb "$out"/*.whl | tail -n 1 | cut -f 1)
limit=$((48 * 1024 * 1024)) # the device tool carries 64 MiB in all; leave room for the checkout
ls -l "$out"
echo "$(find "$out" -type f -name '*.whl' | wc -l) wheels, $((total / 1024)) KiB in $out"
if ((total > limit)); then
    echo "error: $out holds $total bytes, over the $limit-byte budget" >&2
    exit 1
fi
