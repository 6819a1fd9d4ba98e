"""Training datasets (the AWS SD extension's datasets, and the native /api/v1/datasets), recorded in Redis.

Why: a training job reads a set of images with captions. Clients upload the
files straight into S3 with presigned PUT URLs (the bytes never pass through
the API); the record (items, status, captions) lives in Redis under the key
that created it. A dataset is Enabled only after every file was checked in
S3 (api/datasets.py); a training job reads only Enabled datasets.

Names are per key: two keys may each have a `faces` dataset, and another
key's dataset does not exist for anyone else (the same answers as a missing
one), so the key's owner hash is part of the Redis key and of the S3 prefix.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from common.store import keys
from common.store.checkpoints import FILENAME

STATUSES = ("Initialed", "Enabled", "Disabled")
ITEM_TYPES = ("image", "text")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TEXT_SUFFIXES = (".txt", ".caption")


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a dataset name, else None."""
    if not NAME.match(name) or ".." in name:
        return f"{name!r} is not a dataset name (letters, digits, '_.-', at most 100, starting with a letter or digit)"
    return None


def item_name_problem(name: str) -> str | None:
    """Why `name` cannot be a file of a dataset (a plain file name with an image or caption suffix), else None."""
    if not FILENAME.match(name) or ".." in name:     # the same plain names as checkpoint files
        return f"{name!r} is not a plain file name (letters, digits, ' ._-()+[]', at most 200)"
    if not name.lower().endswith(IMAGE_SUFFIXES + TEXT_SUFFIXES):
        return f"{name!r} must be an image ({', '.join(IMAGE_SUFFIXES)}) or a caption ({', '.join(TEXT_SUFFIXES)})"
    return None


def item_type(name: str) -> str:
    return "text" if name.lower().endswith(TEXT_SUFFIXES) else "image"


@dataclass
class DatasetItem:
    """One file of a dataset: where it is in S3, and what the check found (caption, size)."""

    name: str
    type: str
    key: str
    status: str = "Initialed"
    caption: str | None = None          # an image's caption: the request's, or its .txt file's once checked
    width: int = 0
    height: int = 0
    size: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass
class Dataset:
    name: str
    owner: str
    prefix: str
    items: list[DatasetItem]
    status: str = "Initialed"
    params: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def images(self) -> list[DatasetItem]:
        return [item for item in self.items if item.type == "image"]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Dataset":
        return cls(**{**data, "items": [DatasetItem(**item) for item in data["items"]]})


class DatasetStore:
    """Dataset records: one JSON value each, indexed per owner by creation time."""

    def __init__(self, client: redis.Redis, key_prefix: str):
        self.client = client
        self.key_prefix = key_prefix.strip("/")

    def new(self, name: str, owner: str, files: list[dict[str, Any]], params: dict[str, Any]) -> Dataset:
        """A record in Initialed for `files` ({"name", "caption"?, "params"?}); objects at {prefix}/{owner}/{name}/."""
        prefix = f"{self.key_prefix}/{owner}/{name}"
        items = [DatasetItem(f["name"], item_type(f["name"]), f"{prefix}/{f['name']}", caption=f.get("caption"),
                             params=dict(f.get("params") or {})) for f in files]
        return Dataset(name, owner, prefix, items, params=dict(params))

    def save(self, dataset: Dataset) -> None:
        pipe = self.client.pipeline()
        pipe.set(keys.DATASET(dataset.owner, dataset.name), json.dumps(asdict(dataset)))
        pipe.zadd(keys.DATASETS(dataset.owner), {dataset.name: dataset.created})
        pipe.execute()

    def create(self, dataset: Dataset) -> bool:
        """Save a new dataset; False (nothing written) when the key has one of that name already."""
        if not self.client.set(keys.DATASET(dataset.owner, dataset.name), json.dumps(asdict(dataset)), nx=True):
            return False
        self.client.zadd(keys.DATASETS(dataset.owner), {dataset.name: dataset.created})
        return True

    def get(self, owner: str, name: str) -> Dataset | None:
        """`owner`'s dataset called `name`; None when it has none (whoever else has one of that name)."""
        raw = self.client.get(keys.DATASET(owner, name))
        return Dataset.from_dict(json.loads(raw)) if raw else None

    def lock(self, owner: str, name: str) -> Any:
        """One writer per dataset at a time (a client retrying PUT /dataset races itself)."""
        return self.client.lock(keys.DATASET_LOCK(owner, name), timeout=300, blocking_timeout=30)

    def delete(self, owner: str, name: str) -> None:
        pipe = self.client.pipeline()
        pipe.delete(keys.DATASET(owner, name))
        pipe.zrem(keys.DATASETS(owner), name)
        pipe.execute()

    def owned(self, owner: str) -> list[Dataset]:
        """`owner`'s datasets, oldest first."""
        names = self.client.zrange(keys.DATASETS(owner), 0, -1)
        values = self.client.mget([keys.DATASET(owner, n) for n in names]) if names else []
        return [Dataset.from_dict(json.loads(v)) for v in values if v]
