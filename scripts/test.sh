#!/usr/bin/env bash
# Installs what the tests need, then runs the offline test suite (arguments go to pytest).
set -euo pipefail
LORA_TUNE_EXTRAS="test,eval,serve,export" source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest "$@"
