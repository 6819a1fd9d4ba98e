"""The native API's training datasets: /api/v1/datasets (the same datasets as the AWS extension's /dataset).

Why: a training job learns from a dataset; clients create one with its file
names, PUT each file straight to S3 at the URL it gets back, then enable it
(every file is read back and checked: api/datasets.py). Errors are the
native {"detail": ...}; another key's dataset is a 404 as a missing one.
"""
from __future__ import annotations

from flask_smorest import abort

from api.auth import current_key
from api.datasets import DatasetProblem, create_dataset, delete_dataset, enable_dataset
from api.dialects.native import schemas
from api.dialects.native.routes import SECURITY, blp
from api.limits import read_limited, submit_limited
from api.services import Services, services
from common.store import Dataset
from common.timestamps import iso

NOT_FOUND = "dataset not found"


def dataset_body(svc: Services, dataset: Dataset, upload_urls: dict[str, str] | None = None) -> dict:
    """A dataset with its files, each with a presigned GET URL (and its PUT URL right after creation)."""
    files = [{"name": item.name, "type": item.type, "status": item.status, "caption": item.caption,
              "width": item.width, "height": item.height, "size": item.size, "url": svc.storage.url_for(item.key),
              **({"upload_url": upload_urls[item.name]} if upload_urls else {})} for item in dataset.items]
    return {"name": dataset.name, "status": dataset.status, "created_at": iso(dataset.created),
            "params": dataset.params, "files": files}


def owned_dataset_or_404(svc: Services, name: str) -> Dataset:
    dataset = svc.datasets.get(current_key().owner, name)
    if dataset is None:
        abort(404, message=NOT_FOUND)
    return dataset


@blp.route("/datasets", methods=["POST"])
@submit_limited
@blp.arguments(schemas.DatasetCreateSchema(), location="json")
@blp.response(201, schemas.DatasetSchema)
@blp.doc(security=SECURITY)
def create(data: dict):
    """A new dataset of this key; each file comes back with the presigned `upload_url` to PUT it to."""
    svc = services()
    try:
        created = create_dataset(svc, current_key().owner, data["name"], data["files"], data["params"])
    except DatasetProblem as exc:
        abort(409 if "already has" in str(exc) else 422, message=str(exc))
    return dataset_body(svc, created.dataset, created.upload_urls)


@blp.route("/datasets", methods=["GET"])
@read_limited
@blp.response(200, schemas.DatasetListSchema)
@blp.doc(security=SECURITY)
def list_datasets():
    """This key's datasets, oldest first."""
    svc = services()
    return {"datasets": [dataset_body(svc, d) for d in svc.datasets.owned(current_key().owner)]}


@blp.route("/datasets/<string:name>", methods=["GET"])
@read_limited
@blp.response(200, schemas.DatasetSchema)
@blp.doc(security=SECURITY)
def get_dataset(name: str):
    """One dataset of this key with its files."""
    svc = services()
    return dataset_body(svc, owned_dataset_or_404(svc, name))


@blp.route("/datasets/<string:name>", methods=["DELETE"])
@submit_limited
@blp.response(204)
@blp.doc(security=SECURITY)
def delete(name: str):
    """Remove a dataset of this key and its files; its name is free again."""
    svc = services()
    delete_dataset(svc, owned_dataset_or_404(svc, name))
    return None


@blp.route("/datasets/<string:name>/enable", methods=["POST"])
@submit_limited
@blp.response(200, schemas.DatasetSchema)
@blp.alt_response(422, description="A file is missing in S3, not an image, too big, or its caption is not UTF-8: "
                                   "the message names it")
@blp.doc(security=SECURITY)
def enable(name: str):
    """Check every uploaded file and enable the dataset for training (idempotent)."""
    svc = services()
    try:
        dataset = enable_dataset(svc, owned_dataset_or_404(svc, name))
    except DatasetProblem as exc:
        abort(422, message=str(exc))
    return dataset_body(svc, dataset)
