"""Helpers for end-to-end node tests: start a node process, publish camera frames, collect messages."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rclpy.qos import QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from owled_ros.data.bags import carla_topics
from owled_ros.data.calib import encode_jpeg
from owled_ros.data.images import rgb_to_fields
from owled_ros.data.world import render, sample_scene

ROOT = Path(__file__).parents[1]
RELIABLE = QoSProfile(depth=50, reliability=QoSReliabilityPolicy.RELIABLE)


def start_node(module, params, log_path, namespace=None):
    args = [sys.executable, "-m", module, "--ros-args"] + (["-r", f"__ns:={namespace}"] if namespace else [])
    for key, value in params.items():
        args += ["-p", f"{key}:={value}"]
    log = open(log_path, "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())


def stop_node(process, sig=signal.SIGINT, timeout=15):
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def stamp(ns):
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def image_msg(rgb, stamp_ns, encoding="rgb8", frame_id="cam"):
    height, width, encoding, step, data = rgb_to_fields(rgb, encoding)
    return Image(header=Header(stamp=stamp(stamp_ns), frame_id=frame_id), height=height, width=width,
                 encoding=encoding, is_bigendian=0, step=step, data=data)


def compressed_msg(rgb, stamp_ns, frame_id="cam"):
    return CompressedImage(header=Header(stamp=stamp(stamp_ns), frame_id=frame_id), format="jpeg",
                           data=encode_jpeg(rgb))


class Peer:
    """A test-side rclpy node in its own context."""

    def __init__(self, name):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received = {}

    def collect(self, kind, topic, qos=10):
        self.received[topic] = []
        self.node.create_subscription(kind, topic, self.received[topic].append, qos)

    def spin(self, seconds, until=None):
        """Spin for `seconds` or until `until()` holds; returns whether it does (None without a condition)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            self.executor.spin_once(timeout_sec=0.05)
        return bool(until()) if until else None

    def wait_for_subscribers(self, publisher, count=1, timeout=60):
        self.spin(timeout, until=lambda: publisher.get_subscription_count() >= count)
        return publisher.get_subscription_count() >= count

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def frame(seed, shape=(64, 96, 3)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def carla_publishers(peer):
    """Publishers on the CARLA-bridge camera topics the YAML configs subscribe to, by nuScenes view name."""
    return {camera: peer.node.create_publisher(Image, topic, RELIABLE) for camera, topic in carla_topics().items()}


def publish_carla_set(publishers, stamp_ns, seed):
    for camera, rgb in render(sample_scene(seed), list(publishers), 64, 96).items():
        publishers[camera].publish(image_msg(rgb, stamp_ns, "bgra8", camera))


def include_installed(launch_file, **arguments):
    """The package's launch file as `ros2 launch owled_ros <file>` finds it (the ament index), with arguments."""
    from ament_index_python.packages import get_package_share_directory
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    path = os.path.join(get_package_share_directory("owled_ros"), "launch", launch_file)
    return IncludeLaunchDescription(PythonLaunchDescriptionSource(path), launch_arguments=arguments.items())
