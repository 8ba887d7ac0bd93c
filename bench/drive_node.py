"""Drive-node latency, where it goes, and memory: dense vs pruned, float32 vs bfloat16, raw vs compressed
cameras, with and without the shipped Fast DDS profile; one run, the same frames.

Each configuration runs in a real drive-node process. A 6-camera drive through held-out MetaDrive scenes
(CARLA-bridge topics; each view scaled to 800x450 bgra8, a full camera frame, or JPEG on the `/compressed`
topics) is published one frame set at a time from this
process over DDS, stamped with the wall clock when it goes out; the next set goes out when the node's
PredictedAction for the current one arrives. So every configuration sees every frame set (none dropped),
end to end is publish -> PerceptionDescription + PredictedAction received, and the node's /diagnostics
give the stages (camera stamp -> callback, conversion, queue, image encoding, prefill, decoding, publishing).
Then, as cameras would, the same sets stream at 10 Hz (cycling) for --stream-s seconds on the dense model per
backend: the node answers the newest complete set and drops the rest (counted); reception must keep up.

    .venv/bin/python bench/drive_node.py [--frames DIR] [--calib DIR]   # the default and OWLed-SparseGPT 50 %, 70 % of it
    .venv/bin/python bench/drive_node.py --pruned DIR ...   # or bring pruned model directories
"""
import argparse
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.qos import QoSProfile, QoSReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage

from owled_ros.data.bags import camera_messages, carla_topics, write_drive
from owled_ros.data.calib import read_samples, write_synthetic
from owled_ros.data.metadrive_world import DEMO_FRAMES
from owled_ros.data.world import CAMERAS
from owled_ros.eval.machine import cpu
from owled_ros.model.build import resolve_model
from owled_ros.model.vlm import DrivingVLM
from owled_ros.msg import PredictedAction
from owled_ros.nodes.demo import dds_profile, node_process, size_mb, stop
from owled_ros.nodes.replay import to_ros
from owled_ros.pruning.run import prune
from results_io import write_results

RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
STAGES = [("transport_s", "transport"), ("convert_s", "convert"), ("queue_s", "queue"), ("encode_s", "image encoding"),
          ("prefill_s", "prefill"), ("decode_s", "decode"), ("decode_per_step_s", "per pass"),
          ("tokens_per_step", "tokens a pass"), ("publish_s", "publish")]


