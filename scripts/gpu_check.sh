#!/usr/bin/env bash
# The GPU check: lora-tune against the raw PEFT loop and TRL's defaults on a 0.85B Llama, and
# the README's other speed and memory claims, into one JSON file (scripts/gpu_check.py says what
# it measures). Made for a GPU machine that has torch with CUDA but no network: the rest of the
# training stack travels with the working tree as wheels in .wheels/ (ignored by git).
#
#   scripts/gpu_check.sh prepare   # here, with a network: fill .wheels/ (about 35 MiB)
#   scripts/gpu_check.sh           # on the GPU machine: install .wheels/, run the check (< 8 min)
#   scripts/gpu_check.sh cpu       # tiny sizes on the CPU, in this checkout's .venv: the tests run it
#
# Further arguments go to gpu_check.py (--budget SECONDS, --only step,eval ...). The results go to
# $OUT/gpu_check.json when OUT is set, else ./gpu_check.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# What the GPU machine lacks, or has in other versions, pinned to what the test suite runs here.
# It has torch (CUDA), triton, accelerate, numpy, pandas, pyarrow, xxhash, fsspec, huggingface-hub,
# tokenizers, safetensors, rich, typer, pyyaml, tensorboard, psutil, ninja, einops, msgpack,
# py-cpuinfo, pytest. flash-attn has no binary wheel on PyPI: flex attention stands in for it.
WHEELS=(
    transformers==5.24.0
    trl==1.16.0
    peft==0.21.2
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    liger-kernel==0.8.5
    bitsandbytes==0.50.2
    hjson==3.1.0
)
# No binary wheel on PyPI: built here from its source without compiling its CUDA ops (the ones a
# run needs compile when first used; ZeRO-3 with PyTorch's AdamW needs none).
DEEPSPEED=deepspeed==0.19.8
WHEEL_DIR=.wheels
PYTHON_VERSION=3.12
# bitsandbytes keeps only its libraries for this CUDA major version (the machine's torch is cu130).
BNB_CUDA=${BNB_CUDA:-cuda13}
SITE=${SITE:-/tmp/lora-tune-site}
# PYTHON: the interpreter (default: python3 on the GPU machine, else this checkout's .venv).
local_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; elif [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

prepare() {
    PYTHON=$(local_python)
    rm -rf "$WHEEL_DIR" && mkdir -p "$WHEEL_DIR"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
        --python-version "$PYTHON_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEEL_DIR" "${WHEELS[@]}"
    "$PYTHON" scripts/gpu_check_wheels.py slim "$WHEEL_DIR"/bitsandbytes-*.whl --keep "$BNB_CUDA"
    local source
    source=$(mktemp -d)
    if "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$source" "$DEEPSPEED" &&
        DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation \
            -w "$WHEEL_DIR" "$source"/deepspeed-*.tar.gz; then
        echo "deepspeed: built $(basename "$WHEEL_DIR"/deepspeed-*.whl)"
    else
        echo "deepspeed: no wheel built; the check will skip ZeRO-3"
    fi
    rm -rf "$source"
    "$PYTHON" scripts/gpu_check_wheels.py size "$WHEEL_DIR" --limit-mib 60
}

gpu() {
    PYTHON=${PYTHON:-python3}
    if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl
        export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no wheels in $WHEEL_DIR ('scripts/gpu_check.sh prepare' fills it): using $PYTHON's packages"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    "$PYTHON" scripts/gpu_check.py --mode gpu "$@"
}

cpu() {
    PYTHON=$(local_python)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    "$PYTHON" scripts/gpu_check.py --mode cpu "$@"
}

case "${1:-gpu}" in
prepare) prepare ;;
cpu) shift && cpu "$@" ;;
gpu) [ $# -gt 0 ] && shift; gpu "$@" ;;
*) gpu "$@" ;;
esac
