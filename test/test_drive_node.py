"""The drive node as a real process over DDS: frames in, stamped perception/action/QA out; bad input; bursts."""
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
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
    # torch eager: converting for OpenVINO adds seconds to each start; test_runtime.py starts the node on it
    return {"model_dir": str(model_dir), "backend": "torch", "camera_topics": "[" + ",".join(TOPICS) + "]",
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
    from visualization_msgs.msg import Marker, MarkerArray

    peer.collect(Image, "/owled/annotated")
    peer.collect(MarkerArray, "/owled/markers")
    node = start_node("owled_ros.nodes.drive_node", params(model_dir, annotate="true"), tmp_path / "node.log")
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
        assert 0 < action.confidence <= 1 and 0 < perception.confidence <= 1  # answers' mean token probability
        assert sorted(perception.cameras_used) == sorted(NAMES) and not perception.cameras_missing
        assert perception.header.frame_id == action.header.frame_id == "base_link"  # the vehicle, not a camera
        # annotate: the front view with the answers drawn on a band at the top, and markers for RViz
        peer.spin(10, until=lambda: peer.received["/owled/annotated"] and peer.received["/owled/markers"])
        view = peer.received["/owled/annotated"][0]
        drawn = np.frombuffer(bytes(view.data), np.uint8).reshape(view.height, view.width, 3)
        sent = frame(stamp_ns % 97)
        assert drawn.shape == sent.shape and view.encoding == "rgb8" and view.header.frame_id == "front"
        assert not np.array_equal(drawn[:20], sent[:20]) and np.array_equal(drawn[-10:], sent[-10:])
        texts = [m.text for m in peer.received["/owled/markers"][0].markers]
        assert texts[0].startswith(f"action: {action.action_label}") and texts[1].startswith("light: ")
        assert all(m.header.frame_id == "base_link" and m.type == Marker.TEXT_VIEW_FACING
                   for m in peer.received["/owled/markers"][0].markers)
        peer.spin(5, until=lambda: "p50_s.decode_s" in latest_stats(peer))
        stats = {k: float(v) for k, v in latest_stats(peer).items() if k.startswith(("p50_s.", "latency_"))}
        stages = ["convert_s", "queue_s", "encode_s", "prefill_s", "decode_s", "decode_per_step_s", "tokens_per_step",
                  "publish_s"]
        assert all(stats[f"p50_s.{stage}"] > 0 for stage in stages), stats
        # one frame set: its model stages add up to no more than its model latency
        model_stages = sum(stats[f"p50_s.{stage}"] for stage in ("encode_s", "prefill_s", "decode_s"))
        assert model_stages <= stats["latency_p50_s"] <= model_stages + 0.5, stats
        assert stats["p50_s.transport_s"] > 3600  # the test's stamps are from 2023: stamp -> callback, as promised

        asker = peer.node.create_publisher(Question, "/owled/questions", 10)
        peer.wait_for_subscribers(asker)
        asker.publish(Question(question_id="q1", category="planning", question="What should the ego vehicle do?"))
        peer.spin(30, until=lambda: peer.received["/owled/answers"])
        answer = peer.received["/owled/answers"][0]
        assert answer.question_id == "q1" and answer.answer and answer.header.stamp.nanosec == 250_000_000
        assert 0 < answer.confidence <= 1
        # asked again about the same frame set: decoded with guesses from the action answer, the same answer
        assert answer.answer == action.rationale

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
        # those two cameras stay silent: reported once, and the front views go on as sets of their own (that
        # they go out without waiting view_timeout_s each: test_hostile.py, with a clock of its own)
        for k in (3, 4, 5):
            peer.pubs[0].publish(image_msg(frame(k), stamp_ns + k * 10**9))
            assert peer.spin(30, until=lambda k=k: any(p.header.stamp.sec == stamp_ns // 10**9 + k
                                                       for p in peer.received["/owled/perception"]))
        peer.spin(3.0, until=lambda: latest_stats(peer).get("missing_cameras") == "CAM_BACK,CAM_FRONT_LEFT")
        assert latest_stats(peer)["missing_cameras"] == "CAM_BACK,CAM_FRONT_LEFT"
        log = (tmp_path / "node.log").read_text()
        assert log.count("camera CAM_BACK sent nothing") == 1, log
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
        assert time.monotonic() - burst_end < 12  # queueing all 30 at max_rate_hz 2 would take 15 s
        assert len(processed) < len(sent) / 2
        peer.spin(5, until=lambda: int(latest_stats(peer).get("dropped_frame_sets", 0)) > 0)
        stats = latest_stats(peer)
        assert int(stats["dropped_frame_sets"]) > 0
        assert int(stats["processed_frame_sets"]) + int(stats["dropped_frame_sets"]) <= len(sent)
    finally:
        assert stop_node(node) == 0


def test_huge_images_are_refused_unread_and_counted(model_dir, peer, tmp_path):
    import cv2
    import numpy as np

    node = start_node("owled_ros.nodes.drive_node", params(model_dir), tmp_path / "node.log")
    try:
        assert peer.wait_for_subscribers(peer.pubs[0])
        bomb = compressed_msg(frame(2), 7_000_000_000)
        bomb.data = cv2.imencode(".png", np.zeros((5000, 5000), np.uint8))[1].tobytes()  # 25 kB -> 25 MP
        peer.pubs[1].publish(bomb)
        claims = image_msg(frame(1), 7_000_000_000)
        claims.height, claims.width, claims.step = 100_000, 100_000, 300_000  # a raw header claiming 10^10 pixels
        peer.pubs[0].publish(claims)
        peer.spin(20, until=lambda: latest_stats(peer).get("bad_images.too_large") == "2")
        assert latest_stats(peer)["bad_images.too_large"] == "2" and node.poll() is None
        publish_set(peer, 8_000_000_000)
        peer.spin(60, until=lambda: peer.received["/owled/perception"])
        assert peer.received["/owled/perception"][0].header.stamp.sec == 8
    finally:
        assert stop_node(node) == 0


def test_long_questions_are_refused_and_flooded_ones_counted(model_dir, peer, tmp_path):
    node = start_node("owled_ros.nodes.drive_node", params(model_dir, question_queue=2, max_question_chars=200),
                      tmp_path / "node.log")
    try:
        asker = peer.node.create_publisher(Question, "/owled/questions", 10)
        assert peer.wait_for_subscribers(asker) and peer.wait_for_subscribers(peer.pubs[0])
        asker.publish(Question(question_id="long", question="Why? " * 2400))  # 12 kB
        for i in range(6):  # no frame set yet: they wait in a queue of 2
            asker.publish(Question(question_id=f"q{i}", question="What should the ego vehicle do?"))
        peer.spin(20, until=lambda: latest_stats(peer).get("dropped_questions") == "4")
        stats = latest_stats(peer)
        assert stats["refused_questions"] == "1" and stats["dropped_questions"] == "4"
        publish_set(peer, 9_000_000_000)
        peer.spin(60, until=lambda: len(peer.received["/owled/answers"]) == 2)
        assert [a.question_id for a in peer.received["/owled/answers"]] == ["q4", "q5"]
        client = peer.node.create_client(Ask, "/owled/ask")
        assert client.wait_for_service(timeout_sec=10)
        future = client.call_async(Ask.Request(question_id="long", question="x" * 201))
        peer.spin(30, until=future.done)
        assert not future.result().success and "max_question_chars" in future.result().message
    finally:
        assert stop_node(node) == 0


def test_two_drive_nodes_in_namespaces_share_the_cameras_and_keep_their_own_topics(model_dir, peer, tmp_path):
    for car in ("car1", "car2"):
        peer.collect(PredictedAction, f"/{car}/owled/action")
        peer.collect(QAAnswer, f"/{car}/owled/answers")
    nodes = [start_node("owled_ros.nodes.drive_node", params(model_dir), tmp_path / f"{car}.log", namespace=f"/{car}")
             for car in ("car1", "car2")]
    try:
        assert peer.wait_for_subscribers(peer.pubs[0], count=2), (tmp_path / "car1.log").read_text()
        for second in range(1, 30):
            publish_set(peer, second * 10**9)
            if peer.spin(1.0, until=lambda: all(peer.received[f"/{c}/owled/action"] for c in ("car1", "car2"))):
                break
        assert all(peer.received[f"/{c}/owled/action"] for c in ("car1", "car2"))
        asker = peer.node.create_publisher(Question, "/car1/owled/questions", 10)
        assert peer.wait_for_subscribers(asker)
        asker.publish(Question(question_id="q-car1", category="planning", question="What should the ego vehicle do?"))
        assert peer.spin(30, until=lambda: peer.received["/car1/owled/answers"])
        peer.spin(2.0)
        assert [a.question_id for a in peer.received["/car1/owled/answers"]] == ["q-car1"]
        assert not peer.received["/car2/owled/answers"] and not peer.received["/owled/action"]  # nothing outside
        client = peer.node.create_client(Ask, "/car2/owled/ask")
        assert client.wait_for_service(timeout_sec=10)
    finally:
        assert [stop_node(node) for node in nodes] == [0, 0]


def test_managed_node_loads_on_configure_serves_while_active_and_frees_on_cleanup(model_dir, peer, tmp_path):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    node = start_node("owled_ros.nodes.drive_node", params(model_dir, autostart="false"), tmp_path / "node.log")
    change = peer.node.create_client(ChangeState, "/owled_drive/change_state")
    get = peer.node.create_client(GetState, "/owled_drive/get_state")

    def call(client, request):
        future = client.call_async(request)
        assert peer.spin(120, until=future.done), (tmp_path / "node.log").read_text()
        return future.result()

    def transition(transition_id):
        assert call(change, ChangeState.Request(transition=Transition(id=transition_id))).success
        return call(get, GetState.Request()).current_state.label

    def answered(second):
        publish_set(peer, second * 10**9)
        return peer.spin(10, until=lambda: any(a.header.stamp.sec == second for a in peer.received["/owled/action"]))

    try:
        assert change.wait_for_service(timeout_sec=60) and get.wait_for_service(timeout_sec=10)
        assert call(get, GetState.Request()).current_state.label == "unconfigured"
        assert "loaded in" not in (tmp_path / "node.log").read_text() and peer.pubs[0].get_subscription_count() == 0
        assert transition(Transition.TRANSITION_CONFIGURE) == "inactive"
        log = (tmp_path / "node.log").read_text()
        assert "model tiny-decoder (dense, sparsity 0.000) loaded in" in log and "warmed up in" in log
        assert peer.pubs[0].get_subscription_count() == 0  # not subscribed before activate
        assert transition(Transition.TRANSITION_ACTIVATE) == "active"
        assert peer.wait_for_subscribers(peer.pubs[0]) and any(answered(s) for s in range(1, 20))
        assert transition(Transition.TRANSITION_DEACTIVATE) == "inactive"
        assert peer.spin(10, until=lambda: peer.pubs[0].get_subscription_count() == 0)  # cameras let go
        assert transition(Transition.TRANSITION_ACTIVATE) == "active"  # no reload: the model stayed
        assert peer.wait_for_subscribers(peer.pubs[0]) and any(answered(s) for s in range(20, 40))
        assert (tmp_path / "node.log").read_text().count("loaded in") == 1
        assert transition(Transition.TRANSITION_DEACTIVATE) == "inactive"
        assert transition(Transition.TRANSITION_CLEANUP) == "unconfigured"
        assert peer.spin(5, until=lambda: latest_stats(peer) == {"state": "unconfigured"})  # the model is gone
    finally:
        assert stop_node(node) == 0, (tmp_path / "node.log").read_text()


@pytest.mark.parametrize("extra, words", [({"camera_names": "[CAM_FRONT,CAM_ROOF,CAM_FRONT_LEFT]"}, ["CAM_ROOF", "camera_names"]),
                                          ({"dtype": "float16"}, ["dtype", "float16", "bfloat16"]),
                                          ({"draft_tokens": -2}, ["draft_tokens", "-2"]),
                                          ({"inference_threads": -1}, ["inference_threads", "-1"]),
                                          ({"backend": "tensorrt"}, ["backend", "tensorrt", "openvino"])])
def test_unknown_cameras_or_a_bad_parameter_stop_the_node_at_start_up(model_dir, tmp_path, extra, words):
    node = start_node("owled_ros.nodes.drive_node", params(model_dir, **extra), tmp_path / "node.log")
    assert node.wait(timeout=60) == 2
    errors = [line for line in (tmp_path / "node.log").read_text().splitlines() if "error" in line]
    assert len(errors) == 1 and all(word in errors[0] for word in words), errors


def test_diagnostics_are_stale_without_frames_and_warn_over_the_latency_budget(model_dir, peer, tmp_path):
    node = start_node("owled_ros.nodes.drive_node", params(model_dir, stale_after_s=1.0, latency_budget_s=1e-6),
                      tmp_path / "node.log")
    statuses = lambda: [s for a in peer.received["/diagnostics"] for s in a.status if s.name == "owled_drive"]
    try:
        assert peer.wait_for_subscribers(peer.pubs[0]), (tmp_path / "node.log").read_text()
        assert peer.spin(30, until=lambda: any(s.level == DiagnosticStatus.STALE for s in statuses()))
        assert "no frame set for" in [s for s in statuses() if s.level == DiagnosticStatus.STALE][-1].message
        for second in range(7, 100):  # frame sets keep coming: no longer stale, but the model is over its budget
            publish_set(peer, second * 10**9)
            if peer.spin(0.3, until=lambda: statuses()[-1].level == DiagnosticStatus.WARN):
                break
        assert "over the 1e-06 s budget" in statuses()[-1].message
    finally:
        assert stop_node(node) == 0, (tmp_path / "node.log").read_text()


def test_with_sim_time_stamps_and_latencies_follow_clock(model_dir, peer, tmp_path):
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock

    clock = peer.node.create_publisher(Clock, "/clock", 10)
    node = start_node("owled_ros.nodes.drive_node", params(model_dir, use_sim_time="true"), tmp_path / "node.log")
    try:
        assert peer.wait_for_subscribers(clock), (tmp_path / "node.log").read_text()
        for _ in range(100):  # the simulation stands still at 1000 s: latencies on its clock are 0
            clock.publish(Clock(clock=Time(sec=1000)))
            publish_set(peer, 999_500_000_000)
            if peer.spin(0.3, until=lambda: peer.received["/owled/action"] and "p50_s.transport_s" in latest_stats(peer)):
                break
        action = peer.received["/owled/action"][0]
        assert action.latency_s == 0.0 and action.header.stamp.sec == 999
        stats = latest_stats(peer)
        assert float(stats["p50_s.transport_s"]) == pytest.approx(0.5)  # camera stamp 999.5 s -> /clock 1000 s
        stamps = [a.header.stamp.sec for a in peer.received["/diagnostics"] if any(s.name == "owled_drive" for s in a.status)]
        assert stamps[-1] == 1000
    finally:
        assert stop_node(node) == 0, (tmp_path / "node.log").read_text()


def test_a_failing_worker_reports_the_error_and_keeps_serving(model_dir, peer, tmp_path):
    # a model on the meta device has no data: every inference raises, as any runtime failure would
    node = start_node("owled_ros.nodes.drive_node", params(model_dir, device="meta"), tmp_path / "node.log")
    try:
        assert peer.wait_for_subscribers(peer.pubs[0])
        for second in (11, 12):
            publish_set(peer, second * 10**9)
            peer.spin(20, until=lambda s=second: latest_stats(peer).get("worker_errors") == str(s - 10))
        assert latest_stats(peer)["worker_errors"] == "2" and node.poll() is None  # the second set was tried too
        status = [s for a in peer.received["/diagnostics"] for s in a.status if s.name == "owled_drive"][-1]
        assert status.level == DiagnosticStatus.ERROR and status.message == latest_stats(peer)["last_error"] != ""
    finally:
        assert stop_node(node) == 0
