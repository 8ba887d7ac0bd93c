"""Every custom message and the Ask service cross a process boundary over DDS with all field values intact."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rclpy

from ros_samples import samples
from ros_peer import LATCHED

HERE = Path(__file__).parent


@pytest.fixture
def node():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("roundtrip_test", context=context)
    yield node
    node.destroy_node()
    rclpy.shutdown(context=context)


def peer(mode, seconds=30):
    process = subprocess.Popen([sys.executable, str(HERE / "ros_peer.py"), mode, str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def spin_until(node, done, timeout):
    executor = rclpy.executors.SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    end = time.monotonic() + timeout
    while not done() and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.1)
    executor.remove_node(node)


def test_every_message_round_trips_between_processes(node):
    expected = samples()
    received = {}
    for topic, (kind, _) in expected.items():
        node.create_subscription(kind, f"/roundtrip/{topic}", lambda m, t=topic: received.setdefault(t, m), LATCHED)
    publisher = peer("publish")
    try:
        spin_until(node, lambda: len(received) == len(expected), timeout=20)
    finally:
        publisher.kill()
        publisher.wait()
    assert set(received) == set(expected)
    for topic, (_, message) in expected.items():
        assert received[topic] == message, topic
    perception = received["perception"]
    assert perception.header.stamp.sec == 1700000123 and perception.header.stamp.nanosec == 456000000
    assert [o.label for o in perception.objects] == ["vehicle", "traffic_light"] and perception.confidence == 0.625
    assert perception.objects[1].state == "red" and perception.model.sparsity == 0.5
    assert received["action"].action == received["action"].ACTION_STOP


def test_ask_service_round_trips_between_processes(node):
    from owled_ros.srv import Ask

    server = peer("serve")
    try:
        client = node.create_client(Ask, "/roundtrip/ask")
        assert client.wait_for_service(timeout_sec=20)
        future = client.call_async(Ask.Request(question_id="q-9", category="perception",
                                               question="What are the important objects?"))
        spin_until(node, future.done, timeout=20)
    finally:
        server.kill()
        server.wait()
    response = future.result()
    assert response.success and response.message == "answered q-9"
    assert response.answer.question == "What are the important objects?"
    assert response.answer.answer == "Stop." and response.answer.model.method == "owled"
