"""Bags (import, replay), the recorder node (policies, signals), and the S3 fleet store against a local server."""
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image

from models import tiny_decoder
from owled_ros.data.bags import carla_topics, import_bag, write_synthetic_drive
from owled_ros.data.calib import read_samples, write_synthetic
from owled_ros.data.frames import FrameSet
from owled_ros.data.recorder import KeepPolicy, ShardRecorder
from owled_ros.data.world import CAMERAS, render, sample_scene
from owled_ros.pruning.run import prune
from rosutil import RELIABLE, Peer, frame, image_msg, start_node, stop_node


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_import_gives_the_recorded_frames(tmp_path, storage):
    bag = write_synthetic_drive(tmp_path / "bag", frames=5, seed=3, storage=storage, size=(96, 160))
    written, bad = import_bag(bag, tmp_path / "calib", vehicle="car7")
    assert (written, bad) == (5, 0)
    samples = read_samples(tmp_path / "calib")
    assert [s.stamp_ns for s in samples] == [1_700_000_000 * 10**9 + i * 500_000_000 for i in range(5)]
    expected = render(sample_scene(3 * 1_000_003 + 2), CAMERAS, 96, 160)
    images = samples[2].images()
    assert set(images) == set(CAMERAS) and samples[2].vehicle == "car7"
    for camera in CAMERAS:
        assert np.abs(images[camera].astype(int) - expected[camera]).mean() < 3  # JPEG round trip of bgra8 frames
    assert all(q["question"] for q in samples[0].qa)


def test_bag_import_names_a_missing_topic(tmp_path):
    bag = write_synthetic_drive(tmp_path / "bag", frames=1, cameras=("CAM_FRONT",), size=(64, 96))
    with pytest.raises(ValueError, match="rgb_back"):
        import_bag(bag, tmp_path / "calib", {"CAM_BACK": carla_topics()["CAM_BACK"]})


