#!/usr/bin/env bash
# Installs what the checks need, then lints the code with ruff (its settings are in pyproject.toml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check lora_tune tests scripts
