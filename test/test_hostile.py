"""Hostile inputs: no file read or written outside its directory, frames checked against their hashes,
ids that cannot name a path elsewhere, one-line errors for bad command-line values."""
import json
import subprocess
import sys

import pytest

from models import tiny_decoder
from owled_ros.data.calib import MANIFEST, read_samples, write_synthetic
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
