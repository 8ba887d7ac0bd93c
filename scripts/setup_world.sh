#!/usr/bin/env bash
# The MetaDrive world (owled_ros/data/metadrive_world.py) renders in its own venv, .venv-world:
# metadrive-simulator 0.3.0.1 pins numpy 1.24 and gym 0.25. It writes calibration sets that .venv reads.
# Needed by `owled calib world`, `owled build-default`, the tests and the benches; not by the demo.
# Skipped while requirements-world.lock is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
world=$PWD/.venv-world
stamp=$world/.owled-stamp
PYTHON=${PYTHON:-python3.11}
deps=$(sha256sum requirements-world.lock | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$deps" ]; then
  echo "[setup] MetaDrive venv $world (requirements-world.lock)"
  [ -x "$world/bin/python" ] || "$PYTHON" -m venv "$world"
  "$world/bin/python" -m pip install -q --disable-pip-version-check -r requirements-world.lock
  echo "$deps" > "$stamp"
fi
echo "[setup] ready: $world ($(du -sh "$world" | cut -f1))"
