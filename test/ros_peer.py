"""The other process of the round-trip tests: publishes every sample message, or serves owled_ros/srv/Ask."""
import sys
import time

import rclpy
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy

from owled_ros.srv import Ask
from ros_samples import samples

LATCHED = QoSProfile(depth=1, reliability=QoSReliabilityPolicy.RELIABLE,
                     durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)


def publish(node, seconds):
    publishers = {topic: node.create_publisher(kind, f"/roundtrip/{topic}", LATCHED)
                  for topic, (kind, _) in samples().items()}
    for topic, (_, message) in samples().items():
        publishers[topic].publish(message)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.1)


def serve(node, seconds):
    answer = samples()["answer"][1]

    def ask(request, response):
        response.success = True
        response.message = f"answered {request.question_id}"
        response.answer = answer
        response.answer.question = request.question
        return response

    node.create_service(Ask, "/roundtrip/ask", ask)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.1)


if __name__ == "__main__":
    mode, seconds = sys.argv[1], float(sys.argv[2])
    rclpy.init()
    node = rclpy.create_node(f"roundtrip_{mode}")
    print("ready", flush=True)
    {"publish": publish, "serve": serve}[mode](node, seconds)
    node.destroy_node()
    rclpy.shutdown()
