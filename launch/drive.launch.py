"""ros2 launch owled_ros drive.launch.py [model_dir:=DIR] [input:=live|bag] [bag:=PATH] [rate:=1.0]
[discovery_range:=LOCALHOST|SUBNET]"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node


def generate_launch_description():
    config = os.path.join(get_package_share_directory("owled_ros"), "config", "drive.yaml")
    model_dir, source, bag, rate = (LaunchConfiguration(n) for n in ("model_dir", "input", "bag", "rate"))
    return LaunchDescription([
        DeclareLaunchArgument("model_dir", default_value="default", description="dense or pruned model directory"),
        DeclareLaunchArgument("input", default_value="live", description="live cameras or a recorded bag"),
        DeclareLaunchArgument("bag", default_value="", description="rosbag2 to replay when input:=bag"),
        DeclareLaunchArgument("rate", default_value="1.0", description="bag replay rate factor"),
        DeclareLaunchArgument("discovery_range", default_value="LOCALHOST",
                              description="ROS discovery: LOCALHOST (this machine) or SUBNET (the vehicle network)"),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", LaunchConfiguration("discovery_range")),
        Node(package="owled_ros", executable="drive_node", name="owled_drive", output="screen",
             parameters=[config, {"model_dir": model_dir}]),
        ExecuteProcess(cmd=["owled", "replay", bag, "--rate", rate], output="screen",
                       condition=IfCondition(PythonExpression(["'", source, "' == 'bag'"]))),
    ])