def test_replay_waits_for_every_topic_then_delivers_every_message_in_order(tmp_path):
    frames = 6
    bag = write_synthetic_drive(tmp_path / "bag", frames=frames, rate_hz=10, size=(64, 96))
    peer = Peer("replay_test")
    *early, late = carla_topics().values()
    try:
        for topic in early:
            peer.collect(Image, topic, RELIABLE)
        peer.collect(Clock, "/clock", RELIABLE)
        player = subprocess.Popen([sys.executable, "-m", "owled_ros.cli", "replay", str(bag), "--rate", "2",
                                   "--wait-subscribers", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peer.spin(5)  # one camera not yet subscribed: nothing may be published (it would make partial frame sets)
        assert not any(peer.received.values())
        peer.collect(Image, late, RELIABLE)
        peer.spin(60, until=lambda: all(len(v) == frames for t, v in peer.received.items() if t != "/clock"))
        output, _ = player.communicate(timeout=30)
        assert player.returncode == 0, output
    finally:
        peer.close()
    clock = [m.clock.sec * 10**9 + m.clock.nanosec for m in peer.received.pop("/clock")]
    assert sorted(set(clock)) == [1_700_000_000 * 10**9 + i * 100_000_000 for i in range(frames)]  # the bag's time
    for topic, messages in peer.received.items():
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in messages]
        assert stamps == [1_700_000_000 * 10**9 + i * 100_000_000 for i in range(frames)], topic
        assert messages[0].encoding == "bgra8"
    assert f"replayed {frames * 6} messages" in output


def frame_set(stamp_s, seed):
    return FrameSet(int(stamp_s * 1e9), {"CAM_FRONT": frame(seed), "CAM_BACK": frame(seed + 1)})


def test_keep_policy_skips_by_interval_and_near_duplicates():
    policy = KeepPolicy(min_interval_s=0.5, min_difference=2.0)
    first = frame_set(0.0, 1)
    assert policy.check(first) is None
    assert policy.check(frame_set(0.2, 2)) == "interval"
    assert policy.check(FrameSet(int(1e9), {c: np.clip(i.astype(int) + 1, 0, 255).astype(np.uint8)
                                            for c, i in first.images.items()})) == "duplicate"
    assert policy.check(frame_set(1.5, 3)) is None


def test_shard_recorder_respects_quota_and_max_frames(tmp_path):
    recorder = ShardRecorder(tmp_path / "a", "car1", shard_size=2, max_frames=5)
    assert [recorder.write(frame_set(i, i)) for i in range(7)] == [True] * 5 + [False] * 2
    recorder.close_shard()
    assert len(read_samples(tmp_path / "a")) == 5 and recorder.shards == 3
    quota = ShardRecorder(tmp_path / "b", "car1", shard_size=10, quota_bytes=30_000)
    kept = sum(quota.write(frame_set(i, i)) for i in range(20))
    quota.close_shard()
    assert 0 < kept < 20 and len(read_samples(tmp_path / "b")) == kept


def recorder_params(out, topics):
    return {"output_dir": str(out), "vehicle_id": "car9", "min_interval_s": 0.0, "min_difference": 0.0,
            "shard_size": 3, "camera_topics": "[" + ",".join(topics) + "]", "camera_names": "[CAM_FRONT,CAM_BACK]",
            "camera_transports": "[raw,raw]"}


@pytest.mark.parametrize("sig,kept", [(signal.SIGKILL, 6), (signal.SIGTERM, 8), (signal.SIGINT, 8)])
def test_recorder_keeps_completed_shards_across_signals(tmp_path, sig, kept):
    topics = ["/rec/front", "/rec/back"]
    node = start_node("owled_ros.nodes.recorder_node", recorder_params(tmp_path / "calib", topics), tmp_path / "log")
    peer = Peer("recorder_test")
    peer.collect(DiagnosticArray, "/diagnostics")
    publishers = [peer.node.create_publisher(Image, t, RELIABLE) for t in topics]
    try:
        assert all(peer.wait_for_subscribers(p) for p in publishers), (tmp_path / "log").read_text()
        peer.spin(1.0)  # let both sides finish matching before the first best-effort frame
        bad = image_msg(frame(0), 10**9)
        bad.encoding = "yuv422"
        publishers[0].publish(bad)
        for i in range(8):
            for j, publisher in enumerate(publishers):
                publisher.publish(image_msg(frame(10 * i + j), (i + 1) * 10**9))
            peer.spin(0.2)  # camera pace; a best-effort subscriber may lose bursts

        def frames_written():
            values = [{kv.key: kv.value for kv in s.values} for a in peer.received["/diagnostics"] for s in a.status
                      if s.name == "owled_recorder"]
            return values[-1] if values else {}
        peer.spin(20, until=lambda: frames_written().get("frames") == "8")
        assert frames_written()["frames"] == "8" and frames_written()["bad_images"] == "1"
        stop_node(node, sig)
    finally:
        peer.close()
        stop_node(node, signal.SIGKILL)
    samples = read_samples(tmp_path / "calib")
    assert len(samples) == kept
    assert sorted(s.stamp_ns for s in samples) == [(i + 1) * 10**9 for i in range(kept)]
    assert all(s.vehicle == "car9" and set(s.images()) == {"CAM_FRONT", "CAM_BACK"} for s in samples)
    leftovers = list((tmp_path / "calib").glob(".tmp-*"))
    assert len(leftovers) == (1 if sig == signal.SIGKILL else 0)
    if sig == signal.SIGKILL:  # the next start completes the shard it was writing: no acknowledged set is lost
        again = start_node("owled_ros.nodes.recorder_node", recorder_params(tmp_path / "calib", topics), tmp_path / "log2")
        try:
            for _ in range(300):
                if "left unfinished by an earlier run: 2 frame sets kept" in (tmp_path / "log2").read_text():
                    break
                time.sleep(0.1)
        finally:
            stop_node(again)
        assert sorted(s.stamp_ns for s in read_samples(tmp_path / "calib")) == [(i + 1) * 10**9 for i in range(8)]
        assert not list((tmp_path / "calib").glob(".tmp-*"))


def test_recovery_keeps_the_frame_sets_written_in_full_and_drops_the_one_being_written(tmp_path):
    from owled_ros.data.calib import MANIFEST, ShardWriter, recover_shards

    writer = ShardWriter(tmp_path / "calib", "car1-0000")
    for i in range(3):
        writer.add(f"car1-{i}", {"CAM_FRONT": frame(i)}, stamp_ns=i)
    with open(writer.tmp / MANIFEST, "a") as manifest:  # killed while writing the fourth line
        manifest.write('{"id": "car1-3", "cameras": {"CAM_FR')
    assert read_samples_or_none(tmp_path / "calib") is None  # invisible until recovered
    assert recover_shards(tmp_path / "calib") == {"car1-0000": 3}
    assert [s.stamp_ns for s in read_samples(tmp_path / "calib")] == [0, 1, 2]
    damaged = ShardWriter(tmp_path / "calib", "car1-0001")
    for i in range(3):
        damaged.add(f"car1-1{i}", {"CAM_FRONT": frame(10 + i)}, stamp_ns=10 + i)
    (damaged.tmp / "frames" / "car1-11_CAM_FRONT.jpg").write_bytes(b"torn")  # its frame never reached the disk
    assert recover_shards(tmp_path / "calib") == {"car1-0001": 1}  # the torn set and what follows it go
    assert [s.stamp_ns for s in read_samples(tmp_path / "calib")] == [0, 1, 2, 10]


def read_samples_or_none(root):
    try:
        return read_samples(root)
    except ValueError:
        return None


def test_two_vehicles_share_a_prefix_without_overwriting(tmp_path, s3_server):
    from owled_ros.data.store import StoreError, pull, push

    write_synthetic(tmp_path / "car1", 5, seed=1, vehicle="car1", height=64, width=96)
    write_synthetic(tmp_path / "car2", 4, seed=1, vehicle="car2", height=64, width=96)
    assert len(push(tmp_path / "car1", "s3://fleet/drives")) == 1
    assert len(push(tmp_path / "car2", "s3://fleet/drives")) == 1
    assert push(tmp_path / "car1", "s3://fleet/drives") == []  # same content: nothing to do
    local = pull("s3://fleet/drives", tmp_path / "pulled")
    samples = read_samples(local)
    assert sorted(s.vehicle for s in samples) == ["car1"] * 5 + ["car2"] * 4
    assert np.array_equal(samples[0].images()["CAM_FRONT"], read_samples(tmp_path / "car1")[0].images()["CAM_FRONT"])
    write_synthetic(tmp_path / "impostor", 3, seed=1, vehicle="car1", height=64, width=96)  # same shard name
    with pytest.raises(StoreError, match="refusing to overwrite"):
        push(tmp_path / "impostor", "s3://fleet/drives")
    with pytest.raises(StoreError, match="no calibration shards"):
        pull("s3://fleet/empty", tmp_path / "nothing")

    tiny_decoder().save_pretrained(tmp_path / "model")
    report = prune(tmp_path / "model", tmp_path / "pruned", "owled", "0.5", "s3://fleet/drives", nsamples=8,
                   progress=False)
    assert report["calibration"]["source"] == "s3://fleet/drives" and report["calibration"]["frame_sets"] == 9


def test_a_full_disk_stops_recording_and_keeps_completed_shards(tmp_path, monkeypatch):
    import errno

    from owled_ros.data import calib

    recorder = ShardRecorder(tmp_path / "calib", "car1", shard_size=2)
    assert all(recorder.write(frame_set(i, i)) for i in range(3))  # one complete shard, one open
    real_write = calib._fsync_write

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(calib, "_fsync_write", full)
    assert recorder.write(frame_set(3, 3)) is False
    assert "No space left on device" in recorder.failed and recorder.writer is None
    monkeypatch.setattr(calib, "_fsync_write", real_write)
    assert recorder.write(frame_set(4, 4)) is False  # stays stopped; nothing more is written
    samples = read_samples(tmp_path / "calib")
    assert sorted(s.stamp_ns for s in samples) == [0, 10**9, 2 * 10**9]  # the open shard's frame was kept too
    assert not list((tmp_path / "calib").glob(".tmp-*"))


@pytest.mark.parametrize("change,message", [({"output_dir": "FILE/calib"}, "not writable"),
                                            ({"vehicle_id": "../../X"}, "not a safe name"),
                                            ({"min_free_mb": "1e12"}, "less than min_free_mb")])
def test_recorder_with_a_bad_output_dir_or_vehicle_id_stops_at_start_up(tmp_path, change, message):
    (tmp_path / "file").write_text("not a directory")
    params = recorder_params(tmp_path / "calib", ["/rec/a", "/rec/b"])
    params |= {k: v.replace("FILE", str(tmp_path / "file")) for k, v in change.items()}
    node = start_node("owled_ros.nodes.recorder_node", params, tmp_path / "log")
    assert node.wait(timeout=60) == 2
    errors = [line for line in (tmp_path / "log").read_text().splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], (tmp_path / "log").read_text()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [tmp_path / "file", tmp_path / "log"]


def test_a_scene_comes_back_from_its_stored_truth_with_the_same_qa():
    import json

    from owled_ros.data.world import qa, sample_scene, scene_from_truth

    for seed in range(60):
        scene = sample_scene(seed)
        again = scene_from_truth(json.loads(json.dumps(scene.truth())), seed=seed)  # as read from a manifest
        assert qa(again) == qa(scene)
        stored, back = scene.truth(), again.truth()
        assert all(stored[k] == back[k] for k in ("n_cars", "n_pedestrians", "light", "light_distance", "action", "agents"))


def test_a_two_pixel_lamp_keeps_its_colour_through_the_stored_jpeg():
    from owled_ros.data.calib import decode_image, encode_jpeg

    sky = np.full((128, 224, 3), (170, 175, 170), np.uint8)
    sky[40:42, 101:102] = (230, 40, 30)  # a red lamp 30 m ahead: two pixels
    back = decode_image(encode_jpeg(sky), "lamp.jpg").astype(int)
    lamp = back[40:42, 101]
    assert (lamp[:, 0] - lamp[:, 1] >= 120).all()  # 4:2:0 chroma averaged it with the sky: about 60
