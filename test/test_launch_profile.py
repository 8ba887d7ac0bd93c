"""The launch files run the nodes with the shipped Fast DDS profile (config/fastdds.xml), and Fast DDS takes it."""
import importlib.util
import os
import subprocess
import sys

import pytest

pytest.importorskip("launch_ros", reason="the ROS 2 launch stack is not installed (no ../shared/ros2-launch at setup)")
from ament_index_python.packages import get_package_share_directory  # noqa: E402
from launch import LaunchContext  # noqa: E402
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable  # noqa: E402

PROFILE = os.path.join(get_package_share_directory("owled_ros"), "config", "fastdds.xml")


@pytest.mark.parametrize("launch_file", ["drive.launch.py", "record.launch.py"])
def test_launch_files_point_fast_dds_at_the_shipped_profile(launch_file):
    path = os.path.join(get_package_share_directory("owled_ros"), "launch", launch_file)
    spec = importlib.util.spec_from_file_location("launch_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    context = LaunchContext()
    for entity in module.generate_launch_description().entities:
        if isinstance(entity, (DeclareLaunchArgument, SetEnvironmentVariable)):
            entity.execute(context)
    assert context.environment["FASTDDS_DEFAULT_PROFILES_FILE"] == PROFILE and os.path.isfile(PROFILE)


def test_fast_dds_loads_the_profile_without_complaint():
    probe = "import rclpy; rclpy.init(); rclpy.create_node('profile_probe').destroy_node(); rclpy.shutdown(); print('ok')"
    for profile, clean in ((PROFILE, True), (os.devnull, False)):  # an empty file is an XML error: the check can fail
        done = subprocess.run([sys.executable, "-c", probe], env=os.environ | {"FASTDDS_DEFAULT_PROFILES_FILE": profile},
                              capture_output=True, text=True, timeout=60)
        assert ("XMLPARSER" not in done.stdout + done.stderr) == clean, done.stdout + done.stderr
