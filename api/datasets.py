"""Training datasets, for both the AWS SD extension's routes and the native /api/v1/datasets.

Why one module: creating a dataset (a record and a presigned PUT URL per
file) and enabling it (every file checked in S3) are the same for both
APIs; each dialect only words the request and the answer its own way.
Enabling reads each file back from S3: an image must open as PNG, JPEG or
WebP within datasets.max_pixels and max_file_bytes; a caption file
(`photo.txt` beside `photo.png`) must be UTF-8 within max_caption_bytes and
becomes that image's caption. The first file that fails keeps the dataset
Initialed and is named in the answer; nothing is half enabled.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from api.services import Services
from common.store import Dataset, DatasetItem
from common.store.datasets import item_type

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class DatasetProblem(Exception):
    """A dataset cannot be created or enabled as asked; the message names the file or field."""


@dataclass
class Created:
    dataset: Dataset
    upload_urls: dict[str, str]          # file name -> presigned PUT URL


def create_dataset(svc: Services, owner: str, name: str, files: list[dict], params: dict) -> Created:
    """A new Initialed dataset of `owner` with a presigned PUT URL per file; DatasetProblem if the name is taken,
    the files are too many or two share a name."""
    limit = svc.settings.datasets.max_files
    if len(files) > limit:
        raise DatasetProblem(f"content: {len(files)} files; at most {limit} per dataset (datasets.max_files)")
    names = [f["name"] for f in files]
    if len(set(names)) != len(names):
        raise DatasetProblem("content: file names must be distinct")
    if not any(item_type(f["name"]) == "image" for f in files):
        raise DatasetProblem("content: a dataset needs at least one image")
    dataset = svc.datasets.new(name, owner, files, params)
    if not svc.datasets.create(dataset):
        raise DatasetProblem(f"dataset_name: this key already has a dataset called {name!r}")
    return Created(dataset, {item.name: svc.storage.upload_url(item.key) for item in dataset.items})


def enable_dataset(svc: Services, dataset: Dataset) -> Dataset:
    """Check every file in S3 and mark the dataset Enabled (idempotent); DatasetProblem naming the first bad file."""
    with svc.datasets.lock(dataset.owner, dataset.name):
        dataset = svc.datasets.get(dataset.owner, dataset.name) or dataset
        if dataset.status == "Enabled":
            return dataset
        captions = {}
        for item in dataset.items:
            if item.type == "text":
                captions[item.stem] = read_caption(svc, item)
            else:
                check_image(svc, item)
        for item in dataset.images:
            item.caption = item.caption or captions.get(item.stem)
            caption_size = len((item.caption or "").encode())
            if caption_size > svc.settings.datasets.max_caption_bytes:
                raise DatasetProblem(f"{item.name}: its caption is {caption_size} bytes; at most "
                                     f"{svc.settings.datasets.max_caption_bytes} (datasets.max_caption_bytes)")
        for item in dataset.items:
            item.status = "Enabled"
        dataset.status = "Enabled"
        svc.datasets.save(dataset)
        return dataset


def set_status(svc: Services, dataset: Dataset, status: str) -> Dataset:
    """Enabled (after the checks), or Disabled / Initialed (a training job refuses a dataset not Enabled)."""
    if status == "Enabled":
        return enable_dataset(svc, dataset)
    with svc.datasets.lock(dataset.owner, dataset.name):
        dataset = svc.datasets.get(dataset.owner, dataset.name) or dataset
        dataset.status = status
        for item in dataset.items:
            item.status = status
        svc.datasets.save(dataset)
        return dataset


def delete_dataset(svc: Services, dataset: Dataset) -> None:
    """Remove a dataset: its files in S3 first (a failure leaves the record, so a retry finishes), then its record."""
    with svc.datasets.lock(dataset.owner, dataset.name):
        svc.storage.delete([item.key for item in dataset.items])
        svc.datasets.delete(dataset.owner, dataset.name)


def uploaded_bytes(svc: Services, item: DatasetItem) -> bytes:
    """The file's bytes from S3, after checking it is there and within datasets.max_file_bytes."""
    found = svc.storage.head(item.key)
    if found is None:
        raise DatasetProblem(f"{item.name}: not uploaded yet (PUT it to its upload URL first)")
    size, _ = found
    if size > svc.settings.datasets.max_file_bytes:
        raise DatasetProblem(f"{item.name}: {size} bytes; at most {svc.settings.datasets.max_file_bytes} "
                             f"(datasets.max_file_bytes)")
    item.size = size
    return svc.storage.get(item.key)


def check_image(svc: Services, item: DatasetItem) -> None:
    """The file opens as a PNG, JPEG or WebP image within datasets.max_pixels; its size is recorded."""
    data = uploaded_bytes(svc, item)
    limit = svc.settings.datasets.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
                if width * height > limit:
                    raise DatasetProblem(f"{item.name}: {width}x{height} is over {limit} pixels (datasets.max_pixels)")
                image.load()
    except DatasetProblem:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DatasetProblem(f"{item.name}: not a readable image ({type(exc).__name__})") from exc
    if fmt not in IMAGE_FORMATS:
        raise DatasetProblem(f"{item.name}: a {fmt} image; PNG, JPEG or WebP only")
    item.width, item.height = width, height


def read_caption(svc: Services, item: DatasetItem) -> str:
    """A caption file's text (UTF-8, within datasets.max_caption_bytes), stripped."""
    data = uploaded_bytes(svc, item)
    if len(data) > svc.settings.datasets.max_caption_bytes:
        raise DatasetProblem(f"{item.name}: {len(data)} bytes; a caption is at most "
                             f"{svc.settings.datasets.max_caption_bytes} (datasets.max_caption_bytes)")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DatasetProblem(f"{item.name}: not UTF-8 text") from exc

