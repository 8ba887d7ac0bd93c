"""Hostile inputs: no file read or written outside its directory, frames checked against their hashes,
ids that cannot name a path elsewhere, one-line errors for bad command-line values."""
import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import tiny_decoder
from owled_ros.data.calib import MANIFEST, decode_image, encode_jpeg, read_samples, write_synthetic
from owled_ros.data.recorder import ShardRecorder
from owled_ros.pruning.run import prune


def small_set(root, count=2, vehicle="car1"):
    write_synthetic(root, count, seed=1, vehicle=vehicle, height=32, width=48)
    return next(root.glob(f"*/{MANIFEST}")).parent


def rewrite_manifest(shard, change):
    lines = [json.loads(line) for line in (shard / MANIFEST).read_text().splitlines()]
    change(lines[0])
    (shard / MANIFEST).write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_pull_refuses_keys_that_leave_the_target_and_writes_nothing_outside(tmp_path, s3_server):
    import boto3

    from owled_ros.data.store import StoreError, pull, push

    push(small_set(tmp_path / "car1"), "s3://fleet/fleet")
    s3 = boto3.client("s3")
    outside = tmp_path / "outside.txt"
    depth = len((tmp_path / "pulled").parts)
    for key in [f"fleet/car1-000001-0000/{'../' * depth}{outside.relative_to('/')}",
                f"fleet/car1-000001-0000//{outside}"]:
        s3.put_object(Bucket="fleet", Key=key, Body=b"x")
        with pytest.raises(StoreError, match="refusing shard"):
            pull("s3://fleet/fleet", tmp_path / "pulled")
        assert not outside.exists() and not (tmp_path / "pulled").exists()
        s3.delete_object(Bucket="fleet", Key=key)
    s3.put_object(Bucket="fleet", Key="fleet/../manifest.jsonl", Body=b"{}")  # a shard named '..'
    with pytest.raises(StoreError, match="not a safe name"):
        pull("s3://fleet/fleet", tmp_path / "pulled")
    s3.delete_object(Bucket="fleet", Key="fleet/../manifest.jsonl")  # the store outlives this test


def test_pull_names_a_manifest_without_hashes(tmp_path, s3_server):
    import boto3

    from owled_ros.data.store import StoreError, pull

    shard = small_set(tmp_path / "car1")
    rewrite_manifest(shard, lambda line: line.pop("sha256"))
    s3 = boto3.client("s3")
    for path in shard.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "fleet", f"nohash/{shard.name}/{path.relative_to(shard).as_posix()}")
    with pytest.raises(StoreError, match="line 1: bad or missing cameras/sha256"):
        pull("s3://fleet/nohash", tmp_path / "pulled")


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_frames_outside_their_shard_are_refused(tmp_path, where):
    shard = small_set(tmp_path / "set")
    secret = tmp_path / "outside.jpg"
    first = json.loads((shard / MANIFEST).read_text().splitlines()[0])
    secret.write_bytes((shard / first["cameras"]["CAM_FRONT"]).read_bytes())  # a valid image, same hash
    if where == "symlink":
        (shard / first["cameras"]["CAM_FRONT"]).unlink()
        (shard / first["cameras"]["CAM_FRONT"]).symlink_to(secret)
    else:
        path = "../outside.jpg" if where == "parent" else str(secret)
        rewrite_manifest(shard, lambda line: line["cameras"].update(CAM_FRONT=path))
    with pytest.raises(ValueError, match="leaves|not a relative path"):
        read_samples(tmp_path / "set")[0].images()


