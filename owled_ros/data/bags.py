"""rosbag2 (sqlite3 and MCAP) camera data with the pure-Python `rosbags`: write, read, import as calibration."""
import contextlib
import re
from pathlib import Path

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.errors import ReaderError
from rosbags.typesys import Stores, get_typestore

from .calib import ShardWriter, check_name
from .frames import SYNC_SLOP_S, FrameSync
from .images import ImageError, rgb_to_fields, to_rgb
from .world import CAMERAS, QUESTIONS, render, sample_scene

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
CARLA_SENSOR = {"CAM_FRONT": "rgb_front", "CAM_FRONT_LEFT": "rgb_front_left", "CAM_FRONT_RIGHT": "rgb_front_right",
                "CAM_BACK": "rgb_back", "CAM_BACK_LEFT": "rgb_back_left", "CAM_BACK_RIGHT": "rgb_back_right"}


def carla_topics(role="ego_vehicle"):
    """camera name -> CARLA ROS bridge image topic."""
    return {camera: f"/carla/{role}/{sensor}/image" for camera, sensor in CARLA_SENSOR.items()}


def image_message(rgb, stamp_ns, frame_id, encoding="bgra8"):
    height, width, encoding, step, data = rgb_to_fields(rgb, encoding)
    Image, Header, Time = (TYPESTORE.types[t] for t in (IMAGE, "std_msgs/msg/Header", "builtin_interfaces/msg/Time"))
    header = Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id)
    return Image(header=header, height=height, width=width, encoding=encoding, is_bigendian=0, step=step,
                 data=np.frombuffer(data, np.uint8))


def write_drive(path, frame_sets, storage="sqlite3", cameras=CAMERAS):
    """A multi-camera drive as a rosbag2 with the cameras' CARLA-bridge topics (bgra8, as the bridge sends).
    frame_sets: iterable of (stamp_ns, {camera: RGB uint8}); a camera missing from a set is not written."""
    topics = carla_topics()
    plugin = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}[storage]
    with Writer(Path(path), version=9, storage_plugin=plugin) as writer:
        connections = {c: writer.add_connection(topics[c], IMAGE, typestore=TYPESTORE) for c in cameras}
        for stamp_ns, images in frame_sets:
            for camera, rgb in images.items():
                message = image_message(rgb, stamp_ns, f"ego_vehicle/{CARLA_SENSOR[camera]}")
                writer.write(connections[camera], stamp_ns, TYPESTORE.serialize_cdr(message, IMAGE))
    return Path(path)


def write_synthetic_drive(path, frames=20, rate_hz=2.0, seed=0, cameras=CAMERAS, storage="sqlite3", size=(192, 336)):
    """A short drive through the 2-D world (data/world.py) as a rosbag2."""
    frame_sets = ((1_700_000_000 * 10**9 + int(i * 1e9 / rate_hz), render(sample_scene(seed * 1_000_003 + i), cameras, *size))
                  for i in range(frames))
    return write_drive(path, frame_sets, storage, cameras)


class BagError(ValueError):
    pass


@contextlib.contextmanager
def open_bag(bag):
    """An open rosbags Reader; a damaged or missing bag is a BagError naming it."""
    try:
        reader = Reader(Path(bag))
        reader.open()
    except (ReaderError, OSError) as error:
        raise BagError(f"bag {bag} cannot be read (truncated or corrupt?): {error}") from None
    try:
        yield reader
    finally:
        reader.close()


def image_topics(bag):
    """{topic: message type} of the bag's image topics, sorted by topic."""
    with open_bag(bag) as reader:
        return dict(sorted({c.topic: c.msgtype for c in reader.connections if c.msgtype in (IMAGE, COMPRESSED)}.items()))


def camera_messages(bag, topics):
    """(topic, bag time ns, message type, deserialised message) for the given topics, in bag order. A bag
    damaged part-way yields what is intact, then raises BagError."""
    with open_bag(bag) as reader:
        connections = [c for c in reader.connections if c.topic in topics]
        missing = set(topics) - {c.topic for c in connections}
        if missing:
            raise ValueError(f"bag {bag} has no topic(s) {sorted(missing)}; it has {sorted({c.topic for c in reader.connections})}")
        messages = reader.messages(connections=connections)
        while True:
            try:
                connection, timestamp, raw = next(messages)
            except StopIteration:
                return
            except (ReaderError, OSError) as error:
                raise BagError(f"bag {bag} is damaged part-way: {error}") from None
            if connection.msgtype not in (IMAGE, COMPRESSED):
                raise ValueError(f"topic {connection.topic} is {connection.msgtype}, not an image type")
            yield connection.topic, timestamp, connection.msgtype, TYPESTORE.deserialize_cdr(raw, connection.msgtype)


def import_bag(bag, out, topics=None, slop_s=SYNC_SLOP_S, vehicle="bag", shard_size=64):
    """Camera topics of a rosbag2 -> a calibration set (complete frame sets only). Returns (written, bad frames)."""
    check_name(vehicle, "vehicle id")
    topics = topics or carla_topics()
    by_topic = {topic: camera for camera, topic in topics.items()}
    bag_name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(bag).name).lstrip(".") or "bag"
    sync = FrameSync(list(topics), slop_s)
    written, bad, writer, shard, damage = 0, 0, None, 0, None
    try:
        for topic, _, msgtype, message in camera_messages(bag, list(by_topic)):
            try:
                rgb = to_rgb(message, msgtype == COMPRESSED)
            except ImageError:
                bad += 1
                continue
            stamp = message.header.stamp.sec * 10**9 + message.header.stamp.nanosec
            frame_set = sync.add(by_topic[topic], stamp, rgb)
            if frame_set is None:
                continue
            if writer is None:
                writer = ShardWriter(out, f"{vehicle}-{bag_name}-{shard:04d}")
            writer.add(f"{vehicle}-{frame_set.stamp_ns}", frame_set.images, stamp_ns=frame_set.stamp_ns,
                       source=f"bag:{Path(bag).name}", vehicle=vehicle, qa=driving_questions())
            written += 1
            if writer.count >= shard_size:
                writer.close()
                writer, shard = None, shard + 1
    except BagError as error:
        damage = error
    if writer is not None:
        writer.close()  # the frame sets read before any damage are kept
    if damage:
        raise BagError(f"{damage}; the {written} frame sets before it were imported into {out}" if written else str(damage))
    if not written:
        raise ValueError(f"bag {bag} holds no complete frame set of {sorted(topics.values())} ({bad} bad frames)")
    return written, bad


def driving_questions():
    """The driving questions paired with recorded frames (no reference answers: real frames have no ground truth)."""
    return [{"id": kind, "category": category, "question": QUESTIONS[kind]}
            for kind, category in (("perception", "perception"), ("crossing", "prediction"), ("planning", "planning"),
                                   ("behavior", "behavior"))]
