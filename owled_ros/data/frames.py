"""Grouping camera views into frame sets by approximate time, and a newest-only hand-off slot."""
import collections
import threading
import time
from dataclasses import dataclass, field

# Under half the period of 10 Hz cameras: a wider window would take the next set's views for this set's (at
# 10 Hz and 0.1 s, 3 of 5 frame sets were lost that way).
SYNC_SLOP_S = 0.04


@dataclass
class FrameSet:
    stamp_ns: int  # newest view's stamp
    images: dict  # camera -> RGB array
    missing: list = field(default_factory=list)
    frame_id: str = ""
    timing: dict = field(default_factory=dict)  # seconds per stage before inference, filled by the receiver


class FrameSync:
    """Collects the newest view of each camera; a set is complete when every camera has a view within
    `slop_s` of the newest. After `timeout_s` (wall time) without completion, the views at hand go out as
    a partial set with the rest reported missing.
    Views that never make it into a set are counted by why in `dropped`: replaced (a newer view of the same
    camera came first), stale (too old for the set that went out), late (their set already went out)."""

    def __init__(self, cameras, slop_s=SYNC_SLOP_S, timeout_s=1.0, clock=time.monotonic):
        self.cameras, self.slop_ns, self.timeout_s, self.clock = list(cameras), int(slop_s * 1e9), timeout_s, clock
        self.views, self.first_arrival, self.last_stamp = {}, None, None
        self.dropped = collections.Counter()
        self.lock = threading.Lock()

    def add(self, camera, stamp_ns, image, frame_id=""):
        """Returns a complete FrameSet or None."""
        with self.lock:
            if self.last_stamp is not None and stamp_ns - self.last_stamp <= self.slop_ns:
                self.dropped["late"] += 1
                return None
            self.dropped["replaced"] += camera in self.views
            self.views[camera] = (stamp_ns, image, frame_id)
            self.first_arrival = self.first_arrival or self.clock()
            return self._take() if set(self._present()) == set(self.cameras) else None

    @property
    def dropped_views(self):
        return sum(self.dropped.values())

    def poll(self):
        """A partial FrameSet once the timeout has passed, else None."""
        with self.lock:
            if self.first_arrival is None or self.clock() - self.first_arrival < self.timeout_s:
                return None
            return self._take()

    def _present(self):
        newest = max(s for s, _, _ in self.views.values())
        return {c: v for c, v in self.views.items() if newest - v[0] <= self.slop_ns}

    def _take(self):
        present = self._present()
        self.dropped["stale"] += len(self.views) - len(present)
        views = {c: present[c] for c in self.cameras if c in present}
        self.last_stamp = max(s for s, _, _ in views.values())
        frame_id = views.get(self.cameras[0], next(iter(views.values())))[2]
        self.views, self.first_arrival = {}, None
        return FrameSet(self.last_stamp, {c: img for c, (_, img, _) in views.items()},
                        [c for c in self.cameras if c not in present], frame_id)


class LatestSlot:
    """Holds only the newest item; putting over an unconsumed item counts a drop. Never grows."""

    def __init__(self):
        self.item, self.dropped = None, 0
        self.condition = threading.Condition()

    def put(self, item):
        with self.condition:
            if self.item is not None:
                self.dropped += 1
            self.item = item
            self.condition.notify()

    def take(self, timeout=None):
        with self.condition:
            if self.item is None:
                self.condition.wait(timeout)
            item, self.item = self.item, None
            return item
