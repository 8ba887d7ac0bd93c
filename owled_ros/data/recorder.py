"""What the recorder node keeps and how it writes it: a frame-set policy and shard rotation with a quota."""
import time

import cv2
import numpy as np

from .bags import driving_questions
from .calib import ShardWriter, check_name, recover_shards


class KeepPolicy:
    """Keep a frame set if at least min_interval_s passed since the last kept one (by stamp) and it differs
    from it: mean absolute difference of 32x32 grey thumbnails >= min_difference (0-255 scale)."""

    def __init__(self, min_interval_s=0.5, min_difference=2.0):
        self.min_interval_ns, self.min_difference = int(min_interval_s * 1e9), min_difference
        self.last_stamp, self.last_thumbs = None, None

    @staticmethod
    def thumbnails(images):
        return np.stack([cv2.resize(cv2.cvtColor(images[c], cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
                         .astype(np.float32) for c in sorted(images)])

    def check(self, frame_set):
        """None if kept, else the reason it is skipped ('interval' or 'duplicate')."""
        if self.last_stamp is not None and frame_set.stamp_ns - self.last_stamp < self.min_interval_ns:
            return "interval"
        thumbs = self.thumbnails(frame_set.images)
        if self.last_thumbs is not None and thumbs.shape == self.last_thumbs.shape \
                and np.abs(thumbs - self.last_thumbs).mean() < self.min_difference:
            return "duplicate"
        self.last_stamp, self.last_thumbs = frame_set.stamp_ns, thumbs
        return None


class ShardRecorder:
    """Writes kept frame sets into shards of shard_size; stops at max_frames or when quota_bytes is reached,
    and for good when the disk fails (a full disk): `failed` says why, every completed shard stays."""

    def __init__(self, out, vehicle, shard_size=32, max_frames=1000, quota_bytes=1 << 30, source="live"):
        self.out, self.vehicle, self.shard_size = out, check_name(vehicle, "vehicle id"), shard_size
        self.max_frames, self.quota_bytes, self.source = max_frames, quota_bytes, source
        self.session = time.strftime("%Y%m%dT%H%M%S")
        self.writer, self.shards, self.frames, self.bytes = None, 0, 0, 0
        self.failed = ""
        self.recovered = recover_shards(out) if out.is_dir() else {}  # shards a killed recorder left unfinished

    @property
    def full(self):
        return self.frames >= self.max_frames or self.bytes >= self.quota_bytes

    def write(self, frame_set):
        """Returns False (and writes nothing) once the limits are reached or the disk has failed."""
        if self.full or self.failed:
            return False
        try:
            self._write(frame_set)
        except OSError as error:
            self.failed = f"{error.strerror or error} writing {self.out}: recording stopped"
            self.close_shard()
            return False
        return True

    def _write(self, frame_set):
        if self.writer is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.writer = ShardWriter(self.out, f"{self.vehicle}-{self.session}-{self.shards:04d}")
        before = self.writer.bytes
        self.writer.add(f"{self.vehicle}-{frame_set.stamp_ns}", frame_set.images, stamp_ns=frame_set.stamp_ns,
                        source=self.source, vehicle=self.vehicle, qa=driving_questions(),
                        truth={"cameras_missing": frame_set.missing} if frame_set.missing else {})
        self.frames += 1
        self.bytes += self.writer.bytes - before
        if self.writer.count >= self.shard_size or self.full:
            self.close_shard()

    def close_shard(self):
        """Complete the current shard; if even that fails (disk full), drop it and keep the earlier ones."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            if writer.close() is not None:
                self.shards += 1
        except OSError as error:
            self.failed = self.failed or f"{error.strerror or error} closing a shard in {self.out}: recording stopped"
            writer.abort()
