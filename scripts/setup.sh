#!/usr/bin/env bash
# Creates .venv (once) and installs lora-tune with the extras in LORA_TUNE_EXTRAS (default: test,
# eval and serve; test.sh adds export, whose llama.cpp build takes minutes once, then pip's cache).
# Sourced by demo.sh and test.sh. TORCH_SPEC picks the torch build (default: torch==2.13.0,
# installed first so no other requirement can pull a different multi-GB build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip 2>/dev/null
# TORCH_SPEC may hold pip options too (an --index-url), so it is split into words on purpose.
# shellcheck disable=SC2086
python -c "import torch" 2>/dev/null || python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
extras="${LORA_TUNE_EXTRAS:-test,eval,serve}"
python -m pip install --quiet -e ".[$extras]"
if [[ ",$extras," == *,export,* ]]; then
    # llama.cpp's converters (in llama-cpp-python's source distribution), once per version.
    python -m lora_tune.llama_cpp
fi
