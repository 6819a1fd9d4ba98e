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

from common.catalog import owned_dir
from common.store.checkpoints import filename_problem
from common.errors import ModelError
from common.storage import Storage

log = logging.getLogger("sdqueue.worker")


def asset_dirs(settings) -> dict[str, Path]:
    """Where each kind of asset goes on this host."""
    return {"models": owned_dir(settings.models_dir), "loras": owned_dir(settings.lora_dir)}


def ensure_assets(storage: Storage, assets: list[dict[str, str]], dirs: dict[str, Path]) -> None:
    """Download every asset this host does not have yet (local names carry the checkpoint id, so a
    re-uploaded model is a new file and a warm pipeline never serves stale weights)."""
    for asset in assets:
        folder, name = dirs.get(asset.get("dir", "")), asset.get("name", "")
        if folder is None or filename_problem(name):
            raise ModelError(f"job names an unusable model file {asset!r}")
        if not (folder / name).exists():
            fetch(storage, asset["key"], folder / name)


def fetch(storage: Storage, key: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    log.info("fetching s3 object %s into %s", key, target)
    try:
        storage.download(key, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