def frame_sets(bag, compressed):
    """[[(topic, ROS message)] per frame set], in bag order; JPEG (quality 90) on `<topic>/compressed`."""
    sets = {}
    for topic, timestamp, msgtype, message in camera_messages(bag, list(carla_topics().values())):
        raw = to_ros(msgtype, message)
        if compressed:
            bgra = np.frombuffer(bytes(raw.data), np.uint8).reshape(raw.height, raw.width, 4)
            jpeg = cv2.imencode(".jpg", cv2.cvtColor(bgra, cv2.COLOR_BGRA2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
            topic, raw = topic + "/compressed", CompressedImage(header=raw.header, format="jpeg", data=jpeg.tobytes())
        sets.setdefault(timestamp, []).append((topic, raw))
    return list(sets.values())


class Driver:
    """Publishes frame sets and waits for the drive node's action on each (its own DDS participant, so
    that it takes the Fast DDS profile of the configuration)."""

    def __init__(self, frame_set):
        rclpy.init()
        self.node = rclpy.create_node("owled_bench_driver")
        self.publishers = {t: self.node.create_publisher(type(m), t, RELIABLE) for t, m in frame_set}
        self.actions, self.diagnostics, self.arrivals = [], [], {}  # arrivals: action stamp -> wall-clock arrival
        self.node.create_subscription(PredictedAction, "/owled/action", self.on_action, 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)

    def spin_until(self, done, timeout):
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.02)
        return done()

    def on_action(self, action):
        self.arrivals[(action.header.stamp.sec, action.header.stamp.nanosec)] = time.time()
        self.actions.append(action)

    def wait_for_node(self, timeout=600, answers=True):
        """Until the node subscribes to every camera (and, with answers, publishes actions)."""
        return self.spin_until(lambda: all(p.get_subscription_count() for p in self.publishers.values())
                               and (not answers or self.node.count_publishers("/owled/action") > 0), timeout)

    def publish(self, frame_set, stamp_ns=None):
        """Publish the set stamped stamp_ns (default: the wall clock now); returns the stamp."""
        now = (self.node.get_clock().now() if stamp_ns is None else Time(nanoseconds=stamp_ns)).to_msg()
        for topic, message in frame_set:
            message.header.stamp = now
            self.publishers[topic].publish(message)
        return now

    def round_trip(self, frame_set, timeout=300):
        """Seconds from publishing the set (stamped now) to its action arriving, and that action."""
        start = time.perf_counter()
        now = self.publish(frame_set)
        matches = lambda: [a for a in self.actions if (a.header.stamp.sec, a.header.stamp.nanosec) == (now.sec, now.nanosec)]
        if not self.spin_until(matches, timeout):
            raise RuntimeError(f"no action for the frame set stamped {now.sec}.{now.nanosec:09d} within {timeout} s")
        return time.perf_counter() - start, matches()[0]

    def stream(self, sets, rate_hz, seconds):
        """Frame sets at rate_hz for `seconds`, cycling; returns how many went out and, per action that came
        back, the seconds from its set's stamp to its arrival with the action."""
        self.actions.clear()
        start, sent, first = time.monotonic(), 0, time.time_ns()
        while time.monotonic() - start < seconds:
            # stamped at its camera time, as a camera would, even where this process is late to send it
            self.publish(sets[sent % len(sets)], first + int(sent * 1e9 / rate_hz))
            sent += 1
            self.spin_until(lambda: time.monotonic() >= start + sent / rate_hz, 1.0)
        self.spin_until(lambda: False, 5.0)  # the set in progress comes back
        stamp = lambda a: (a.header.stamp.sec, a.header.stamp.nanosec)
        return sent, [(self.arrivals[stamp(a)] - stamp(a)[0] - stamp(a)[1] / 1e9, a) for a in self.actions]

    def latest_status(self, name="owled_drive"):
        self.spin_until(lambda: False, 1.5)
        return {kv.key: kv.value for s in self.diagnostics[-1].status if s.name == name for kv in s.values}

    def stages(self, processed):
        """The node's per-stage p50s from its first /diagnostics that counts `processed` frame sets."""
        def latest():
            for array in reversed(self.diagnostics):
                values = {kv.key: kv.value for s in array.status if s.name == "owled_drive" for kv in s.values}
                if values.get("processed_frame_sets") == str(processed):
                    return values
            return None
        if not self.spin_until(lambda: latest() is not None, 10):
            raise RuntimeError("the drive node published no diagnostics for the measured frame sets")
        return {key: float(latest()[f"p50_s.{key}"]) for key, _ in STAGES if f"p50_s.{key}" in latest()}

    def close(self):
        self.node.destroy_node()
        rclpy.shutdown()


def memory_mb(pid):
    """(resident, peak resident) MB of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def measure(config, bag, log_path):
    """One configuration: a drive-node process, a driver, a warm-up set then the measured ones. Runs in a
    process of its own: Fast DDS reads its XML profile once per process, at the first participant."""
    if config["profile"]:
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(dds_profile())
    else:
        os.environ.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    sets = frame_sets(bag, config["compressed"])
    topics = [topic for topic, _ in sets[0]]
    streaming = config.get("stream_hz")
    params = {"model_dir": config["model"], "dtype": config["dtype"], "backend": config["backend"], "max_rate_hz": 1000.0,
              "camera_reliability": "reliable", "view_timeout_s": 1.0 if streaming else 30.0,
              "latency_window": 10_000 if streaming else len(sets),
              "camera_topics": "[" + ",".join(topics) + "]",
              "camera_transports": "[" + ",".join(["compressed" if config["compressed"] else "raw"] * len(topics)) + "]"}
    if config.get("draft_tokens") is not None:
        params["draft_tokens"] = config["draft_tokens"]
    driver = Driver(sets[0])
    log = open(log_path, "a")
    process = node_process("owled_ros.nodes.drive_node", params, log)
    try:
        if not driver.wait_for_node():
            raise RuntimeError(f"drive node on {config['model']} did not come up (see {log.name})")
        driver.round_trip(sets[0])  # warm-up, outside the statistics
        if streaming:
            return {**streamed(driver, sets, config), "rss_mb": memory_mb(process.pid)[0]}
        start = time.perf_counter()
        trips = [driver.round_trip(s) for s in sets[1:]]
        wall = time.perf_counter() - start
        stages = driver.stages(len(sets))
        rss, peak = memory_mb(process.pid)
    finally:
        stop(process)
        driver.close()
        log.close()
    end_to_end = np.array([seconds for seconds, _ in trips])
    model_time = np.array([action.latency_s for _, action in trips])
    info = trips[0][1].model
    return {**config, "model": str(config["model"]), "method": info.method, "sparsity": round(info.sparsity, 3),
            "size_mb": round(size_mb(config["model"]), 1), "frame_sets": len(trips), "fps": len(trips) / wall,
            "e2e_p50_s": float(np.percentile(end_to_end, 50)), "e2e_p95_s": float(np.percentile(end_to_end, 95)),
            "model_p50_s": float(np.percentile(model_time, 50)), "model_p95_s": float(np.percentile(model_time, 95)),
            "stages_p50_s": stages, "rss_mb": rss, "peak_rss_mb": peak,
            "actions": [a.action_label for _, a in trips], "rationales": [a.rationale for _, a in trips]}


def streamed(driver, sets, config):
    """A streaming row: sets sent, answered, dropped (newer set arrived while the model ran; views that made no
    complete set), the node's stage p50s, and stamp -> action arrival for the answered sets."""
    before = driver.latest_status()
    sent, answered = driver.stream(sets, config["stream_hz"], config["stream_s"])
    after = driver.latest_status()
    delta = lambda key: int(after[key]) - int(before[key])
    seconds = np.array([s for s, _ in answered])
    model_time = np.array([a.latency_s for _, a in answered])
    return {**config, "model": str(config["model"]), "sent": sent, "answered": len(answered),
            "dropped_sets": delta("dropped_frame_sets"), "dropped_views": delta("dropped_views"),
            "dropped_views_why": {k.split(".")[1]: int(v) - int(before.get(k, 0)) for k, v in after.items() if k.startswith("dropped_views.")},
            "e2e_p50_s": float(np.percentile(seconds, 50)), "model_p50_s": float(np.percentile(model_time, 50)),
            "stages_p50_s": {key: float(after[f"p50_s.{key}"]) for key, _ in STAGES if f"p50_s.{key}" in after}}


def label(row):
    return (f"{Path(row['model']).name} {row['backend']} {row['dtype']}, {'JPEG' if row['compressed'] else 'raw'}, "
            f"{'shipped profile' if row['profile'] else 'Fast DDS defaults'}"
            f"{', no guesses' if row.get('draft_tokens') == 0 else ''}")


def markdown(summary):
    rows = summary["rows"]
    reference = rows[0]
    streams = summary["streams"]
    lines = [f"{summary['frame_sets']} held-out MetaDrive frame sets, six cameras scaled to {summary['size'][1]}x"
             f"{summary['size'][0]} (bgra8, "
             f"{summary['set_mb']:.1f} MB a set; JPEG: {summary['jpeg_set_mb']:.1f} MB), published one set at a time over "
             f"DDS (reliable QoS) to a drive-node process answering the perception and the action question; "
             f"{summary['machine']}. Same action / same text: share of frame sets whose parsed action / whole action "
             "answer equals the first row's.", "",
             "| configuration | method | sparsity | fps | e2e p50 s | e2e p95 s | model p50 s | model p95 s | e2e / model "
             "| RSS MB | peak RSS MB | same action | same text |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = {key: np.mean([a == b for a, b in zip(row[key], reference[key])]) for key in ("actions", "rationales")}
        lines.append(f"| {label(row)} | {row['method']} | {row['sparsity']:.2f} | {row['fps']:.2f} | {row['e2e_p50_s']:.2f} | "
                     f"{row['e2e_p95_s']:.2f} | {row['model_p50_s']:.2f} | {row['model_p95_s']:.2f} | "
                     f"{row['e2e_p50_s'] / row['model_p50_s']:.2f} | {row['rss_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
                     f"{same['actions']:.2f} | {same['rationales']:.2f} |")
    lines += ["", "Where the time goes: the node's p50 per stage, seconds (transport: camera stamp -> callback; "
                  "convert: the six images to RGB; queue: frame set complete -> model; per pass: one decoding forward "
                  "pass for both questions together; tokens a pass: answer tokens each pass produced, guesses from "
                  "earlier answers included; 1 without guesses).", "",
              "| configuration | " + " | ".join(name for _, name in STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for row in rows:
        lines.append(f"| {label(row)} | " + " | ".join(f"{row['stages_p50_s'].get(key, float('nan')):.3f}"
                                                     for key, _ in STAGES) + " |")
    lines += ["", f"Cameras streaming at {streams[0]['stream_hz']:g} Hz for {streams[0]['stream_s']:g} s (the same sets, "
                  "cycling, reliable QoS as above). Answered: actions received; dropped sets: complete sets replaced by a newer one "
                  "while the model ran; dropped views: views that made no complete set; e2e: camera stamp -> action "
                  "received.", "",
              "| configuration | sent | answered | dropped sets | dropped views | transport p50 s | queue p50 s "
              "| model p50 s | e2e p50 s | RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in streams:
        stage = lambda key: row["stages_p50_s"].get(key, float("nan"))
        lines.append(f"| {label(row)} | {row['sent']} | {row['answered']} | {row['dropped_sets']} | {row['dropped_views']} "
                     f"| {stage('transport_s'):.3f} | {stage('queue_s'):.3f} | {row['model_p50_s']:.2f} | "
                     f"{row['e2e_p50_s']:.2f} | {row['rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", default="default")
    p.add_argument("--pruned", nargs="*",
                   help="pruned model directories (default: OWLed-SparseGPT 50 %% and 70 %% of --dense, pruned here)")
    p.add_argument("--calib", help="calibration frame sets for that prune (default: synthetic 2-D ones)")
    p.add_argument("--frames", default=str(DEMO_FRAMES), help="MetaDrive frame sets to drive through (default: shipped)")
    p.add_argument("--count", type=int, default=20, help="frame sets measured (one more warms up)")
    p.add_argument("--size", type=int, nargs=2, default=(450, 800), metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--stream-s", type=float, default=30.0, help="seconds of 10 Hz streaming per backend")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    out = Path(args.out)
    work = out / "work-drive-node"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dense = resolve_model(args.dense)
    pruned = [Path(m) for m in args.pruned or []]
    if args.pruned is None:
        calib = args.calib
        if calib is None:
            calib = work / "calib"
            write_synthetic(calib, 32, seed=100, vehicle="bench-calib")
        # the sweep's method that keeps the answers at 50 % (owled bench), and 70 %: does memory shrink further?
        for sparsity in ("0.5", "0.7"):
            prune(dense, work / f"owled-sparsegpt-{sparsity}", "owled-sparsegpt", sparsity, calib, nsamples=32, progress=False)
            pruned.append(work / f"owled-sparsegpt-{sparsity}")
    for model in [dense, *pruned]:
        DrivingVLM.from_pretrained(model)  # a clear error before any node starts
    # complete sets only: one with a dropped camera would time the node's view_timeout_s, not the pipeline
    scenes = [s for s in read_samples(args.frames) if len(s.images()) == len(CAMERAS)][:args.count + 1]
    if len(scenes) < 2:
        raise SystemExit(f"{args.frames} holds {len(scenes)} frame sets with all six views; the bench needs at least 2")
    height, width = args.size
    bag = write_drive(work / "drive", ((1_700_000_000 * 10**9 + i * 5 * 10**8,
                                        {c: cv2.resize(rgb, (width, height)) for c, rgb in s.images().items()})
                                       for i, s in enumerate(scenes)))
    # the node's defaults (guesses from earlier answers on) unless draft_tokens is given
    configs = [{"model": dense, "backend": "torch", "dtype": "float32", "compressed": False, "profile": True},
               {"model": dense, "backend": "torch", "dtype": "bfloat16", "compressed": False, "profile": True},
               {"model": dense, "backend": "openvino", "dtype": "float32", "compressed": False, "profile": True},
               {"model": dense, "backend": "openvino", "dtype": "float32", "compressed": False, "profile": True, "draft_tokens": 0},
               {"model": dense, "backend": "openvino", "dtype": "float32", "compressed": True, "profile": True},
               {"model": dense, "backend": "openvino-int8", "dtype": "float32", "compressed": False, "profile": True},
               {"model": dense, "backend": "torch-int8", "dtype": "float32", "compressed": False, "profile": True}]
    configs += [{"model": m, "backend": backend, "dtype": "float32", "compressed": False, "profile": True} for m in pruned
                for backend in ("torch", "openvino", "openvino-int8", "torch-int8")]
    configs += [{"model": dense, "backend": backend, "dtype": dtype, "compressed": False, "profile": True,
                 "stream_hz": 10.0, "stream_s": args.stream_s}
                for backend, dtype in (("torch", "float32"), ("torch", "bfloat16"), ("openvino", "float32"),
                                       ("openvino-int8", "float32"))]
    rows = []
    for config in configs:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            rows.append(child.submit(measure, config, bag, work / "nodes.log").result())
        print(f"{label(rows[-1])}: e2e p50 {rows[-1]['e2e_p50_s']:.2f} s, model p50 {rows[-1]['model_p50_s']:.2f} s",
              flush=True)
    set_mb = lambda compressed: sum(len(m.data) for _, m in frame_sets(bag, compressed)[0]) / 1e6
    summary = {"frame_sets": len(scenes) - 1, "size": list(args.size), "set_mb": set_mb(False), "jpeg_set_mb": set_mb(True),
               "rows": [r for r in rows if "stream_hz" not in r], "streams": [r for r in rows if "stream_hz" in r],
               "machine": "{cores} CPU cores ({model}; {flags}), no GPU".format(**cpu() | {"flags": ", ".join(cpu()["flags"])})}
    write_results(out, "drive_node", summary, markdown(summary))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
