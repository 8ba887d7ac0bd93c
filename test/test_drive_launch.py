"""launch_testing test of drive.launch.py as installed (the venv's or a colcon install space's share
directory): `make test` runs it through pytest, `colcon test` through launch_test. Live cameras (frames
published here) and bag input (replayed by the launch file); SIGINT at the end must stop every process cleanly."""
import os
import sys
import tempfile
import unittest
from pathlib import Path

import pytest

launch_testing = pytest.importorskip("launch_testing", reason="launch_testing is not installed (no ../shared/ros2-launch at setup)")
import launch_testing.asserts  # noqa: E402
from launch import LaunchDescription  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # launch_test imports this file without pytest's rootdir handling
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402

from models import tiny_decoder  # noqa: E402
from owled_ros.data.bags import carla_topics, write_synthetic_drive  # noqa: E402
from owled_ros.msg import PerceptionDescription, PredictedAction, QAAnswer, Question  # noqa: E402
from rosutil import Peer, carla_publishers, include_installed, publish_carla_set  # noqa: E402

OUTPUTS = {"/owled/perception": PerceptionDescription, "/owled/action": PredictedAction,
           "/owled/answers": QAAnswer, "/diagnostics": DiagnosticArray}


@pytest.mark.launch_test
@launch_testing.parametrize("source", ["live", "bag"])
def generate_test_description(source):
    workdir = Path(tempfile.mkdtemp(prefix="owled-drive-launch-"))
    tiny_decoder().save_pretrained(workdir / "model")
    arguments = {"model_dir": str(workdir / "model"), "input": source}
    if source == "bag":
        arguments["bag"] = str(write_synthetic_drive(workdir / "bag", frames=6, size=(64, 96)))
    return LaunchDescription([include_installed("drive.launch.py", **arguments), launch_testing.actions.ReadyToTest()])


def complete_sets(peer):
    return [p for p in peer.received["/owled/perception"] if sorted(p.cameras_used) == sorted(carla_topics())]


class TestDriveLaunch(unittest.TestCase):
    def test_messages_arrive_for_camera_frames(self, source):
        peer = Peer("drive_launch_test")
        try:
            for topic, kind in OUTPUTS.items():
                peer.collect(kind, topic)
            if source == "live":
                cameras = carla_publishers(peer)
                self.assertTrue(all(peer.wait_for_subscribers(c, timeout=120) for c in cameras.values()), "node never subscribed")
                for i in range(20):
                    publish_carla_set(cameras, 1_700_000_000 * 10**9 + i * 10**9, seed=i)
                    peer.spin(1.0, until=lambda: complete_sets(peer))
            peer.spin(120, until=lambda: complete_sets(peer) and peer.received["/owled/action"])
            asker = peer.node.create_publisher(Question, "/owled/questions", 10)
            peer.wait_for_subscribers(asker)
            asker.publish(Question(question_id="q1", category="perception", question="Is there a traffic light?"))
            peer.spin(60, until=lambda: peer.received["/owled/answers"]
                      and any(s.name == "owled_drive" for a in peer.received["/diagnostics"] for s in a.status))
            perception = complete_sets(peer)[0]  # (a first set may go out partial if views were lost in transit)
            self.assertIn(perception.header.stamp.sec, range(1_700_000_000, 1_700_000_020))  # a stamp it was sent
            self.assertEqual(perception.model.model_id, "tiny-decoder")
            self.assertTrue(peer.received["/owled/action"][0].action_label)
            self.assertEqual(peer.received["/owled/answers"][0].question_id, "q1")
            self.assertTrue(any(s.name == "owled_drive" for a in peer.received["/diagnostics"] for s in a.status))
        finally:
            peer.close()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_every_process_exits_cleanly_on_sigint(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