def test_a_replaced_frame_is_refused_naming_shard_and_frame(tmp_path):
    shard = small_set(tmp_path / "set", count=4)
    tiny_decoder().save_pretrained(tmp_path / "model")
    first = prune(tmp_path / "model", tmp_path / "a", "owled", "0.5", tmp_path / "set", nsamples=4, progress=False)
    frame = sorted((shard / "frames").iterdir())[0]
    frame.write_bytes(sorted((shard / "frames").iterdir())[-1].read_bytes())  # another valid image
    with pytest.raises(ValueError, match=rf"{shard.name}.*{frame.name} does not match its sha256"):
        prune(tmp_path / "model", tmp_path / "b", "owled", "0.5", tmp_path / "set", nsamples=4, progress=False)
    assert not (tmp_path / "b").exists()
    assert len(first["calibration"]["sha256"]) == 64


@pytest.mark.parametrize("vehicle", ["../../X", "a/b", ".hidden", ""])
def test_vehicle_ids_cannot_name_another_directory(tmp_path, vehicle):
    out = tmp_path / "deep" / "out"
    result = subprocess.run([sys.executable, "-m", "owled_ros.cli", "calib", "synth", str(out), "--count", "1",
                             "--vehicle", vehicle], capture_output=True, text=True)
    assert result.returncode == 2 and "not a safe name" in result.stderr and len(result.stderr.splitlines()) == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    with pytest.raises(ValueError, match="not a safe name"):
        ShardRecorder(out, vehicle)


def owled(*args):
    return subprocess.run([sys.executable, "-m", "owled_ros.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["prune", "--out", "OUT", "--nsamples", "0"], "--nsamples: 0 is not in [1, ∞)"),
    (["prune", "--out", "OUT", "--lam", "0.7"], "lambda 0.7 is outside (0, 0.5)"),
    (["prune", "--out", "OUT", "--M", "nan"], "M nan must be a finite number above 0"),
    (["prune", "--out", "OUT", "--M", "-1"], "M -1.0 must be a finite number above 0"),
    (["eval", "--stride", "-1"], "--stride: -1 is not in [1, ∞)"),
    (["eval", "--context", "0"], "--context: 0 is not in [2, ∞)"),
    (["calib", "synth", "OUT", "--count", "-5"], "--count: -5 is not in [1, ∞)"),
    (["calib", "from-bag", "BAG", "OUT", "--slop", "-1"], "--slop: -1 is not in [0.0, ∞)"),
    (["calib", "from-bag", "BAG", "OUT", "--topics", "/a", "/b", "--cameras", "CAM_FRONT"], "2 --topics for 1 --cameras"),
    (["calib", "push", "MISSING", "s3://fleet/x"], "calibration set not found"),
    (["replay", "BAG", "--rate", "nan"], "--rate: nan is not in (0.0, ∞)"),
    (["answer", "--frames", "SET", "--index", "99"], "--index 99 is out of range"),
    (["bench", "--out", "OUT", "--methods", "wanda", "foo"], "--methods: invalid choice: 'foo'"),
    (["bench", "--out", "OUT", "--sparsities", "0.5", "1.5"], "--sparsities: 1.5 is not in (0.0, 1.0)"),
    (["bench", "--out", "OUT", "--sparsities", "0.5", "--skip", "wanda-0.6"], "--skip wanda-0.6: not a run of this plan"),
])
def test_bad_command_line_values_give_one_line_and_exit_2(tmp_path, args, message):
    small_set(tmp_path / "set")
    paths = {"OUT": tmp_path / "out", "BAG": tmp_path / "bag", "MISSING": tmp_path / "missing", "SET": tmp_path / "set"}
    result = owled(*[paths.get(a, a) for a in args])
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,message", [
    (lambda line: line.update(cameras=["CAM_FRONT"]), "cameras must be a JSON object, not list"),
    (lambda line: line.update(cameras="x.jpg"), "cameras must be a JSON object, not str"),
    (lambda line: line.update(cameras=7), "cameras must be a JSON object, not int"),
    (lambda line: line.update(qa="What now?"), "qa must be a JSON list, not str"),
    (lambda line: line.update(qa=[{"answer": "Stop."}]), "every qa item must be an object with a question"),
    (lambda line: line.update(stamp_ns="soon"), "stamp_ns must be a JSON int, not str"),
])
def test_manifests_with_wrong_types_name_the_line_and_field(tmp_path, change, message):
    shard = small_set(tmp_path / "set")
    rewrite_manifest(shard, change)
    with pytest.raises(ValueError, match=rf"{MANIFEST}:1: {message}"):
        read_samples(tmp_path / "set")


