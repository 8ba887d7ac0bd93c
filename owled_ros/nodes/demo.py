"""`owled demo`: a calibration drive through MetaDrive scenes (shipped frame sets, as a rosbag2) -> recorder node ->
OWLed pruning -> drive node on the pruned model through other, held-out scenes, its answers printed beside
their ground truth and scored."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray

from owled_ros.data.bags import carla_topics, write_drive
from owled_ros.data.calib import read_samples
from owled_ros.data.metadrive_world import DEMO_CALIB, DEMO_FRAMES
from owled_ros.eval.parse import VEHICLE, parse_action, parse_count, parse_light
from owled_ros.model.build import resolve_model
from owled_ros.msg import PerceptionDescription, PredictedAction, QAAnswer, Question
from owled_ros.pruning.run import prune

QUESTION = "Will a pedestrian cross in front of the ego vehicle?"
START_NS = 1_700_000_000 * 10**9
CALIBRATION_INTERVAL_NS = 500_000_000
# The judged scenes are 12 places, not one street: each is shown for 2 s, time for a 2-core CPU to answer it
# (the pruned default on openvino-int8 takes 0.6-1.5 s a frame set on an AVX2-only one), as a vehicle stays in
# a scene for seconds. The node drops the sets it has no time for either way (counted in the score line).
SCENE_INTERVAL_NS = 2_000_000_000


def dds_profile():
    """config/fastdds.xml (shared memory sized for camera frames), as the launch files use it: from the source
    tree, else from this environment's ament share directory."""
    candidates = [Path(__file__).resolve().parents[2] / "config", Path(sys.prefix) / "share" / "owled_ros" / "config"]
    return next((c / "fastdds.xml" for c in candidates if (c / "fastdds.xml").is_file()), None)


def node_process(module, params, log):
    args = [sys.executable, "-m", module, "--ros-args"] + [x for k, v in params.items() for x in ("-p", f"{k}:={v}")]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)


def replay(bag, log):
    subprocess.run([sys.executable, "-m", "owled_ros.cli", "replay", str(bag), "--wait-subscribers", "1"],
                   stdout=log, stderr=subprocess.STDOUT, check=True)


def stop(process):
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def size_mb(path):
    return (Path(path) / "model.safetensors").stat().st_size / 2**20


def stamp(message):
    return message.header.stamp.sec * 10**9 + message.header.stamp.nanosec


def judged(perceptions, actions, truth):
    """The drive node's answers to each judged frame set (matched by stamp) beside the truth: rows of (stamp,
    perception, its truth, action answer, its truth), and the score of the answered ones: actions and lights
    right, both right on one frame set, the vehicle count's mean absolute error."""
    answers = {stamp(m): [m.description, None] for m in perceptions}
    for m in actions:
        answers.setdefault(stamp(m), [None, None])[1] = m.rationale
    reference = lambda t, kind: next((p["answer"] for p in truth.get(t, []) if p["kind"] == kind), "")
    rows = [(t, *answers[t], reference(t, "perception"), reference(t, "planning")) for t in truth if t in answers]
    perceived = [(seen, truth_) for _, seen, _, truth_, _ in rows if seen is not None]
    acted = [(said, truth_) for _, _, said, _, truth_ in rows if said is not None]
    both = [(seen, seen_truth, said, said_truth) for _, seen, said, seen_truth, said_truth in rows
            if seen is not None and said is not None]
    counts = [(parse_count(seen, VEHICLE), parse_count(truth_, VEHICLE)) for seen, truth_ in perceived]
    errors = [abs((a or 0) - b) for a, b in counts if b is not None]
    return rows, {"frame_sets_answered": len(rows),
                  "actions_right": sum(parse_action(a) == parse_action(b) for a, b in acted), "actions": len(acted),
                  "lights_right": sum(parse_light(a) == parse_light(b) for a, b in perceived), "lights": len(perceived),
                  "both_right": sum(parse_light(a) == parse_light(b) and parse_action(c) == parse_action(d) for a, b, c, d in both),
                  "both": len(both),
                  "vehicle_count_mae": round(sum(errors) / len(errors), 2) if errors else None}


