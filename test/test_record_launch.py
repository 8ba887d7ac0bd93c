"""launch_testing test of record.launch.py as installed: camera frames (published here, or a bag the launch
file replays) become a calibration set on disk; SIGINT closes the open shard and every process exits cleanly."""
import os
import re
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

from owled_ros.data.bags import carla_topics, write_synthetic_drive  # noqa: E402
from owled_ros.data.calib import read_samples  # noqa: E402
from rosutil import Peer, carla_publishers, include_installed, publish_carla_set  # noqa: E402

FRAME_SETS = 6


@pytest.mark.launch_test
@launch_testing.parametrize("source", ["live", "bag"])
def generate_test_description(source):
    workdir = Path(tempfile.mkdtemp(prefix="owled-record-launch-"))
    output = workdir / "calibration"
    arguments = {"output_dir": str(output), "vehicle_id": "launchtest", "input": source}
    if source == "bag":  # frames 0.5 s apart, as the recorder's min_interval_s keeps them all
        arguments["bag"] = str(write_synthetic_drive(workdir / "bag", frames=FRAME_SETS, size=(64, 96)))
    return (LaunchDescription([include_installed("record.launch.py", **arguments), launch_testing.actions.ReadyToTest()]),
            {"output": output})


def recorded_frames(peer):
    statuses = [s for a in peer.received["/diagnostics"] for s in a.status if s.name == "owled_recorder"]
    return int({kv.key: kv.value for kv in statuses[-1].values}["frames"]) if statuses else 0


class TestRecordLaunch(unittest.TestCase):
    def test_frame_sets_are_recorded(self, source):
        peer = Peer("record_launch_test")
        try:
            peer.collect(DiagnosticArray, "/diagnostics")
            if source == "live":
                cameras = carla_publishers(peer)
                self.assertTrue(all(peer.wait_for_subscribers(c, timeout=60) for c in cameras.values()), "node never subscribed")
                for i in range(FRAME_SETS):
                    publish_carla_set(cameras, 1_700_000_000 * 10**9 + i * 10**9, seed=i)
                    peer.spin(1.0)
            peer.spin(60, until=lambda: recorded_frames(peer) > 0)
            self.assertGreater(recorded_frames(peer), 0)
        finally:
            peer.close()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_every_process_exits_cleanly_on_sigint(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)

    def test_the_open_shard_is_closed_with_every_frame_set(self, output, proc_output):
        samples = read_samples(output)
        final = [re.search(r" frames=(\d+) shards=", o.text.decode()) for o in proc_output]
        self.assertEqual(len(samples), int([m for m in final if m][-1].group(1)))  # as many as it said it kept
        self.assertTrue(all(s.shard.name.startswith("launchtest") for s in samples))
        for sample in samples:
            self.assertEqual(sorted(sample.images()), sorted(carla_topics()))
