"""Fleet calibration in S3-compatible object storage (boto3; endpoint from --endpoint-url or AWS_ENDPOINT_URL).

Layout under s3://bucket/prefix/: one folder per shard, named <vehicle>-<session>-<n> by the writer, so
vehicles never write the same keys. A shard's manifest is uploaded last, so readers only see complete
shards; a shard name is claimed by a conditional put before any upload, so an existing shard is never
overwritten, even by a writer racing for the same name (a re-push of the same content is skipped by hash).
"""
import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from .calib import MANIFEST, check_name, inside, shards


CLAIM = ".claim"  # the object whose conditional put reserves a shard name for one writer


class StoreError(ValueError):
    pass


def split_url(url):
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an s3://bucket/prefix URL: {url}")
    return parsed.netloc, parsed.path.strip("/")


def client(endpoint_url=None):
    return boto3.client("s3", endpoint_url=endpoint_url)


def _key(prefix, *parts):
    return "/".join(p for p in (prefix, *parts) if p)


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def push(local_set, url, endpoint_url=None):
    """Upload the completed shards of a local set; returns the names of shards uploaded. A shard is first
    claimed with a conditional put (If-None-Match) of its manifest's digest: of two writers pushing the same
    shard name, one wins and the other gets a StoreError, so neither overwrites the other's frames."""
    bucket, prefix = split_url(url)
    if not Path(local_set).is_dir():
        raise StoreError(f"calibration set not found: {local_set}")
    s3 = client(endpoint_url)
    uploaded = []
    try:
        for shard in shards(local_set):
            digest = _digest(shard / MANIFEST)
            if not claim(s3, bucket, _key(prefix, shard.name, CLAIM), digest, f"{url}/{shard.name}"):
                continue
            for path in sorted(shard.rglob("*")):
                if path.is_file() and path.name != MANIFEST:
                    s3.upload_file(str(path), bucket, _key(prefix, shard.name, path.relative_to(shard).as_posix()))
            s3.upload_file(str(shard / MANIFEST), bucket, _key(prefix, shard.name, MANIFEST),
                           ExtraArgs={"Metadata": {"sha256": digest}})
            uploaded.append(shard.name)
    except (BotoCoreError, ClientError) as error:
        raise StoreError(f"object store {url}: {error}") from None
    return uploaded


def claim(s3, bucket, key, digest, where):
    """True if this writer holds the shard and must upload it; False if the same content is already there."""
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=digest.encode(), IfNoneMatch="*")
        return True
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
            raise
    holder = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    if holder != digest:
        raise StoreError(f"{where} is claimed by another writer with other content; refusing to overwrite")
    manifest_key = key[: -len(CLAIM)] + MANIFEST
    done = s3.list_objects_v2(Bucket=bucket, Prefix=manifest_key).get("Contents", [])
    return not done  # same content: finish an interrupted upload, or nothing to do


def pull(url, cache, endpoint_url=None):
    """Download the complete shards under url into cache (checking frame hashes); returns the local set."""
    bucket, prefix = split_url(url)
    s3 = client(endpoint_url)
    local = Path(cache)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_key(prefix) + "/" if prefix else "")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        manifests = [k for k in keys if k.endswith("/" + MANIFEST)]
        if not manifests:
            raise StoreError(f"no calibration shards under {url}")
        plan = [shard_files(local, manifest_key, keys) for manifest_key in manifests]  # every key checked first
        for target, files in plan:
            if (target / MANIFEST).is_file():
                continue
            tmp = local / f".tmp-{target.name}"
            for key, relative in files:
                path = tmp / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(path))
            check_hashes(url, target.name, tmp)
            tmp.rename(target)
    except (BotoCoreError, ClientError) as error:
        raise StoreError(f"object store {url}: {error}") from None
    return local


def shard_files(local, manifest_key, keys):
    """(local shard directory, [(key, path relative to the shard)]) of one remote shard; a StoreError names
    any key that would be written outside it (a '..', an empty or absolute part, an unsafe shard name)."""
    shard_prefix = manifest_key[: -len(MANIFEST)]
    name = shard_prefix.rstrip("/").rpartition("/")[2]
    try:
        check_name(name, "shard name")
        files = []
        for key in (k for k in keys if k.startswith(shard_prefix) and k != shard_prefix + CLAIM):
            relative = key[len(shard_prefix):]
            parts = relative.split("/")
            if any(part in ("", ".", "..") for part in parts):
                raise ValueError(f"object key {key!r} is not a plain path inside shard {name}")
            inside(Path(local) / name, relative, "object key")
            files.append((key, relative))
    except ValueError as error:
        raise StoreError(f"refusing shard {shard_prefix!r}: {error}") from None
    return Path(local) / name, files


def check_hashes(url, name, shard):
    """Every frame of a downloaded shard lies inside it and matches the manifest's SHA-256."""
    for number, line in enumerate((shard / MANIFEST).read_text().splitlines(), 1):
        try:
            sample = json.loads(line)
            frames = [(inside(shard, relative, "frame"), relative, sample["sha256"][camera])
                      for camera, relative in sample["cameras"].items()]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
            raise StoreError(f"{url}: {name}/{MANIFEST} line {number}: bad or missing cameras/sha256 ({error})") from None
        for path, relative, expected in frames:
            if not path.is_file() or _digest(path) != expected:
                raise StoreError(f"{url}: {name}/{relative} does not match its manifest hash")
