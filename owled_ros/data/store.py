"""Fleet calibration in S3-compatible object storage (boto3; endpoint from --endpoint-url or AWS_ENDPOINT_URL).

Layout under s3://bucket/prefix/: one folder per shard, named <vehicle>-<session>-<n> by the writer, so
vehicles never write the same keys. A shard's manifest is uploaded last, so readers only see complete
shards; an existing shard is never overwritten (a re-push of the same content is skipped by hash).
"""
import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from .calib import MANIFEST, shards


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
    """Upload the completed shards of a local set; returns the names of shards uploaded."""
    bucket, prefix = split_url(url)
    s3 = client(endpoint_url)
    uploaded = []
    try:
        for shard in shards(local_set):
            manifest_key = _key(prefix, shard.name, MANIFEST)
            existing = s3.list_objects_v2(Bucket=bucket, Prefix=manifest_key).get("Contents", [])
            if existing:
                remote = s3.head_object(Bucket=bucket, Key=manifest_key)["Metadata"].get("sha256")
                if remote != _digest(shard / MANIFEST):
                    raise StoreError(f"{url}/{shard.name} exists with other content; refusing to overwrite")
                continue
            for path in sorted(shard.rglob("*")):
                if path.is_file() and path.name != MANIFEST:
                    s3.upload_file(str(path), bucket, _key(prefix, shard.name, path.relative_to(shard).as_posix()))
            s3.upload_file(str(shard / MANIFEST), bucket, manifest_key,
                           ExtraArgs={"Metadata": {"sha256": _digest(shard / MANIFEST)}})
            uploaded.append(shard.name)
    except (BotoCoreError, ClientError) as error:
        raise StoreError(f"object store {url}: {error}") from None
    return uploaded


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
        for manifest_key in manifests:
            shard_prefix = manifest_key[: -len(MANIFEST)]
            target = local / Path(shard_prefix).name
            if (target / MANIFEST).is_file():
                continue
            tmp = local / f".tmp-{target.name}"
            for key in (k for k in keys if k.startswith(shard_prefix)):
                path = tmp / key[len(shard_prefix):]
                path.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(path))
            for line in (tmp / MANIFEST).read_text().splitlines():
                sample = json.loads(line)
                for camera, relative in sample["cameras"].items():
                    if _digest(tmp / relative) != sample["sha256"][camera]:
                        raise StoreError(f"{url}: {shard_prefix}{relative} does not match its manifest hash")
            tmp.rename(target)
    except (BotoCoreError, ClientError) as error:
        raise StoreError(f"object store {url}: {error}") from None
    return local
