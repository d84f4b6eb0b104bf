#!/usr/bin/env bash
# Installs what the checks need, then lints and format-checks the code with ruff (settings: pyproject.toml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check lora_tune tests scripts
ruff format --check lora_tune tests scripts
