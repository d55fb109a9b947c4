"""Fetch a model URI into a folder: the init container of runtime pods whose model is a URI.

    python3 -m pagedserve.operator.fetch hf://org/name@revision /models/model
    python3 -m pagedserve.operator.fetch s3://bucket/prefix /models/model
    python3 -m pagedserve.operator.fetch file:///srv/models/smollm2 /models/model

A folder that already holds a completed fetch of the same URI (a marker file) is left alone, so a
restarted pod with a persistent cache does not download again.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

MARKER = ".pagedserve-fetched"


class FetchError(Exception):
    pass


def fetch(uri: str, dest: pathlib.Path) -> pathlib.Path:
    marker = dest / MARKER
    if marker.exists() and marker.read_text() == uri:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    if uri.startswith("file://"):
        shutil.copytree(uri[len("file://"):], dest, dirs_exist_ok=True)
    elif uri.startswith("hf://"):
        _fetch_hf(uri[len("hf://"):], dest)
    elif uri.startswith("s3://"):
        _fetch_s3(uri[len("s3://"):], dest)
    else:
        raise FetchError(f"unsupported model URI {uri!r}: use hf://, s3:// or file://")
    marker.write_text(uri)
    return dest


def _fetch_hf(ref: str, dest: pathlib.Path) -> None:
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise FetchError("hf:// needs the huggingface_hub package in the runtime image") from exc
    snapshot_download(repo_id=repo, revision=revision or None, local_dir=str(dest))


def _fetch_s3(ref: str, dest: pathlib.Path) -> None:
    bucket, _, prefix = ref.partition("/")
    try:
        import boto3
    except ImportError as exc:
        raise FetchError("s3:// needs the boto3 package in the runtime image") from exc
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            target = dest / item["Key"][len(prefix):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m pagedserve.operator.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("uri")
    parser.add_argument("dest", type=pathlib.Path)
    args = parser.parse_args(argv)
    try:
        fetch(args.uri, args.dest)
    except FetchError as exc:
        print(f"fetch failed: {exc}", file=sys.stderr)
        return 2
    print(f"fetched {args.uri} into {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
