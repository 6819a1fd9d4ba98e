"""Object storage (any S3): where images live, and the URLs clients get.

Why boto3's presigner: images never pass through Redis or the API; clients
fetch them straight from S3 with a signed, expiring URL (or a public base
URL when the bucket is served publicly).
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from common.errors import StorageError
from common.lifecycle import ensure_lifecycle

# User metadata saying whose an object is (S3 returns it on HEAD): a task's files carry the task id, an
# uploaded checkpoint's files their owner. An object read for a key (SD on EKS's s3:// image_link) must be
# that key's, or name no owner at all (files the operator put in the bucket).
TASK_ID_META = "task-id"
OWNER_META = "owner"


def task_metadata(task_id: str) -> dict[str, str]:
    """The metadata of a file written for a task (init image, mask, output, side file)."""
    return {TASK_ID_META: task_id}


def owner_metadata(owner: str) -> dict[str, str]:
    """The metadata of a file uploaded for a key outside any task (a checkpoint)."""
    return {OWNER_META: owner}


# Retries: botocore's "standard" mode, 3 attempts in all, with exponential backoff and jitter, on throttling
# (SlowDown, 503), 5xx answers and connection errors; what still fails is a StorageError for the caller.
_S3_CONFIG = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)


class Storage:
    """One bucket, a key prefix, and URL policy."""

    def __init__(self, settings) -> None:
        s = settings.storage
        self.settings = settings
        self.bucket = s.bucket
        self.prefix = s.prefix.strip("/")
        self.public_base_url = s.public_base_url.rstrip("/")
        self.expiry = s.presign_expiry
        creds = dict(aws_access_key_id=s.access_key or None, aws_secret_access_key=s.secret_key or None,
                     region_name=s.region)
        self.client = boto3.client("s3", endpoint_url=s.endpoint_url or None, config=_S3_CONFIG, **creds)
        public = s.public_endpoint_url or s.endpoint_url
        self.signer = self.client if public == s.endpoint_url else boto3.client(
            "s3", endpoint_url=public or None, config=_S3_CONFIG, **creds)

    def output_key(self, task_id: str, index: int, extension: str) -> str:
        """s3://{bucket}/{prefix}/{task_id}/{n}.{ext}"""
        return f"{self.prefix}/{task_id}/{index}.{extension}"

    def input_key(self, task_id: str, name: str) -> str:
        return f"{self.prefix}/{task_id}/input/{name}"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet, then set its lifecycle rules (common/lifecycle.py).

        A server that refuses the rules is warned about, never fatal: outputs then stay until the operator's own rule.
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StorageError(f"cannot create bucket {self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"object store unreachable: {exc}") from exc
        ensure_lifecycle(self.client, self.bucket, self.settings)

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                                   Metadata=metadata or {})
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"upload of {key} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"download of {key} failed: {exc}") from exc

    def open_stream(self, key: str) -> BinaryIO:
        """An object's bytes as a stream read as it arrives (a model archive is unpacked S3 to S3, never held)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"download of {key} failed: {exc}") from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of an object from `start` (a ranged GET: a checkpoint's header, not its gigabytes)."""
        if length <= 0:
            return b""
        response = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        return response["Body"].read()

    def url_for(self, key: str) -> str:
        """A URL a client can GET: public base URL, else a presigned one."""
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key)}"
        return self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expiry)

    def s3_uri(self, key: str) -> str:
        """`s3://bucket/key`: how the dialects name a location in their answers (not a URL a client fetches)."""
        return f"s3://{self.bucket}/{key}"

    def upload_url(self, key: str) -> str:
        """A presigned PUT URL for one object (a dataset's file: clients upload it straight to S3)."""
        return self.signer.generate_presigned_url("put_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=self.expiry)

    # --- large files (model checkpoints) -------------------------------------------
    def start_multipart(self, key: str, metadata: dict[str, str] | None = None) -> str:
        """Open a multipart upload for `key` (the finished object carries `metadata`); its upload id."""
        try:
            return self.client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                       Metadata=metadata or {})["UploadId"]
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot start the upload of {key}: {exc}") from exc

    def part_urls(self, key: str, upload_id: str, parts: int) -> list[str]:
        """Presigned PUT URLs for parts 1..parts (clients upload straight to S3 and keep each ETag)."""
        return [self.signer.generate_presigned_url(
            "upload_part", Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": n},
            ExpiresIn=self.expiry) for n in range(1, parts + 1)]

    def uploaded_parts(self, key: str, upload_id: str) -> list[dict]:
        """[{ETag, PartNumber}] of the parts S3 holds for an open upload."""
        try:
            pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id)
            return [{"ETag": p["ETag"], "PartNumber": p["PartNumber"]} for page in pages for p in page.get("Parts", [])]
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot list the parts of {key}: {exc}") from exc

    def finish_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None:
        """Complete an upload from its parts (sorted by PartNumber, as S3 requires)."""
        ordered = sorted(({"ETag": str(p["ETag"]), "PartNumber": int(p["PartNumber"])} for p in parts),
                         key=lambda p: p["PartNumber"])
        try:
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": ordered})
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot complete the upload of {key}: {exc}") from exc

    def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """(size, user metadata) of an object, or None when there is none."""
        try:
            found = self.client.head_object(Bucket=self.bucket, Key=key)
            return int(found["ContentLength"]), dict(found.get("Metadata") or {})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"cannot stat {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot stat {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def delete(self, keys: list[str]) -> None:
        """Delete objects (1000 per request, S3's maximum); StorageError when S3 refuses."""
        try:
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start:start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot delete {len(keys)} object(s): {exc}") from exc

    def put_stream(self, key: str, stream: BinaryIO, metadata: dict[str, str] | None = None) -> None:
        """Upload a stream of unknown length (boto3 switches to multipart for big ones)."""
        try:
            self.client.upload_fileobj(stream, self.bucket, key, ExtraArgs={"Metadata": metadata or {}})
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"upload of {key} failed: {exc}") from exc

    def download(self, key: str, path: Path) -> None:
        """Copy an object to a local file (ranged, parallel for big ones)."""
        try:
            self.client.download_file(self.bucket, key, str(path))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"download of {key} failed: {exc}") from exc
