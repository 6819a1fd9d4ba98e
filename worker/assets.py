"""Model and LoRA files a job names that live in S3, copied into this worker's directories.

Why: checkpoints uploaded through the AWS extension API sit in the bucket;
every worker host keeps its own model directory, so the first job that
needs one on a host downloads it there (once: later jobs find the file).
The copy is written beside its final name and renamed into place, so a
half-written file is never loaded and two workers on one host never clash.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from common.catalog import owned_dir
from common.store.checkpoints import Checkpoint, CheckpointStore, filename_problem
from common.errors import ModelError
from common.storage import Storage, task_metadata

log = logging.getLogger("sdqueue.worker")


def asset_dirs(settings) -> dict[str, Path]:
    """Where each kind of asset goes on this host."""
    return {"models": owned_dir(settings.models_dir), "loras": owned_dir(settings.lora_dir)}


def owned_budget(settings) -> int:
    """worker.owned_cache_gb in bytes (0: no limit)."""
    return int(settings.worker.owned_cache_gb * 1024**3)


def ensure_assets(storage: Storage, assets: list[dict[str, str]], dirs: dict[str, Path], budget: int = 0,
                  keep: Iterable[str] = ()) -> None:
    """Download every asset this host does not have yet (local names carry the checkpoint id, so a
    re-uploaded model is a new file and a warm pipeline never serves stale weights), and mark each as just used.

    `budget` > 0: after a download, the least recently used files of the folders go until they hold at most
    that many bytes, never this job's nor those named in `keep` (the models loaded warm).
    """
    fetched, needed = False, set(keep)
    for asset in assets:
        folder, name = dirs.get(asset.get("dir", "")), asset.get("name", "")
        if folder is None or filename_problem(name):
            raise ModelError(f"job names an unusable model file {asset!r}")
        needed.add(name)
        if (folder / name).exists():
            touch(folder / name)
        else:
            fetch(storage, asset["key"], folder / name)
            fetched = True
    if fetched and budget > 0:
        evict(list(dirs.values()), budget, needed)


def touch(path: Path) -> None:
    """Mark a file as just used (its mtime orders eviction); a file another worker just evicted is refetched."""
    try:
        os.utime(path)
    except OSError:
        pass


def evict(folders: list[Path], budget: int, keep: set[str]) -> list[Path]:
    """Delete the least recently used files of `folders` until they hold at most `budget` bytes; the removed.

    Why: the keys' own checkpoints (GBs each) pile up on every worker host
    that ever ran a job naming them; the copy in S3 stays, so a later job
    only fetches it again. A file a pipeline still uses stays readable to it
    (POSIX), and `keep` spares the ones in use now.
    """
    files = []
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and not path.name.startswith("."):
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, path in sorted(files):
        if total <= budget:
            break
        if path.name in keep:
            continue
        path.unlink(missing_ok=True)
        log.info("evicted %s (%d bytes) from the worker's copies of keys' own files", path, size)
        total -= size
        removed.append(path)
    return removed


def publish(storage: Storage, checkpoints: CheckpointStore, checkpoint: Checkpoint, path: Path, task_id: str) -> None:
    """Upload a file a job made (a LoRA, a merged model) as `checkpoint`'s only file, then record the checkpoint:
    in that order, so a record never names a file S3 does not hold yet."""
    with path.open("rb") as stream:
        storage.put_stream(checkpoint.key_of(checkpoint.names[0]), stream, metadata=task_metadata(task_id))
    checkpoints.save(checkpoint)


def fetch(storage: Storage, key: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    log.info("fetching s3 object %s into %s", key, target)
    try:
        storage.download(key, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
