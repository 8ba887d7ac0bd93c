"""ros2 launch owled_ros drive.launch.py [model_dir:=DIR] [backend:=auto|torch|torch-int8|openvino|openvino-int8|openvino-w8a8] [autostart:=false]
[camera_topics:=[T1,T2]] [namespace:=NS] [params_file:=YAML] [use_sim_time:=true] [input:=live|bag] [bag:=PATH]
[rate:=1.0] [dds_profile:=XML] [discovery_range:=LOCALHOST|SUBNET]"""
from launch import LaunchDescription

from owled_ros.nodes.launching import input_actions, node


def generate_launch_description():
    return LaunchDescription([
        *node("drive_node", "owled_drive", "drive.yaml",
              model_dir=(str, "default, an owled_ros model directory or a transformers checkpoint (dense or pruned)"),
              backend=(str, "auto (the fastest installed), torch, torch-int8, openvino, openvino-int8 or openvino-w8a8"),
              camera_topics=(list, "camera image topics, e.g. [/cam/front/image,/cam/back/image]"),
              autostart=(bool, "true: configure and activate at start-up; false: a lifecycle manager does")),
        *input_actions(),
    ])
