"""What drive.launch.py and record.launch.py share: the input (live cameras or a bag replayed into them),
ROS discovery scope, the Fast DDS profile (config/fastdds.xml), and a node in a namespace with its parameter
file and overrides."""
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node
from launch_ros.substitutions import ExecutableInPackage
import yaml


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
        DeclareLaunchArgument("wait_timeout", default_value="300",
                              description="seconds the replay waits for the node's subscription (the node subscribes "
                                          "once its model is loaded and compiled)"),
        # waits for the node's subscription so that no frame is published into the void
        ExecuteProcess(cmd=[ExecutableInPackage("owled", "owled_ros"), "replay", bag, "--rate", rate,
                            "--wait-subscribers", "1", "--wait-timeout", LaunchConfiguration("wait_timeout")],
                       name="owled_replay", output="screen",
                       condition=IfCondition(PythonExpression(["'", source, "' == 'bag'"]))),
    ]


def share_file(*parts):
    return os.path.join(get_package_share_directory("owled_ros"), *parts)


def node(executable, name, config, **arguments):
    """A node of this package in the namespace given (launch argument `namespace`), with its parameters from
    `params_file` (default: config/<config>, a ROS parameter file), `use_sim_time`, and overrides: each
    keyword names a node parameter, its launch argument of the same name and that argument's description;
    an argument left empty keeps the parameter file's value. Values keep the parameter's type: a string stays
    a string (a directory named 2024 stays a path), a list or boolean argument reads as YAML ([a, b], true)."""
    declared = [DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
                DeclareLaunchArgument("params_file", default_value=share_file("config", config),
                                      description="ROS parameter file of the node"),
                DeclareLaunchArgument("use_sim_time", default_value="false", choices=["true", "false"],
                                      description="stamps and latencies on /clock (a replayed bag publishes it)")]
    declared += [DeclareLaunchArgument(key, default_value="", description=description)
                 for key, (_, description) in arguments.items()]

    def make(context):
        given = {key: LaunchConfiguration(key).perform(context) for key in arguments}
        overrides = {key: typed(arguments[key][0], value) for key, value in given.items() if value}
        sim_time = LaunchConfiguration("use_sim_time").perform(context) == "true"
        return [Node(package="owled_ros", executable=executable, name=name, output="screen",
                     namespace=LaunchConfiguration("namespace"),
                     parameters=[LaunchConfiguration("params_file"), overrides, {"use_sim_time": sim_time}])]
    return [*declared, OpaqueFunction(function=make)]


def typed(kind, text):
    return yaml.safe_load(text) if kind in (list, bool) else kind(text)
