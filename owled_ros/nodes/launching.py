"""What drive.launch.py and record.launch.py share: the input (live cameras or a bag replayed into them),
ROS discovery scope, the Fast DDS profile (config/fastdds.xml), and a node with its YAML parameters from the
package's share directory."""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, ExecuteProcess, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import ExecutableInPackage


def input_actions():
    source, bag, rate = (LaunchConfiguration(n) for n in ("input", "bag", "rate"))
    return [
        DeclareLaunchArgument("input", default_value="live", choices=["live", "bag"],
                              description="live cameras or a recorded bag"),
        DeclareLaunchArgument("bag", default_value="", description="rosbag2 to replay when input:=bag"),
        DeclareLaunchArgument("rate", default_value="1.0", description="bag replay rate factor"),
        DeclareLaunchArgument("discovery_range", default_value="LOCALHOST",
                              description="ROS discovery: LOCALHOST (this machine) or SUBNET (the vehicle network)"),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", LaunchConfiguration("discovery_range")),
        DeclareLaunchArgument("dds_profile", default_value=share_file("config", "fastdds.xml"),
                              description="Fast DDS XML profile (shared memory sized for raw camera frames)"),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("dds_profile")),
        # waits (up to 30 s) for the node's subscription so that no frame is published into the void
        ExecuteProcess(cmd=[ExecutableInPackage("owled", "owled_ros"), "replay", bag, "--rate", rate,
                            "--wait-subscribers", "1"],
                       name="owled_replay", output="screen",
                       condition=IfCondition(PythonExpression(["'", source, "' == 'bag'"]))),
    ]


def share_file(*parts):
    return os.path.join(get_package_share_directory("owled_ros"), *parts)


def node(executable, name, config, **parameters):
    """A node of this package with config/<config> as its parameters, overridden by string launch arguments
    (kept strings: a directory named 2024 stays a path)."""
    path = share_file("config", config)
    overrides = {key: ParameterValue(LaunchConfiguration(key), value_type=str) for key in parameters}
    return [*(DeclareLaunchArgument(key, **spec) for key, spec in parameters.items()),
            Node(package="owled_ros", executable=executable, name=name, output="screen",
                 parameters=[path, overrides])]
