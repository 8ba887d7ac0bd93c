"""The drive node as a real process over DDS: frames in, stamped perception/action/QA out; bad input; bursts."""
import time

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image

from models import tiny_decoder
from owled_ros.msg import PerceptionDescription, PredictedAction, QAAnswer, Question
from owled_ros.srv import Ask
from rosutil import RELIABLE, Peer, compressed_msg, frame, image_msg, start_node, stop_node

TOPICS = ["/test/front/image", "/test/back/image/compressed", "/test/left/image"]
NAMES = ["CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("drive") / "tiny"
    tiny_decoder().save_pretrained(directory)
    return directory


def params(model_dir, **extra):
    return {"model_dir": str(model_dir), "camera_topics": "[" + ",".join(TOPICS) + "]",
            "camera_names": "[" + ",".join(NAMES) + "]", "camera_transports": "[raw,compressed,raw]",
            "max_new_tokens": 4, "max_rate_hz": 50.0, "view_timeout_s": 0.5} | extra


@pytest.fixture
def peer():
    p = Peer("drive_test")
    for kind, topic in ((PerceptionDescription, "/owled/perception"), (PredictedAction, "/owled/action"),
                        (QAAnswer, "/owled/answers"), (DiagnosticArray, "/diagnostics")):
        p.collect(kind, topic)
    p.pubs = [p.node.create_publisher(Image, TOPICS[0], RELIABLE),
              p.node.create_publisher(type(compressed_msg(frame(0), 0)), TOPICS[1], RELIABLE),
              p.node.create_publisher(Image, TOPICS[2], RELIABLE)]
    yield p
    p.close()


def publish_set(peer, stamp_ns, encodings=("rgb8", "bgra8")):
    peer.pubs[0].publish(image_msg(frame(stamp_ns % 97), stamp_ns, encodings[0], "front"))
    peer.pubs[1].publish(compressed_msg(frame(stamp_ns % 89), stamp_ns))
    peer.pubs[2].publish(image_msg(frame(stamp_ns % 83), stamp_ns, encodings[1]))


def latest_stats(peer):
    arrays = peer.received["/diagnostics"]
    statuses = [s for a in arrays for s in a.status if s.name == "owled_drive"]
    return {kv.key: kv.value for kv in statuses[-1].values} if statuses else {}


def test_frames_in_messages_out_with_stamps_and_questions(model_dir, peer, tmp_path):
    node = start_node("owled_ros.nodes.drive_node", params(model_dir), tmp_path / "node.log")
    try:
        assert peer.wait_for_subscribers(peer.pubs[0]), (tmp_path / "node.log").read_text()
        stamp_ns = 1_700_000_000_250_000_000
        publish_set(peer, stamp_ns)
        peer.spin(60, until=lambda: peer.received["/owled/perception"] and peer.received["/owled/action"])
        perception, action = peer.received["/owled/perception"][0], peer.received["/owled/action"][0]
        for message in (perception, action):
            assert (message.header.stamp.sec, message.header.stamp.nanosec) == (1_700_000_000, 250_000_000)
            assert message.model.model_id == "tiny-decoder" and message.model.method == "dense"
            assert message.latency_s > 0
        assert perception.description and action.rationale and action.action_label
        assert sorted(perception.cameras_used) == sorted(NAMES) and not perception.cameras_missing
        assert perception.header.frame_id == "front"

        asker = peer.node.create_publisher(Question, "/owled/questions", 10)
        peer.wait_for_subscribers(asker)
        asker.publish(Question(question_id="q1", category="planning", question="What should the ego vehicle do?"))
        peer.spin(30, until=lambda: peer.received["/owled/answers"])
        answer = peer.received["/owled/answers"][0]
        assert answer.question_id == "q1" and answer.answer and answer.header.stamp.nanosec == 250_000_000

        client = peer.node.create_client(Ask, "/owled/ask")
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Ask.Request(question_id="q2", question="Is the vehicle ahead moving?"))
        peer.spin(30, until=future.done)
        assert future.result().success and future.result().answer.question_id == "q2"

        publish_set(peer, stamp_ns + 10**9)  # a set with one view missing goes out after view_timeout_s
        peer.pubs[0].publish(image_msg(frame(5), stamp_ns + 2 * 10**9))
        peer.spin(30, until=lambda: any(p.cameras_missing for p in peer.received["/owled/perception"]))
        partial = [p for p in peer.received["/owled/perception"] if p.cameras_missing]
        assert partial and partial[0].cameras_missing == ["CAM_BACK", "CAM_FRONT_LEFT"]
    finally:
        assert stop_node(node) == 0, (tmp_path / "node.log").read_text()


def test_bad_images_are_counted_and_the_node_survives(model_dir, peer, tmp_path):
    node = start_node("owled_ros.nodes.drive_node", params(model_dir), tmp_path / "node.log")
    try:
        assert peer.wait_for_subscribers(peer.pubs[0])
        good = image_msg(frame(1), 5_000_000_000)
        bad = []
        for change in ({"encoding": "yuv422"}, {"step": 10}, {"data": bytes(good.data)[:100]},
                       {"height": 0}, {"encoding": "16UC1"}):
            msg = image_msg(frame(1), 5_000_000_000)
            for key, value in change.items():
                setattr(msg, key, value)
            bad.append(msg)
        for msg in bad:
            peer.pubs[0].publish(msg)
        corrupt = compressed_msg(frame(2), 5_000_000_000)
        corrupt.data = bytes(corrupt.data)[:40] + b"\x00" * 100
        peer.pubs[1].publish(corrupt)
        peer.spin(20, until=lambda: latest_stats(peer).get("bad_images") == "6")
        stats = latest_stats(peer)
        assert stats["bad_images"] == "6"
        assert stats["bad_images.unsupported_encoding"] == "2" and stats["bad_images.truncated"] == "1"
        assert stats["bad_images.corrupt_compressed"] == "1"
        assert node.poll() is None
        publish_set(peer, 6_000_000_000)
        peer.spin(60, until=lambda: peer.received["/owled/perception"])
        assert peer.received["/owled/perception"][0].header.stamp.sec == 6
    finally:
        assert stop_node(node) == 0


def test_a_burst_faster_than_inference_drops_frames_instead_of_queueing(model_dir, peer, tmp_path):
    node = start_node("owled_ros.nodes.drive_node", params(model_dir, max_rate_hz=2.0, camera_reliability="reliable"),
                      tmp_path / "node.log")  # every set arrives, so any loss is the node dropping
    try:
        assert peer.wait_for_subscribers(peer.pubs[0])
        sent = [10**9 * (100 + i) for i in range(30)]
        for stamp_ns in sent:
            publish_set(peer, stamp_ns)
            peer.spin(0.02)
        burst_end = time.monotonic()
        peer.spin(20, until=lambda: any(p.header.stamp.sec == 129 for p in peer.received["/owled/perception"]))
        processed = [p.header.stamp.sec for p in peer.received["/owled/perception"]]
        assert processed[-1] == 129  # the newest set is processed soon after the burst
        assert time.monotonic() - burst_end < 5
        assert len(processed) < len(sent) / 2
        peer.spin(5, until=lambda: int(latest_stats(peer).get("dropped_frame_sets", 0)) > 0)
        stats = latest_stats(peer)
        assert int(stats["dropped_frame_sets"]) > 0
        assert int(stats["processed_frame_sets"]) + int(stats["dropped_frame_sets"]) <= len(sent)
        assert float(stats["latency_p95_s"]) < 2.0
    finally:
        assert stop_node(node) == 0
