"""The path of every ROS 2 user: `colcon build` of this package in a workspace whose underlay is the venv
(an ament prefix, as /opt/ros/<distro> is on a ROS 2 install), `ros2 launch` from the install space, and
`colcon test` (the launch tests through add_launch_test)."""
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from owled_ros.data.bags import write_synthetic_drive
from owled_ros.msg import PerceptionDescription
from rosutil import ROOT, Peer

pytest.importorskip("launch_testing", reason="the ROS 2 launch stack is not installed (no ../shared/ros2-launch at setup)")
VENV = Path(sys.prefix)
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "install", "log", "__pycache__", "results")


def in_workspace(workspace, command, **kwargs):
    """A shell command after sourcing the install space, as a user does (underlay: the venv)."""
    setup = f"source {workspace}/install/setup.bash && " if (workspace / "install").exists() else ""
    env = os.environ | {"CMAKE_PREFIX_PATH": str(VENV), "AMENT_PREFIX_PATH": str(VENV),
                        "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    # SIGINT as a terminal gives it: a suite started in the background inherits it ignored, and ros2 launch
    # then leaves it ignored (Ctrl-C would not stop it)
    return subprocess.Popen(["bash", "-c", setup + command], cwd=workspace, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def run(workspace, command, timeout):
    process = in_workspace(workspace, command)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{command} failed:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("colcon_ws")
    shutil.copytree(ROOT, workspace / "src" / "owled_ros", ignore=SKIP)
    run(workspace, "colcon build --event-handlers console_direct-", timeout=900)
    return workspace


def test_build_installs_messages_python_launch_files_and_executables(workspace):
    prefix = workspace / "install" / "owled_ros"
    output = run(workspace, "ros2 pkg prefix owled_ros && python -c 'import owled_ros.msg, owled_ros.cli as c; print(c.__file__)'"
                 " && owled --help", timeout=120)
    lines = output.splitlines()
    assert lines[0] == str(prefix)
    assert lines[1].startswith(str(prefix / "lib"))  # the install space's modules, merged with the generated ones
    assert "usage: owled" in output
    for name in ("drive_node", "recorder_node", "owled"):
        assert os.access(prefix / "lib" / "owled_ros" / name, os.X_OK)
    assert {p.name for p in (prefix / "share" / "owled_ros" / "launch").iterdir()} >= {"drive.launch.py", "record.launch.py"}


def test_ros2_launch_from_the_install_space_answers_a_bag_and_stops_on_sigint(workspace, tmp_path):
    from models import tiny_decoder

    tiny_decoder().save_pretrained(tmp_path / "model")
    bag = write_synthetic_drive(tmp_path / "bag", frames=6, size=(64, 96))
    peer = Peer("colcon_launch_test")
    peer.collect(PerceptionDescription, "/owled/perception")
    launch = in_workspace(workspace, f"exec ros2 launch owled_ros drive.launch.py model_dir:={tmp_path / 'model'} "
                                     f"input:=bag bag:={bag}")
    try:
        peer.spin(180, until=lambda: peer.received["/owled/perception"] or launch.poll() is not None)
        assert peer.received["/owled/perception"], launch.stdout.read() if launch.poll() is not None else "no answer"
        assert peer.received["/owled/perception"][0].model.model_id == "tiny-decoder"
    finally:
        peer.close()
        time.sleep(1.0)
        launch.send_signal(signal.SIGINT)
        try:
            output, _ = launch.communicate(timeout=120)
        except subprocess.TimeoutExpired as timeout:
            os.killpg(launch.pid, signal.SIGKILL)  # nothing of it may outlive the test and talk to the next ones
            launch.communicate()
            seen = timeout.output.decode(errors="replace") if isinstance(timeout.output, bytes) else timeout.output or ""
            raise AssertionError(f"ros2 launch did not stop within 120 s of SIGINT:\n{seen[-4000:]}") from None
    assert launch.returncode == 0, output[-4000:]
    assert "[drive_node-1]: process has finished cleanly" in output, output[-4000:]


def test_colcon_test_runs_the_launch_tests_green(workspace):
    run(workspace, "colcon test --event-handlers console_direct- --return-code-on-test-failure", timeout=900)
    results = workspace / "build" / "owled_ros" / "test_results" / "owled_ros"
    suites = {p.name: ET.parse(p).getroot() for p in results.glob("*.xunit.xml")}
    assert set(suites) == {"test_drive_launch.xunit.xml", "test_record_launch.xunit.xml"}
    for name, root in suites.items():
        assert int(root.get("tests")) >= 4 and root.get("failures") == "0" and root.get("errors") == "0", name