def run_demo(workdir, sparsity="0.5"):
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if dds_profile():  # before this process's first DDS participant; the nodes and the player inherit it
        os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(dds_profile()))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    log = open(workdir / "nodes.log", "w")
    timings = {}
    start = time.monotonic()
    dense = resolve_model("default")
    timings["model"] = time.monotonic() - start

    step = time.monotonic()
    calibration = read_samples(DEMO_CALIB)
    calibration_bag = write_drive(workdir / "calibration_bag", ((START_NS + i * CALIBRATION_INTERVAL_NS, s.images())
                                                                for i, s in enumerate(calibration)))
    scenes = read_samples(DEMO_FRAMES)
    truth = {START_NS + i * SCENE_INTERVAL_NS: s.qa for i, s in enumerate(scenes)}
    bag = write_drive(workdir / "drive_bag", ((t, s.images()) for t, s in zip(truth, scenes)))
    print(f"[1/4] wrote two 6-camera drives through MetaDrive scenes: a calibration drive ({len(calibration)} frame "
          f"sets) and a drive through {len(scenes)} other, held-out scenes, one every {SCENE_INTERVAL_NS / 1e9:g} s, "
          "to judge the model on")
    recorder = node_process("owled_ros.nodes.recorder_node", {"output_dir": workdir / "calibration",
                                                               "vehicle_id": "demo", "min_interval_s": 0.4,
                                                               "shard_size": 8, "camera_reliability": "reliable"}, log)
    replay(calibration_bag, log)
    stop(recorder)
    recorded = len(read_samples(workdir / "calibration"))
    timings["record"] = time.monotonic() - step
    print(f"[2/4] recorder node kept {recorded} frame sets of the calibration drive in {workdir / 'calibration'}")

    step = time.monotonic()
    # OWL allocation with SparseGPT: at 50 % the sweep's method that keeps the answers (Wanda-scored ones lose them)
    report = prune(dense, workdir / "pruned", "owled-sparsegpt", sparsity, workdir / "calibration", nsamples=recorded,
                   progress=False)
    timings["prune"] = time.monotonic() - step
    print(f"[3/4] OWLed (SparseGPT) pruning: achieved sparsity {report['achieved']['pruned_components']:.3f} of the language model")

    step = time.monotonic()
    drive = node_process("owled_ros.nodes.drive_node", {"model_dir": workdir / "pruned", "max_rate_hz": 2.0,
                                                         "camera_reliability": "reliable"}, log)
    received = {"perception": [], "action": [], "answers": []}
    rclpy.init()
    node = rclpy.create_node("owled_demo")
    for key, kind in (("perception", PerceptionDescription), ("action", PredictedAction), ("answers", QAAnswer)):
        node.create_subscription(kind, f"/owled/{key}", received[key].append, 10)
    asker = node.create_publisher(Question, "/owled/questions", 10)
    statuses = []
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: statuses.extend(m.status), 10)
    # the node subscribes once its model is ready (a compiled backend converts it on its first start: minutes)
    ready = time.monotonic() + 900
    while time.monotonic() < ready and drive.poll() is None and not node.count_subscribers(carla_topics()["CAM_FRONT"]):
        rclpy.spin_once(node, timeout_sec=0.2)
    player = subprocess.Popen([sys.executable, "-m", "owled_ros.cli", "replay", str(bag), "--wait-subscribers", "1"],
                              stdout=log, stderr=subprocess.STDOUT)
    asked = False
    # until the replay is over and the last scene and the question are answered (or 15 s more: that scene's set
    # may have been dropped)
    last_answered = lambda: received["answers"] and any(stamp(m) == max(truth) for m in received["action"])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (player.poll() is None or not last_answered()):
        rclpy.spin_once(node, timeout_sec=0.1)
        if received["perception"] and not asked:
            asker.publish(Question(question_id="demo-1", category="prediction", question=QUESTION))
            asked = True
        if player.poll() is not None:
            deadline = min(deadline, time.monotonic() + 15)
    # the node's counts as of its last answer (its /diagnostics go out once a second)
    latest_stats = lambda: {kv.key: kv.value for kv in statuses[-1].values} if statuses else {}
    settle = time.monotonic() + 3
    while time.monotonic() < settle and int(latest_stats().get("processed_frame_sets", 0)) < len(received["perception"]):
        rclpy.spin_once(node, timeout_sec=0.1)
    stop(drive)
    node.destroy_node()
    rclpy.shutdown()
    timings["drive"] = time.monotonic() - step
    print("[4/4] drive node on the pruned model answered while the bag replayed\n")

    rows, score = judged(received["perception"], received["action"], truth)
    for t, seen, said, seen_truth, said_truth in rows:
        print(f"@{t / 1e9:.1f} perception: {seen!r}\n        truth: {seen_truth!r}\n"
              f"       action: {said!r}\n        truth: {said_truth!r}")
    for message in received["answers"]:
        print(f"answer [{message.question_id}] {message.question} -> {message.answer!r}")
    latencies = [m.latency_s for m in received["perception"]]
    node_stats = latest_stats()
    backend = node_stats.get("backend")
    dropped = {"while the model was busy": int(node_stats.get("dropped_frame_sets", 0)),
               "never made (their views dropped)": int(node_stats.get("unmade_frame_sets", 0)),
               **{f"views {k.split('.', 1)[1]}": int(v) for k, v in node_stats.items() if k.startswith("dropped_views.")}}
    print(f"runtime backend of the drive node: {backend}")
    print(f"score: actions right {score['actions_right']}/{score['actions']}, lights right {score['lights_right']}/"
          f"{score['lights']}, both {score['both_right']}/{score['both']}, vehicle count MAE {score['vehicle_count_mae']}; frame sets answered "
          f"{score['frame_sets_answered']} of {len(scenes)}, dropped: "
          + (", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none"))
    summary = {"model": received["perception"][0].model.model_id if latencies else None, "backend": backend,
               "sparsity_llm": round(report["achieved"]["pruned_components"], 4),
               "size_mb_dense": round(size_mb(dense), 1), "size_mb_pruned": round(size_mb(workdir / "pruned"), 1),
               "calibration_frame_sets": recorded, "frame_sets": len(scenes), "frame_sets_processed": len(latencies),
               "dropped": dropped, "score": score,
               "latency_p50_s": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
               "latency_p95_s": round(float(np.percentile(latencies, 95)), 2) if latencies else None,
               "seconds": {k: round(v, 1) for k, v in timings.items()}}
    print("\nreport: " + json.dumps(summary, indent=2))
    (workdir / "demo_report.json").write_text(json.dumps(summary, indent=2))
    if not (received["perception"] and received["action"] and received["answers"]):
        raise RuntimeError(f"demo received too little from the drive node (see {workdir / 'nodes.log'})")
    return summary
