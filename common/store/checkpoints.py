"""Model files uploaded to S3 (the AWS extension's checkpoints), recorded in Redis.

Why: the AWS SD extension's clients upload checkpoints and LoRAs into the service's
bucket (presigned multipart PUTs, or a server-side download) and then name
them in inference requests. The record (type, file names, status) lives in
Redis; the bytes live in S3 under {prefix}/{type}/{id}/{filename}; a worker
that gets a job naming one copies it into its model or LoRA directory first.

Every lookup takes the caller's owner: a checkpoint belongs to the key that
created it, and another key's does not exist for anyone else (same answers as
a missing one). A record without an owner (written before owners were
recorded) is shared: visible and usable by every key, changed by none.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from common.store import keys

CHECKPOINT_TYPES = ("Stable-diffusion", "embeddings", "Lora", "hypernetworks", "ControlNet", "VAE")
STATUSES = ("Initial", "Active", "Disabled")
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".yaml")
FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ()+\[\]]{0,199}$")
# Where a worker puts each type it can use (others are stored and listed only).
LOCAL_DIRS = {"Stable-diffusion": "models", "Lora": "loras"}

def filename_problem(name: str) -> str | None:
    """Why `name` cannot be a checkpoint file name (a plain file name with a model suffix), else None."""
    if not FILENAME.match(name) or ".." in name:
        return f"{name!r} is not a plain file name (letters, digits, ' ._-()+[]', at most 200)"
    if not name.lower().endswith(FILE_SUFFIXES):
        return f"{name!r} must end in one of {', '.join(FILE_SUFFIXES)}"
    return None


@dataclass
class Checkpoint:
    """One uploaded model: its files in S3 and where it stands."""

    id: str
    type: str
    names: list[str]
    prefix: str
    status: str = "Initial"
    params: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    uploads: dict[str, str] = field(default_factory=dict)   # file name -> open multipart upload id
    owner: str = ""

    def key_of(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def local_name(self, name: str) -> str:
        """The file's name in a worker's directory: the checkpoint id in it, so a re-upload is a new file."""
        stem, dot, suffix = name.rpartition(".")
        return f"{stem}-{self.id[:8]}.{suffix}" if dot else f"{name}-{self.id[:8]}"

    def visible_to(self, owner: str) -> bool:
        """Whether `owner` may see and use this checkpoint: its own, or a shared one (no owner)."""
        return self.owner in ("", owner)

    def asset(self, name: str) -> dict[str, str]:
        """What a job needs a worker to fetch for this file (JobSpec.assets)."""
        return {"key": self.key_of(name), "dir": LOCAL_DIRS[self.type], "name": self.local_name(name)}


class CheckpointStore:
    """Checkpoint records: one JSON value each plus an index by creation time."""

    def __init__(self, client: redis.Redis, key_prefix: str):
        self.client = client
        self.key_prefix = key_prefix.strip("/")

    def new(self, kind: str, names: list[str], params: dict[str, Any], owner: str, checkpoint_id: str | None = None,
            status: str = "Initial") -> Checkpoint:
        """A checkpoint record (not saved); `checkpoint_id`: one derived from the job that makes it, so a retried
        finish writes the same record (default: a new uuid4)."""
        checkpoint_id = checkpoint_id or str(uuid.uuid4())
        return Checkpoint(checkpoint_id, kind, list(names), self.prefix_of(kind, checkpoint_id), status=status,
                          params=dict(params), owner=owner)

    def prefix_of(self, kind: str, checkpoint_id: str) -> str:
        """Where a checkpoint's files are in S3: {prefix}/{type}/{id}/."""
        return f"{self.key_prefix}/{kind}/{checkpoint_id}"

    def lock(self, checkpoint_id: str) -> Any:
        """One writer per checkpoint at a time (a client retrying PUT /checkpoint races itself)."""
        return self.client.lock(keys.CHECKPOINT_LOCK(checkpoint_id), timeout=900, blocking_timeout=30)

    def save(self, checkpoint: Checkpoint) -> None:
        pipe = self.client.pipeline()
        pipe.set(keys.CHECKPOINT(checkpoint.id), json.dumps(asdict(checkpoint)))
        pipe.zadd(keys.CHECKPOINTS(), {checkpoint.id: checkpoint.created})
        pipe.execute()

    def forget(self, checkpoint_id: str) -> None:
        """Drop a checkpoint's record (its files are the caller's to delete)."""
        pipe = self.client.pipeline()
        pipe.delete(keys.CHECKPOINT(checkpoint_id))
        pipe.zrem(keys.CHECKPOINTS(), checkpoint_id)
        pipe.execute()

    def get(self, checkpoint_id: str) -> Checkpoint | None:
        """Any checkpoint, whoever owns it: for changes, which check the owner themselves."""
        raw = self.client.get(keys.CHECKPOINT(checkpoint_id))
        return Checkpoint(**json.loads(raw)) if raw else None

    def get_visible(self, checkpoint_id: str, owner: str) -> Checkpoint | None:
        """The checkpoint if `owner` may see it; None, as for a missing id, when it is another key's."""
        checkpoint = self.get(checkpoint_id)
        return checkpoint if checkpoint is not None and checkpoint.visible_to(owner) else None

    def all(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first (whoever owns it)."""
        ids = self.client.zrange(keys.CHECKPOINTS(), 0, -1)
        values = self.client.mget([keys.CHECKPOINT(i) for i in ids]) if ids else []
        return [Checkpoint(**json.loads(v)) for v in values if v]

    def visible(self, owner: str) -> list[Checkpoint]:
        """The checkpoints `owner` may see, oldest first: its own and the shared ones."""
        return [c for c in self.all() if c.visible_to(owner)]

    def find_active(self, kind: str, name: str, owner: str) -> Checkpoint | None:
        """The newest Active checkpoint of `kind` that `owner` may use holding a file called `name`.

        Names are per key: two keys may each upload a `style.safetensors`, and
        each one's jobs get its own (workers store them under different names).
        """
        matches = [c for c in self.visible(owner) if c.type == kind and c.status == "Active" and name in c.names]
        return matches[-1] if matches else None

    def active_names(self, kind: str, owner: str) -> list[str]:
        """File names of every Active checkpoint of `kind` that `owner` may use, each once, oldest first."""
        seen: dict[str, None] = {}
        for checkpoint in self.visible(owner):
            if checkpoint.type == kind and checkpoint.status == "Active":
                seen.update(dict.fromkeys(checkpoint.names))
        return list(seen)
