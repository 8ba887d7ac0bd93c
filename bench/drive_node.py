"""Drive-node frames per second and latency, dense vs pruned, on the same frames in one run.

Each model runs in a real drive-node process. A synthetic 6-camera drive (CARLA-bridge topics, bgra8) is
published one frame set at a time from this process over DDS; the next set goes out when the node's
PredictedAction for the current one arrives. So every model sees every frame set (none dropped) and the
latency is end to end: publish -> PerceptionDescription + PredictedAction received.

    .venv/bin/python bench/drive_node.py                 # dense default vs OWLed 50 % (pruned here first)
    .venv/bin/python bench/drive_node.py --pruned DIR ... # or bring pruned model directories
"""
import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.qos import QoSProfile, QoSReliabilityPolicy

from owled_ros.data.bags import camera_messages, carla_topics, write_synthetic_drive
from owled_ros.data.calib import write_synthetic
from owled_ros.model.build import resolve_model
from owled_ros.model.vlm import DrivingVLM
from owled_ros.msg import PredictedAction
from owled_ros.nodes.demo import node_process, size_mb, stop
from owled_ros.nodes.replay import to_ros
from owled_ros.pruning.run import prune

RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)


def frame_sets(bag):
    """[[(topic, ROS message)] per frame set], in bag order."""
    sets = {}
    for topic, timestamp, msgtype, message in camera_messages(bag, list(carla_topics().values())):
        sets.setdefault(timestamp, []).append((topic, to_ros(msgtype, message)))
    return list(sets.values())


class Driver:
    """Publishes frame sets and waits for the drive node's action on each."""

    def __init__(self, frame_set):
        rclpy.init()
        self.node = rclpy.create_node("owled_bench_driver")
        self.publishers = {t: self.node.create_publisher(type(m), t, RELIABLE) for t, m in frame_set}
        self.actions = []
        self.node.create_subscription(PredictedAction, "/owled/action", self.actions.append, 10)

    def spin_until(self, done, timeout):
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.02)
        return done()

    def wait_for_node(self, timeout=600):
        self.actions.clear()
        return self.spin_until(lambda: all(p.get_subscription_count() for p in self.publishers.values())
                               and self.node.count_publishers("/owled/action") > 0, timeout)

    def round_trip(self, frame_set, timeout=300):
        """Seconds from publishing the set to its action arriving, and that action."""
        stamp = frame_set[0][1].header.stamp
        start = time.perf_counter()
        for topic, message in frame_set:
            self.publishers[topic].publish(message)
        matches = lambda: [a for a in self.actions if (a.header.stamp.sec, a.header.stamp.nanosec) == (stamp.sec, stamp.nanosec)]
        if not self.spin_until(matches, timeout):
            raise RuntimeError(f"no action for the frame set stamped {stamp.sec}.{stamp.nanosec:09d} within {timeout} s")
        return time.perf_counter() - start, matches()[0]

    def close(self):
        self.node.destroy_node()
        rclpy.shutdown()


def measure(driver, model_dir, warm_up, sets, log):
    # every view of a set is published at once: wait for all of them even while inference holds the CPU
    process = node_process("owled_ros.nodes.drive_node", {"model_dir": model_dir, "max_rate_hz": 1000.0,
                                                          "camera_reliability": "reliable", "view_timeout_s": 30.0}, log)
    try:
        if not driver.wait_for_node():
            raise RuntimeError(f"drive node on {model_dir} did not come up (see {log.name})")
        driver.round_trip(warm_up)
        start = time.perf_counter()
        trips = [driver.round_trip(s) for s in sets]
        wall = time.perf_counter() - start
    finally:
        stop(process)
        driver.spin_until(lambda: driver.node.count_publishers("/owled/action") == 0, 30)  # gone from the graph
    end_to_end = np.array([seconds for seconds, _ in trips])
    model_time = np.array([action.latency_s for _, action in trips])
    info = trips[0][1].model
    return {"model": str(model_dir), "method": info.method, "sparsity": round(info.sparsity, 3),
            "size_mb": round(size_mb(model_dir), 1), "frame_sets": len(sets), "fps": len(sets) / wall,
            "e2e_p50_s": float(np.percentile(end_to_end, 50)), "e2e_p95_s": float(np.percentile(end_to_end, 95)),
            "model_p50_s": float(np.percentile(model_time, 50)), "model_p95_s": float(np.percentile(model_time, 95)),
            "rationale_words": float(np.mean([len(a.rationale.split()) for _, a in trips])),
            "actions": [a.action_label for _, a in trips]}


def markdown(summary):
    rows = summary["rows"]
    lines = [f"{summary['frame_sets']} frame sets of 6 bgra8 {summary['size'][1]}x{summary['size'][0]} cameras, published "
             f"one set at a time over DDS (reliable QoS) to a drive-node process; {summary['machine']}.", "",
             "| model | method | sparsity | size MB | fps | e2e p50 s | e2e p95 s | model p50 s | model p95 s | "
             "words/action | speed-up vs dense | same action as dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = rows[0]
    for row in rows:
        agree = np.mean([a == b for a, b in zip(row["actions"], dense["actions"])])
        lines.append(f"| {Path(row['model']).name} | {row['method']} | {row['sparsity']:.2f} | {row['size_mb']:.0f} | "
                     f"{row['fps']:.2f} | {row['e2e_p50_s']:.2f} | {row['e2e_p95_s']:.2f} | {row['model_p50_s']:.2f} | "
                     f"{row['model_p95_s']:.2f} | {row['rationale_words']:.1f} | {row['fps'] / dense['fps']:.2f}x | {agree:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", default="default")
    p.add_argument("--pruned", nargs="*", help="pruned model directories (default: OWLed 50 %% of --dense, pruned here)")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--size", type=int, nargs=2, default=(450, 800), metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    out = Path(args.out)
    work = out / "work-drive-node"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dense = resolve_model(args.dense)
    models = [dense] + [Path(m) for m in args.pruned or []]
    if args.pruned is None:
        write_synthetic(work / "calib", 32, seed=100, vehicle="bench-calib")
        prune(dense, work / "owled-0.5", "owled", "0.5", work / "calib", nsamples=32, progress=False)
        models.append(work / "owled-0.5")
    for model in models:
        DrivingVLM.from_pretrained(model)  # a clear error before any node starts
    bag = write_synthetic_drive(work / "drive", args.frames + 1, seed=7, size=tuple(args.size))
    warm_up, *sets = frame_sets(bag)
    driver = Driver(warm_up)
    rows = []
    with open(work / "nodes.log", "w") as log:
        try:
            for model in models:
                rows.append(measure(driver, model, warm_up, sets, log))
                print(f"{Path(model).name}: {rows[-1]['fps']:.2f} fps, e2e p50 {rows[-1]['e2e_p50_s']:.2f} s")
        finally:
            driver.close()
    summary = {"frame_sets": len(sets), "size": list(args.size), "rows": rows,
               "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU"}
    (out / "drive_node.json").write_text(json.dumps(summary, indent=2))
    (out / "drive_node.md").write_text(markdown(summary))
    print(markdown(summary))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
