"""Grouping camera views into frame sets by approximate time, and a newest-only hand-off slot."""
import bisect
import collections
import threading
import time
from dataclasses import dataclass, field

# Under half the period of 10 Hz cameras: a wider window would take the next set's views for this set's (at
# 10 Hz and 0.1 s, 3 of 5 frame sets were lost that way).
SYNC_SLOP_S = 0.04
QUEUE_SIZE = 5  # views per camera awaiting their set: half a second at 10 Hz


@dataclass
class FrameSet:
    stamp_ns: int  # newest view's stamp
    images: dict  # camera -> RGB array
    missing: list = field(default_factory=list)
    frame_id: str = ""
    timing: dict = field(default_factory=dict)  # seconds per stage before inference, filled by the receiver


class FrameSync:
    """Groups views of several cameras into frame sets by approximate time, as message_filters'
    ApproximateTime does: each camera has a short queue, and a set goes out when every camera's oldest queued
    view lies within `slop_s` of the others, so a camera whose next view arrives before another camera's
    current one loses nothing. After `timeout_s` (wall time) without a complete set, the cameras with no view
    waiting are taken as absent (`absent`): sets go out without them at once from then on, reporting them
    missing, until they send again. Should the others still not make a set, the newest views at hand go out.
    Views that never make it into a set are counted by why in `dropped`: replaced (pushed out of a full queue),
    stale (no view of some other camera lies within the slop), late (their set already went out). `unmade` counts
    the frame sets lost that way: the views of the camera that sent most, less the sets that went out."""

    def __init__(self, cameras, slop_s=SYNC_SLOP_S, timeout_s=1.0, clock=time.monotonic, queue_size=QUEUE_SIZE):
        self.cameras, self.slop_ns, self.timeout_s, self.clock = list(cameras), int(slop_s * 1e9), timeout_s, clock
        self.queues = {camera: collections.deque() for camera in self.cameras}
        self.queue_size, self.pending_since, self.last_stamp = queue_size, None, None
        self.absent, self.dropped = set(), collections.Counter()
        self.received, self.handed_out = collections.Counter(), 0
        self.lock = threading.Lock()

    def add(self, camera, stamp_ns, image, frame_id=""):
        """Returns a complete FrameSet or None."""
        with self.lock:
            self.received[camera] += 1
            if self._late(stamp_ns):
                self.dropped["late"] += 1
                return None
            queue = self.queues[camera]
            if len(queue) == self.queue_size:
                queue.popleft()
                self.dropped["replaced"] += 1
            bisect.insort(queue, (stamp_ns, image, frame_id), key=lambda view: view[0])
            self.absent.discard(camera)
            self.pending_since = self.pending_since or self.clock()
            return self._handed_out(self._complete())

    @property
    def dropped_views(self):
        return sum(self.dropped.values())

    @property
    def unmade(self):
        return max(self.received.values(), default=0) - self.handed_out

    def poll(self):
        """Once the timeout has passed: a set without the absent cameras, else the newest partial one; or None."""
        with self.lock:
            if self.pending_since is None or self.clock() - self.pending_since < self.timeout_s:
                return None
            self.absent |= {camera for camera, queue in self.queues.items() if not queue}
            sets = []
            while (complete := self._complete()) is not None:
                sets.append(complete)
            self.dropped["stale"] += sum(len(older.images) for older in sets[:-1])  # the newest set supersedes them
            if sets or not any(self.queues.values()):
                return self._handed_out(sets[-1] if sets else None)
            newest = max(queue[-1][0] for queue in self.queues.values() if queue)
            views = {}
            for camera, queue in self.queues.items():
                if queue and newest - queue[-1][0] <= self.slop_ns:
                    views[camera] = queue.pop()
            return self._handed_out(self._emit(views))

    def _handed_out(self, frame_set):
        self.handed_out += frame_set is not None
        return frame_set

    def _late(self, stamp_ns):
        return self.last_stamp is not None and stamp_ns - self.last_stamp <= self.slop_ns

    def _complete(self):
        """The oldest complete set of queue heads of the cameras not absent; heads that can no longer complete
        a set are dropped."""
        present = {camera: queue for camera, queue in self.queues.items() if camera not in self.absent}
        while present and all(present.values()):
            heads = {camera: queue[0] for camera, queue in present.items()}
            oldest = min(heads, key=lambda camera: heads[camera][0])
            if max(s for s, _, _ in heads.values()) - heads[oldest][0] <= self.slop_ns:
                for queue in present.values():
                    queue.popleft()
                return self._emit(heads)
            self.queues[oldest].popleft()  # every other camera has moved past it
            self.dropped["stale"] += 1
        return None

    def _emit(self, views):
        self.last_stamp = max(s for s, _, _ in views.values())
        for queue in self.queues.values():
            while queue and self._late(queue[0][0]):
                stamp_ns = queue.popleft()[0]
                self.dropped["stale" if stamp_ns < self.last_stamp - self.slop_ns else "late"] += 1
        self.pending_since = self.clock() if any(self.queues.values()) else None
        frame_id = views.get(self.cameras[0], next(iter(views.values())))[2]
        return FrameSet(self.last_stamp, {c: views[c][1] for c in self.cameras if c in views},
                        [c for c in self.cameras if c not in views], frame_id)


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
