"""ros2 launch owled_ros drive.launch.py [model_dir:=DIR] [input:=live|bag] [bag:=PATH] [rate:=1.0] [dds_profile:=XML]
[discovery_range:=LOCALHOST|SUBNET]"""
from launch import LaunchDescription

from owled_ros.nodes.launching import input_actions, node


def generate_launch_description():
    return LaunchDescription([
        *node("drive_node", "owled_drive", "drive.yaml",
              model_dir={"default_value": "default", "description": "default, an owled_ros model directory or a transformers checkpoint (dense or pruned)"}),
        *input_actions(),
    ])