def test_a_manifest_that_is_a_directory_and_an_empty_bag_are_named(tmp_path):
    from owled_ros.data.bags import import_bag, write_synthetic_drive

    (tmp_path / "set" / "shard" / MANIFEST).mkdir(parents=True)
    with pytest.raises(ValueError, match="manifest.jsonl is not a file"):
        read_samples(tmp_path / "set")
    bag = write_synthetic_drive(tmp_path / "bag", frames=0, size=(32, 48))  # topics, no messages
    with pytest.raises(ValueError, match="no complete frame set"):
        import_bag(bag, tmp_path / "calib")
    assert not (tmp_path / "calib").exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile") / "tiny"
    tiny_decoder().save_pretrained(directory)
    return directory


def broken_copy(tiny_dir, tmp_path, config=None, weights=None):
    import shutil

    from owled_ros.model.checkpoint import load_weights, save_weights

    target = tmp_path / "model"
    shutil.copytree(tiny_dir, target)
    if config:
        data = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps(config(data)))
    if weights:
        state = load_weights(target / "model.safetensors")
        weights(state)
        save_weights(target / "model.safetensors", state)
    return target


def edit(path, value):
    """A config change: set the dotted key to value (None deletes it)."""
    def change(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
        return config
    return change


@pytest.mark.parametrize("config,message", [
    (edit("lm.hidden_size", 10**7), "does not match config.json"),
    (edit("lm.num_hidden_layers", 10**5), "lm.model.layers has 100000 layers in config.json, 3 in the weights"),
    (lambda c: [c], "must be a JSON object"),
    (edit("lm", None), "'lm' is missing"),
    (edit("vision", None), "'vision' is missing"),
    (edit("lm.model_type", None), "lm.model_type is missing"),
    (edit("vision.patch", 0), "vision.patch 0 is not a positive integer"),
    (edit("vision.tag_dropout", 1), "vision.tag_dropout 1 is not a number in [0, 1)"),
    (edit("vision.tag_rules", {"action": ["action"]}), "vision.tag_rules {'action': ['action']} is not {tag: [other tags]}"),
    (edit("vision.tag_view_hidden", -1), "vision.tag_view_hidden -1 is not a non-negative integer"),
    (edit("vision.crops.0.camera", "CAM_ROOF"), "vision.crops [{'camera': 'CAM_ROOF'"),
    (edit("vision.crops.1.tags", ["weather"]), "is not a list of {camera: one of vision.cameras"),
    (edit("vision.crops.1.strides", [0]), "'strides': [0]"),
    (edit("vision.crops.1.tap", -1), "'tap': -1"),
    (edit("vision.crops.1.grid", [3]), "grid: [rows, columns], dropout: in [0, 1)]}"),
    (edit("vision.crops.1.tap", 2), "vision.crops: tap 2 is not a block of the stem (it has 2 blocks)"),
    (edit("vision.crop", {"camera": "CAM_FRONT"}), "vision.crop is the form before vision.crops"),
    (edit("family", "t5"), "lm.encoder.block has None layers"),
])
def test_a_config_that_does_not_fit_its_weights_is_refused_before_building(tiny_dir, tmp_path, config, message):
    from owled_ros.model.vlm import DrivingVLM, ModelLoadError

    with pytest.raises(ModelLoadError, match=re.escape(message)):
        DrivingVLM.from_pretrained(broken_copy(tiny_dir, tmp_path, config=config))


@pytest.mark.parametrize("weights,message", [
    (lambda s: s.update({"lm.model.norm.weight": torch.ones(65)}), "lm.model.norm.weight (65,) (config: (64,))"),
    (lambda s: s["lm.model.layers.0.mlp.up_proj.weight"].fill_(float("nan")), "up_proj.weight holds NaN"),
    (lambda s: s.update({"lm.model.norm.weight": torch.ones(64, dtype=torch.int64)}), "norm.weight holds torch.int64"),
])
def test_weights_of_the_wrong_shape_type_or_value_are_refused(tiny_dir, tmp_path, weights, message):
    from owled_ros.model.vlm import DrivingVLM, ModelLoadError

    with pytest.raises(ModelLoadError, match=re.escape(message)):
        DrivingVLM.from_pretrained(broken_copy(tiny_dir, tmp_path, weights=weights))


def test_two_writers_racing_for_one_shard_name_one_wins_and_nothing_mixes(tmp_path, s3_server):
    import threading

    from owled_ros.data.store import StoreError, pull, push

    write_synthetic(tmp_path / "a", 6, seed=7, vehicle="car1", height=32, width=48)
    write_synthetic(tmp_path / "b", 6, seed=7, vehicle="car1", height=32, width=48)  # the same shard name...
    shard = next((tmp_path / "b").iterdir())

    def invert(line):  # ...and other frames under the same names
        for camera, relative in line["cameras"].items():
            data = encode_jpeg(255 - decode_image((shard / relative).read_bytes(), relative))
            (shard / relative).write_bytes(data)
            line["sha256"][camera] = hashlib.sha256(data).hexdigest()
    lines = [json.loads(line) for line in (shard / MANIFEST).read_text().splitlines()]
    for line in lines:
        invert(line)
    (shard / MANIFEST).write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = {}

    def writer(name):
        try:
            results[name] = push(tmp_path / name, "s3://fleet/race")
        except StoreError as error:
            results[name] = error
    threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [name for name, result in results.items() if isinstance(result, list) and result]
    losers = [name for name, result in results.items() if isinstance(result, StoreError)]
    assert len(winners) == 1 and len(losers) == 1 and "claimed by another writer" in str(results[losers[0]])
    pulled = read_samples(pull("s3://fleet/race", tmp_path / "pulled"))  # frames match the winner's hashes
    assert [s.to_json() for s in pulled] == [s.to_json() for s in read_samples(tmp_path / winners[0])]


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_truncated_bag_is_a_one_line_error(tmp_path, storage):
    from owled_ros.data.bags import write_synthetic_drive

    bag = write_synthetic_drive(tmp_path / "bag", frames=4, storage=storage, size=(32, 48))
    data = next(p for p in bag.iterdir() if p.suffix in (".db3", ".mcap"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size * 6 // 10])
    for command in (["calib", "from-bag", bag, tmp_path / "out"], ["replay", bag]):
        result = owled(*command)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "cannot be read (truncated or corrupt?)" in result.stderr


def test_views_that_never_reach_a_frame_set_are_counted():
    from owled_ros.data.frames import FrameSync

    now, ms = [0.0], 10**6
    sync = FrameSync(["CAM_FRONT", "CAM_BACK"], slop_s=0.04, timeout_s=1.0, clock=lambda: now[0], queue_size=2)
    assert sync.add("CAM_FRONT", 1000 * ms, "a") is None
    assert sync.add("CAM_BACK", 1100 * ms, "b") is None
    assert sync.add("CAM_FRONT", 1110 * ms, "c").images == {"CAM_FRONT": "c", "CAM_BACK": "b"}
    assert sync.dropped == {"stale": 1}  # "a": the back camera had moved past it
    assert sync.add("CAM_BACK", 1130 * ms, "late") is None and sync.dropped["late"] == 1  # its set went out
    for stamp in (1200, 1300, 1400):  # the back camera is silent: the front queue (2 views) overflows
        assert sync.add("CAM_FRONT", stamp * ms, stamp) is None
    assert sync.poll() is None and sync.dropped["replaced"] == 1
    now[0] = 1.0
    partial = sync.poll()
    assert partial.images == {"CAM_FRONT": 1400} and partial.missing == ["CAM_BACK"]
    assert sync.dropped == {"stale": 2, "late": 1, "replaced": 1} and sync.dropped_views == 4  # 1300: stale
    assert sync.unmade == 3  # the front camera's 1000, 1200 and 1300 went out in no set
    assert sync.poll() is None


def test_views_arriving_out_of_step_across_cameras_all_reach_their_sets():
    """The front camera's next view arrives before the back camera's current one (topics are delivered
    independently): both sets still come out, each with its own views."""
    from owled_ros.data.frames import FrameSync

    sync, ms = FrameSync(["CAM_FRONT", "CAM_BACK"]), 10**6
    arrivals = [("CAM_FRONT", 0, "f0"), ("CAM_FRONT", 100, "f1"), ("CAM_BACK", 10, "b0"), ("CAM_FRONT", 200, "f2"),
                ("CAM_BACK", 95, "b1"), ("CAM_BACK", 210, "b2")]
    sets = [s.images for camera, stamp, image in arrivals if (s := sync.add(camera, stamp * ms, image))]
    assert sets == [{"CAM_FRONT": f"f{k}", "CAM_BACK": f"b{k}"} for k in range(3)]
    assert sync.dropped_views == 0 and sync.unmade == 0


def test_a_camera_that_stops_is_missing_once_and_used_again_when_it_comes_back():
    from owled_ros.data.frames import FrameSync

    now, ms = [0.0], 10**6
    sync = FrameSync(["CAM_FRONT", "CAM_BACK", "CAM_LEFT"], timeout_s=1.0, clock=lambda: now[0])
    add_set = lambda stamp, cameras: [sync.add(c, stamp * ms, f"{c}-{stamp}") for c in cameras][-1]
    assert add_set(0, ["CAM_FRONT", "CAM_BACK", "CAM_LEFT"]).missing == []
    assert add_set(100, ["CAM_FRONT", "CAM_BACK"]) is None  # the left camera stopped: this set waits once
    now[0] = 1.0
    first = sync.poll()
    assert first.missing == ["CAM_LEFT"] and set(first.images) == {"CAM_FRONT", "CAM_BACK"} and sync.absent == {"CAM_LEFT"}
    later = add_set(200, ["CAM_FRONT", "CAM_BACK"])  # no waiting from now on
    assert later is not None and later.missing == ["CAM_LEFT"] and later.stamp_ns == 200 * ms
    assert sync.add("CAM_LEFT", 300 * ms, "back") is None and not sync.absent  # it came back: sets wait for it again
    assert add_set(300, ["CAM_FRONT", "CAM_BACK"]).images == {"CAM_FRONT": "CAM_FRONT-300", "CAM_BACK": "CAM_BACK-300",
                                                              "CAM_LEFT": "back"}


def test_ten_hz_cameras_give_every_frame_set_with_the_default_slop():
    """Six views a set, sets 0.1 s apart, each view up to 15 ms off its set's time, arriving in stamp order:
    every set comes out complete, with its own views (a 0.1 s slop took the next set's views as late)."""
    from owled_ros.data.frames import FrameSync

    cameras = [f"CAM_{i}" for i in range(6)]
    sync, rng = FrameSync(cameras), np.random.default_rng(0)
    views = sorted((k * 10**8 + int(rng.integers(-15, 16)) * 10**6, camera, k) for k in range(50) for camera in cameras)
    sets = [s for stamp, camera, k in views if (s := sync.add(camera, stamp, k)) is not None]
    assert [sorted(set(s.images.values())) for s in sets] == [[k] for k in range(50)]
    assert sync.dropped_views == 0
