"""The one on-disk format for calibration and QA data: shards of camera frames plus a JSONL manifest.

    <set>/
      <shard>/manifest.jsonl      one JSON object per frame set (see Sample)
      <shard>/frames/<id>_<CAMERA>.jpg
      .tmp-<shard>/               a shard being written; readers ignore it

A shard is written under a temporary name and renamed once complete (after fsync), so a crash leaves
every completed shard intact. Shard names carry the writer's vehicle id, so several vehicles can write
into one set (or one object-store prefix) without overwriting each other.
"""
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

MANIFEST = "manifest.jsonl"
TMP_PREFIX = ".tmp-"
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_name(value, what):
    """A vehicle id, shard or frame-set name that can only name a file inside its directory."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or len(value) > 200:
        raise ValueError(f"{what} {value!r} is not a safe name (letters, digits, '.', '_', '-'; not starting with '.')")
    return value


def inside(root, relative, what):
    """root / relative, refused unless it resolves (symlinks followed) inside root."""
    root = Path(root).resolve()
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise ValueError(f"{what} {relative!r} is not a relative path inside {root}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{what} {relative!r} leaves {root}")
    return path


@dataclass
class Sample:
    id: str
    cameras: dict  # camera name -> frame path relative to the shard
    stamp_ns: int = 0
    source: str = ""
    vehicle: str = ""
    qa: list = field(default_factory=list)  # [{"id", "category", "question", "answer"}]
    truth: dict = field(default_factory=dict)
    sha256: dict = field(default_factory=dict)  # camera name -> hash of the frame file
    shard: Path = None

    def images(self):
        """Camera name -> RGB uint8 array. Every frame must lie inside its shard and match its SHA-256."""
        return {camera: self.image(camera) for camera in self.cameras}

    def image(self, camera):
        where = f"frame set {self.id!r} in {self.shard}"
        path = inside(self.shard, self.cameras[camera], f"{where}: frame")
        expected = self.sha256.get(camera)
        if expected is None:
            raise ValueError(f"{where}: camera {camera} has no sha256 in the manifest")
        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{where}: frame {self.cameras[camera]} does not match its sha256 (changed or missing)")
        return decode_image(data, path)

    def to_json(self):
        return json.dumps({k: v for k, v in asdict(self).items() if k != "shard"})


def decode_image(data, path):
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ValueError(f"unreadable image: {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_jpeg(rgb, quality=95):
    # full-resolution colour (4:4:4): OpenCV's default 4:2:0 halved the saturation of a traffic light's lamp,
    # one or two pixels 30 m ahead
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [
        cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    assert ok
    return data.tobytes()


def _fsync_write(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes one shard; `close()` makes it visible atomically, `abort()` drops it."""

    def __init__(self, root, name):
        self.root = Path(root)
        self.name = check_name(name, "shard name")
        self.tmp = self.root / f"{TMP_PREFIX}{name}"
        if (self.root / name).exists():
            raise FileExistsError(f"shard already exists: {self.root / name}")
        (self.tmp / "frames").mkdir(parents=True, exist_ok=True)
        self.manifest = open(self.tmp / MANIFEST, "w")
        self.samples = []
        self.bytes = 0

    @property
    def count(self):
        return len(self.samples)

    def add(self, sample_id, images, **fields):
        """Write one frame set (camera -> RGB array) and its manifest line; returns the Sample."""
        cameras, hashes = {}, {}
        check_name(sample_id, "frame set id")
        for camera, rgb in images.items():
            check_name(camera, "camera name")
            data = encode_jpeg(rgb)
            relative = f"frames/{sample_id}_{camera}.jpg"
            _fsync_write(self.tmp / relative, data)
            cameras[camera], hashes[camera] = relative, hashlib.sha256(data).hexdigest()
            self.bytes += len(data)
        sample = Sample(id=sample_id, cameras=cameras, sha256=hashes, shard=self.tmp, **fields)
        line = sample.to_json() + "\n"
        self.manifest.write(line)
        self.manifest.flush()
        self.bytes += len(line)
        self.samples.append(sample)
        return sample

    def close(self):
        """fsync and rename to the final name; an empty shard is dropped. Returns the shard path or None."""
        self.manifest.flush()
        os.fsync(self.manifest.fileno())
        self.manifest.close()
        if self.count == 0:
            self.abort()
            return None
        _fsync_dir(self.tmp / "frames")
        _fsync_dir(self.tmp)
        final = self.root / self.name
        os.rename(self.tmp, final)
        _fsync_dir(self.root)
        for sample in self.samples:
            sample.shard = final
        return final

    def abort(self):
        if not self.manifest.closed:
            try:
                self.manifest.close()
            except OSError:  # its buffer could not be flushed (disk full): the shard is dropped anyway
                pass
        for path in sorted(self.tmp.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        self.tmp.rmdir()

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        self.close() if kind is None else self.abort()


def recover_shards(root):
    """Complete the shards a writer left unfinished (killed mid-shard): every frame set whose manifest line
    was written in full and whose frames match their SHA-256 is kept, the rest (the line being written) is
    dropped; the shard then goes visible under its name. Returns {shard name: frame sets kept}."""
    recovered = {}
    for tmp in sorted(Path(root).glob(f"{TMP_PREFIX}*")):
        manifest = tmp / MANIFEST
        kept = []
        for line in manifest.read_text(errors="replace").splitlines(keepends=True) if manifest.is_file() else []:
            try:
                sample = parse_sample(line, tmp)
                sample.images()
            except (ValueError, TypeError):
                break  # the line being written when the writer stopped, and nothing after it
            if not line.endswith("\n"):
                break
            kept.append(line)
        name = tmp.name.removeprefix(TMP_PREFIX)
        if not kept or (tmp.parent / name).exists():
            shutil.rmtree(tmp)
            continue
        _fsync_write(manifest, "".join(kept).encode())
        _fsync_dir(tmp)
        os.rename(tmp, tmp.parent / name)
        _fsync_dir(tmp.parent)
        recovered[name] = len(kept)
    return recovered


def shards(root):
    """Completed shard directories of a set, in name order (a set may also be a single shard)."""
    root = Path(root)
    manifests = [root / MANIFEST] if (root / MANIFEST).exists() else sorted(root.glob(f"*/{MANIFEST}"))
    manifests = [m for m in manifests if not m.parent.name.startswith(TMP_PREFIX)]
    for manifest in manifests:
        if not manifest.is_file():
            raise ValueError(f"{manifest} is not a file")
    return [m.parent for m in manifests]


FIELD_TYPES = {"id": str, "cameras": dict, "stamp_ns": int, "source": str, "vehicle": str, "qa": list, "truth": dict,
               "sha256": dict}


def parse_sample(line, shard):
    """One manifest line -> Sample; TypeError naming the field that has the wrong type."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise TypeError("a manifest line must be a JSON object")
    for key, kind in FIELD_TYPES.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise TypeError(f"{key} must be a JSON {'object' if kind is dict else kind.__name__}, "
                            f"not {type(data[key]).__name__}")
    if not all(isinstance(camera, str) and isinstance(path, str) for camera, path in data.get("cameras", {}).items()):
        raise TypeError("cameras must map camera names to frame paths")
    if not all(isinstance(item, dict) and isinstance(item.get("question"), str) for item in data.get("qa", [])):
        raise TypeError("every qa item must be an object with a question")
    return Sample(**data, shard=shard)


def read_samples(root):
    """All samples of a calibration/QA set. Raises ValueError naming the problem if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"calibration set not found: {root}")
    samples = []
    for shard in shards(root):
        for number, line in enumerate((shard / MANIFEST).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                samples.append(parse_sample(line, shard))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(f"bad manifest line {shard / MANIFEST}:{number}: {error}") from None
    if not samples:
        raise ValueError(f"calibration set has no samples: {root}")
    return samples


def write_synthetic(root, count, seed=0, cameras=None, height=192, width=336, shard_size=64, vehicle="sim"):
    """A synthetic driving set in the calibration format; returns the samples written."""
    from .world import CAMERAS, qa, render, sample_scene

    cameras = cameras or CAMERAS
    written = []
    for start in range(0, count, shard_size):
        with ShardWriter(root, f"{vehicle}-{seed:06d}-{start // shard_size:04d}") as writer:
            for index in range(start, min(count, start + shard_size)):
                scene = sample_scene(seed * 1_000_003 + index)
                writer.add(f"{vehicle}-{scene.seed}", render(scene, cameras, height, width),
                           stamp_ns=index * 100_000_000, source=f"synthetic:seed={seed}",
                           vehicle=vehicle, qa=qa(scene), truth=scene.truth())
        written += writer.samples
    return written
