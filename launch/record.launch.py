"""ros2 launch owled_ros record.launch.py [output_dir:=DIR] [vehicle_id:=ID] [camera_topics:=[T1,T2]]
[namespace:=NS] [params_file:=YAML] [use_sim_time:=true] [input:=live|bag] [bag:=PATH] [rate:=1.0]
[discovery_range:=LOCALHOST|SUBNET] [dds_profile:=XML]"""
from launch import LaunchDescription

from owled_ros.nodes.launching import input_actions, node


def generate_launch_description():
    return LaunchDescription([
        *node("recorder_node", "owled_recorder", "recorder.yaml",
              output_dir=(str, "calibration set directory"),
              vehicle_id=(str, "part of every shard name (default: the host name)"),
              camera_topics=(list, "camera image topics, e.g. [/cam/front/image,/cam/back/image]")),
        *input_actions(),
    ])
