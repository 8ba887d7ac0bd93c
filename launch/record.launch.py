"""ros2 launch owled_ros record.launch.py output_dir:=DIR [vehicle_id:=ID] [input:=live|bag] [bag:=PATH]
[rate:=1.0] [discovery_range:=LOCALHOST|SUBNET] [dds_profile:=XML]"""
from launch import LaunchDescription

from owled_ros.nodes.launching import input_actions, node


def generate_launch_description():
    return LaunchDescription([
        *node("recorder_node", "owled_recorder", "recorder.yaml",
              output_dir={"default_value": "calibration", "description": "calibration set directory"},
              vehicle_id={"default_value": "", "description": "part of every shard name (default: the host name)"}),
        *input_actions(),
    ])
