"""The nodes under load and faults, one run: six cameras at 10 Hz for --minutes against the drive node (its
RSS sampled every 10 s, every frame set sent accounted for), then the time it takes to exit on SIGINT and on
SIGTERM; the recorder killed (SIGKILL) while recording, then started again: every frame set it had
acknowledged on /diagnostics must be there; and the recorder refusing a disk without min_free_mb free.

    .venv/bin/python bench/load.py [--minutes 10] [--model default]   # bench/results/load.{json,md}
"""
import argparse
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from drive_node import Driver, frame_sets, memory_mb
from owled_ros.data.bags import write_drive
from owled_ros.data.calib import read_samples
from owled_ros.data.metadrive_world import DEMO_FRAMES
from owled_ros.data.world import CAMERAS
from owled_ros.eval.machine import cpu
from owled_ros.model.build import resolve_model
from owled_ros.nodes.demo import dds_profile, node_process
from results_io import write_results

WARM_UP_S = 60


def exit_seconds(process, sig):
    started = time.monotonic()
    process.send_signal(sig)
    try:
        process.wait(60)
    except Exception:  # noqa: BLE001 -- a node that does not exit is the finding; it is killed
        process.kill()
        process.wait()
        return None
    return time.monotonic() - started


def drive_under_load(model, sets, minutes, log):
    """(row, the running node process) after streaming at 10 Hz: RSS every 10 s, the node's counts."""
    params = {"model_dir": model, "camera_reliability": "reliable", "latency_window": 100_000,
              "camera_topics": "[" + ",".join(t for t, _ in sets[0]) + "]"}
    driver, process = Driver(sets[0]), node_process("owled_ros.nodes.drive_node", params, log)
    if not driver.wait_for_node():
        raise RuntimeError(f"the drive node did not come up (see {log.name})")
    driver.round_trip(sets[0])
    samples, done = [], threading.Event()

    def sample():
        started = time.monotonic()
        while not done.wait(10.0):
            samples.append((time.monotonic() - started, memory_mb(process.pid)[0]))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sent, answered = driver.stream(sets, 10.0, minutes * 60)
    done.set()
    stats = driver.latest_status()
    driver.close()
    after = [rss for t, rss in samples if t >= WARM_UP_S]
    counted = {key: int(stats[key]) for key in ("processed_frame_sets", "dropped_frame_sets", "unmade_frame_sets")}
    sent += 1  # the round trip's
    return {"minutes": minutes, "sent": sent, "answered": len(answered), "processed": counted["processed_frame_sets"],
            "dropped_sets": counted["dropped_frame_sets"], "unmade_sets": counted["unmade_frame_sets"],
            "dropped_views": int(stats["dropped_views"]), "not_received_sets": sent - sum(counted.values()),
            "worker_errors": int(stats["worker_errors"]),
            "rss_mb": [round(rss) for _, rss in samples], "rss_after_warm_up_mb": [round(after[0]), round(after[-1])],
            "rss_growth": after[-1] / after[0] - 1, "alive": process.poll() is None}, process


def recorder_killed(sets, work, log):
    """Frame sets acknowledged before SIGKILL, and the number found after the next start."""
    out = work / "recorded"
    params = {"output_dir": out, "camera_reliability": "reliable", "min_interval_s": 0.3, "shard_size": 8,
              "camera_topics": "[" + ",".join(t for t, _ in sets[0]) + "]"}
    driver, process = Driver(sets[0]), node_process("owled_ros.nodes.recorder_node", params, log)
    try:
        if not driver.wait_for_node(answers=False):
            raise RuntimeError(f"the recorder did not come up (see {log.name})")
        driver.stream(sets, 10.0, 12.0)
        acknowledged = int(driver.latest_status("owled_recorder")["frames"])
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        driver.close()
    again = node_process("owled_ros.nodes.recorder_node", params, log)
    time.sleep(15)  # starts, completes the shard the killed run left, then records nothing more
    exit_seconds(again, signal.SIGINT)
    return {"acknowledged": acknowledged, "found_after_restart": len(read_samples(out))}


def refused_full_disk(work, log):
    process = node_process("owled_ros.nodes.recorder_node", {"output_dir": work / "refused", "min_free_mb": 1e12}, log)
    code = process.wait(60)
    line = next((l for l in Path(log.name).read_text().splitlines() if "min_free_mb" in l), "")
    return {"exit_code": code, "message": line.split("error: ", 1)[-1]}


def markdown(summary):
    load, shutdown, killed, full = summary["load"], summary["shutdown"], summary["recorder_killed"], summary["full_disk"]
    lines = [f"{summary['machine']}; model `{summary['model']}` on the node's default backend. Six raw 800x450 "
             f"views a set, 10 Hz, {load['minutes']} minutes.", "",
             "| check | result |", "|---|---|",
             f"| frame sets sent / answered / processed / dropped (newer set) | {load['sent']} / {load['answered']} / "
             f"{load['processed']} / {load['dropped_sets']} |",
             f"| frame sets never made (views dropped: {load['dropped_views']}) | {load['unmade_sets']} |",
             f"| frame sets the node never received (sent - processed - dropped - never made; keep-last 10 "
             f"history: the sender overwrites views a busy reader has not taken) | {load['not_received_sets']} |",
             f"| node alive at the end, worker errors | {load['alive']}, {load['worker_errors']} |",
             f"| RSS after {WARM_UP_S} s warm-up: first -> last sample | {load['rss_after_warm_up_mb'][0]} -> "
             f"{load['rss_after_warm_up_mb'][1]} MB ({load['rss_growth']:+.1%}) |",
             f"| exit after SIGINT / SIGTERM | {shutdown['sigint_s']:.2f} s / {shutdown['sigterm_s']:.2f} s |",
             f"| recorder SIGKILLed: frame sets acknowledged / found after the next start | {killed['acknowledged']} / "
             f"{killed['found_after_restart']} |",
             f"| recorder on a disk without min_free_mb free | exit code {full['exit_code']}: {full['message']} |"]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(dds_profile())
    out = Path(args.out)
    work = out / "work-load"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    scenes = [s for s in read_samples(DEMO_FRAMES) if len(s.images()) == len(CAMERAS)][:10]
    bag = write_drive(work / "drive", ((1_700_000_000 * 10**9 + i * 5 * 10**8,
                                        {c: cv2.resize(rgb, (800, 450)) for c, rgb in s.images().items()})
                                       for i, s in enumerate(scenes)))
    sets = frame_sets(bag, False)
    model = resolve_model(args.model)
    with open(work / "nodes.log", "a") as log:
        load, process = drive_under_load(model, sets, args.minutes, log)
        sigint = exit_seconds(process, signal.SIGINT)
        process = node_process("owled_ros.nodes.drive_node", {"model_dir": model}, log)
        time.sleep(30)  # loaded and compiled (its IR cached by the first run)
        sigterm = exit_seconds(process, signal.SIGTERM)
        killed = recorder_killed(sets, work, log)
    with open(work / "full.log", "w") as log:
        full = refused_full_disk(work, log)
    summary = {"model": Path(model).name, "machine": "{cores} CPU cores ({model}; {flags})".format(
                   **cpu() | {"flags": ", ".join(cpu()["flags"])}),
               "load": load, "shutdown": {"sigint_s": sigint, "sigterm_s": sigterm}, "recorder_killed": killed,
               "full_disk": full}
    write_results(out, "load", summary, markdown(summary))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
