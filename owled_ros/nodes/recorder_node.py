"""Recorder node: camera topics -> calibration shards on disk (kept by interval and near-duplicate policy).

SIGINT/SIGTERM close the current shard; after SIGKILL the completed shards are intact and the partial one
stays under its temporary name, which readers ignore.
"""
import collections
import shutil
import socket
import tempfile
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from std_msgs.msg import Header

from owled_ros.data.recorder import KeepPolicy, ShardRecorder
from owled_ros.nodes.drive_node import STEADY, CameraInput, spin


class RecorderNode(Node):
    def __init__(self):
        super().__init__("owled_recorder")
        self.declare_parameter("output_dir", "calibration")
        self.declare_parameter("vehicle_id", "")
        self.declare_parameter("min_interval_s", 0.5)
        self.declare_parameter("min_difference", 2.0)
        self.declare_parameter("shard_size", 32)
        self.declare_parameter("max_frames", 1000)
        self.declare_parameter("quota_mb", 1024.0)
        self.declare_parameter("min_free_mb", 100.0)  # refuse to start with less free space in output_dir
        param = lambda name: self.get_parameter(name).value
        self.policy = KeepPolicy(param("min_interval_s"), param("min_difference"))
        check_writable(Path(param("output_dir")), param("min_free_mb"))
        self.recorder = ShardRecorder(Path(param("output_dir")), param("vehicle_id") or socket.gethostname(), param("shard_size"),
                                      param("max_frames"), int(param("quota_mb") * 2**20))
        self.skipped = collections.Counter()
        self.cameras = CameraInput(self, self.on_frame_set)
        self.diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self.publish_diagnostics, clock=STEADY)
        for shard, count in self.recorder.recovered.items():
            self.get_logger().warning(f"completed shard {shard} left unfinished by an earlier run: {count} frame sets kept")
        self.get_logger().info(f"recording {[c for _, c, _ in self.cameras.cameras]} into {self.recorder.out}")

    def on_frame_set(self, frame_set):
        reason = self.policy.check(frame_set)
        if reason is None and not self.recorder.write(frame_set):
            reason = "disk" if self.recorder.failed else "limit"
            if self.recorder.failed:
                self.get_logger().error(self.recorder.failed, throttle_duration_sec=10.0)
            else:
                self.get_logger().warning("max_frames or quota reached; not recording", throttle_duration_sec=10.0)
        if reason:
            self.skipped[reason] += 1

    def stats(self):
        return {"frames": self.recorder.frames, "shards": self.recorder.shards, "bytes": self.recorder.bytes,
                **self.cameras.stats(),
                **{f"skipped.{k}": v for k, v in sorted(self.skipped.items())}}

    def publish_diagnostics(self):
        stats = self.stats()
        failed = self.recorder.failed
        status = DiagnosticStatus(level=DiagnosticStatus.ERROR if failed else DiagnosticStatus.OK, name="owled_recorder",
                                  message=failed or f"{stats['frames']} frames",
                                  values=[KeyValue(key=k, value=str(v)) for k, v in stats.items()])
        self.diagnostics_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    def destroy_node(self):
        self.recorder.close_shard()
        self.get_logger().info(" ".join(f"{k}={v}" for k, v in self.stats().items()))
        super().destroy_node()


def check_writable(directory, min_free_mb=0.0):
    """Fail at start-up, not on the first frame set, when the output directory cannot take files or its disk
    has less than min_free_mb free."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise OSError(f"output_dir {directory} is not writable: {error.strerror or error}") from None
    free_mb = shutil.disk_usage(directory).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"output_dir {directory} has {free_mb:.0f} MB free, less than min_free_mb ({min_free_mb:g} MB): "
                      "not recording")


def main():
    spin(RecorderNode)


if __name__ == "__main__":
    main()
