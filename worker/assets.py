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

from common.checkpoints import filename_problem
from common.errors import ModelError
from common.storage import Storage

log = logging.getLogger("sdqueue.worker")


def asset_dirs(settings) -> dict[str, Path]:
    """Where each kind of asset goes on this host."""
    return {"models": settings.models_dir, "loras": settings.lora_dir}


def source_marker(target: Path) -> Path:
    """Beside a fetched file: the S3 key it came from (a re-upload under the same name has another key)."""
    return target.with_name(f".{target.name}.source")


def ensure_assets(storage: Storage, assets: list[dict[str, str]], dirs: dict[str, Path]) -> list[str]:
    """Download every asset missing locally or fetched from another upload; the names replaced.

    A file an operator put there (no source marker) is kept as it is: local models take precedence.
    The caller drops replaced models from its warm registry.
    """
    replaced = []
    for asset in assets:
        folder, name = dirs.get(asset.get("dir", "")), asset.get("name", "")
        if folder is None or filename_problem(name):
            raise ModelError(f"job names an unusable model file {asset!r}")
        target, marker = folder / name, source_marker(folder / name)
        if not target.exists():
            fetch(storage, asset["key"], target)
        elif marker.exists() and marker.read_text() != asset["key"]:
            fetch(storage, asset["key"], target)
            replaced.append(name)
    return replaced


def fetch(storage: Storage, key: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    log.info("fetching s3 object %s into %s", key, target)
    try:
        storage.download(key, partial)
        os.replace(partial, target)
        source_marker(target).write_text(key)
    finally:
        partial.unlink(missing_ok=True)
