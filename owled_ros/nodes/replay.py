"""`owled replay BAG`: publish a rosbag2's camera topics live with the original timing (rate factor, loop), and
the bag's time on /clock (as `ros2 bag play --clock`), so that nodes with use_sim_time run on it."""
import signal
import threading
import time

import rclpy
from builtin_interfaces.msg import Time
from rclpy.signals import SignalHandlerOptions
from rclpy.qos import QoSProfile, QoSReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from owled_ros.data.bags import COMPRESSED, camera_messages, image_topics


def to_ros(msgtype, message):
    header = Header(stamp=Time(sec=message.header.stamp.sec, nanosec=message.header.stamp.nanosec),
                    frame_id=message.header.frame_id)
    if msgtype == COMPRESSED:
        return CompressedImage(header=header, format=message.format, data=message.data.tobytes())
    return Image(header=header, height=message.height, width=message.width, encoding=message.encoding,
                 is_bigendian=message.is_bigendian, step=message.step, data=message.data.tobytes())


def replay(bag, rate=1.0, loop=False, topics=None, wait_subscribers=0, wait_timeout=30.0, log=print):
    """Publish the bag's image topics; returns the number of messages published. SIGINT/SIGTERM (Ctrl-C, or
    ros2 launch shutting down) end it normally, as any player."""
    if rate <= 0:
        raise ValueError(f"--rate must be positive, got {rate}")
    types = image_topics(bag)
    if not types:
        raise ValueError(f"bag {bag} has no image topics")
    topics = topics or list(types)
    if set(topics) - set(types):
        raise ValueError(f"bag {bag} has no image topic(s) {sorted(set(topics) - set(types))}; it has {list(types)}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("owled_replay")
    qos = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
    published = 0
    try:
        # every topic is matched before the first message: a camera discovered late would make partial frame sets
        publishers = {t: node.create_publisher(CompressedImage if types[t] == COMPRESSED else Image, t, qos)
                      for t in topics}
        clock = node.create_publisher(Clock, "/clock", qos)
        end = time.monotonic() + wait_timeout
        while (min(p.get_subscription_count() for p in publishers.values()) < wait_subscribers
               and time.monotonic() < end and not stop.is_set()):
            rclpy.spin_once(node, timeout_sec=0.05)
        missing = [t for t, p in publishers.items() if p.get_subscription_count() < wait_subscribers]
        if missing and not stop.is_set():
            log(f"no {wait_subscribers} subscriber(s) after {wait_timeout:g} s on {missing}: publishing anyway")
        if wait_subscribers:
            stop.wait(0.5)  # discovery is one-sided for a moment: the readers may not know this writer yet
        while not stop.is_set():
            first_ns, started = None, time.monotonic()
            for topic, timestamp, msgtype, message in camera_messages(bag, topics):
                if first_ns is None:
                    first_ns, started = timestamp, time.monotonic()
                if stop.wait(max(0.0, (timestamp - first_ns) / 1e9 / rate - (time.monotonic() - started))):
                    break
                clock.publish(Clock(clock=Time(sec=timestamp // 10**9, nanosec=timestamp % 10**9)))
                publishers[topic].publish(to_ros(msgtype, message))
                published += 1
            if not loop:
                break
        stop.wait(0.5)  # let the last messages leave before the publishers go
        log(f"{'interrupted after' if stop.is_set() else 'replayed'} {published} messages from {bag} on {len(publishers)} topics")
        return published
    finally:
        # the work is done: a signal that comes now (launch shutting down) must not kill the interpreter's exit
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        node.destroy_node()
        rclpy.try_shutdown()
