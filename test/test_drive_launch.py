"""launch_testing test of launch/drive.launch.py, for real ROS 2 installs (`colcon test` / `launch_test`).

Skipped where launch_testing is not importable (the pip/venv setup has no launch packages); the same
node is tested end to end as a process in test_drive_node.py.
"""
import os
import unittest

import pytest

launch_testing = pytest.importorskip("launch_testing", reason="launch_testing is not installed (ROS 2 wheels lack it)")
import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402


@pytest.mark.launch_test
def generate_test_description():
    path = os.path.join(os.path.dirname(__file__), "..", "launch", "drive.launch.py")
    drive = launch.actions.IncludeLaunchDescription(PythonLaunchDescriptionSource(path))
    return launch.LaunchDescription([drive, launch_testing.actions.ReadyToTest()])


class TestDriveNodeStarts(unittest.TestCase):
    def test_model_is_loaded(self, proc_output):
        proc_output.assertWaitFor("model ", timeout=600, stream="stderr")
