"""The AWS SD extension API's dataset routes: POST/PUT /dataset, GET /datasets, GET /{dataset_name}/data.

Why here: datasets belong to the extension's model API (its middleware's
dataset service answers in the same {"statusCode", ...} shape as the
checkpoints), so they extend that blueprint. What they do is api/datasets.py,
shared with the native /api/v1/datasets. A dataset is its creator's: another
key's name answers as a missing one, and two keys may use one name.
"""
from __future__ import annotations

from flask import jsonify

from api.auth import current_key
from api.datasets import DatasetProblem, create_dataset, set_status
from api.dialects.aws import schemas
from api.dialects.aws.checkpoints import SECURITY, blp
from api.dialects.aws.errors import models_error
from api.limits import read_limited, submit_limited
from api.services import Services, services
from common.store import Dataset


def dataset_view(svc: Services, dataset: Dataset) -> dict:
    """A dataset as GET /datasets lists it (its params spread in, as the extension does)."""
    return {"datasetName": dataset.name, "s3": svc.storage.s3_uri(dataset.prefix), "status": dataset.status,
            "timestamp": dataset.created, **dataset.params}


@blp.route("/dataset", methods=["POST"])
@submit_limited
@blp.arguments(schemas.ExtensionDatasetCreate(), location="json")
@blp.doc(security=SECURITY)
def post_dataset(data: dict):
    """A new dataset of this key: a presigned PUT URL per file (`s3PresignUrl`: file name -> URL)."""
    svc = services()
    files = [{"name": f["name"], "params": {**f["params"], "original_file_name": f["filename"]}}
             for f in data["content"]]
    try:
        created = create_dataset(svc, current_key().owner, data["dataset_name"], files, data["params"])
    except DatasetProblem as exc:
        return models_error(400, str(exc))
    by_filename = {f["name"]: f["filename"] for f in data["content"]}
    return jsonify({"statusCode": 200, "datasetName": created.dataset.name,
                    "s3PresignUrl": {by_filename[name]: url for name, url in created.upload_urls.items()}})


@blp.route("/dataset", methods=["PUT"])
@submit_limited
@blp.arguments(schemas.ExtensionDatasetUpdate(), location="json")
@blp.doc(security=SECURITY)
def put_dataset(data: dict):
    """Enabled (once every file is in S3 and checked: 400 naming the first file that is not), or Disabled."""
    svc = services()
    dataset = svc.datasets.get(current_key().owner, data["dataset_name"])
    if dataset is None:
        return models_error(404, f"dataset {data['dataset_name']} is not found")
    try:
        dataset = set_status(svc, dataset, data["status"])
    except DatasetProblem as exc:
        return models_error(400, str(exc))
    return jsonify({"statusCode": 200, "datasetName": dataset.name, "status": dataset.status})


@blp.route("/datasets", methods=["GET"])
@read_limited
@blp.arguments(schemas.ExtensionDatasetsQuery(), location="query")
@blp.doc(security=SECURITY)
def list_datasets(query: dict):
    """This key's datasets, optionally of some statuses (`dataset_status`)."""
    svc = services()
    wanted = set(query["dataset_status"])
    return jsonify({"statusCode": 200, "datasets": [dataset_view(svc, d) for d in svc.datasets.owned(current_key().owner)
                                                    if not wanted or d.status in wanted]})


@blp.route("/<string:dataset_name>/data", methods=["GET"])
@read_limited
@blp.doc(security=SECURITY)
def dataset_data(dataset_name: str):
    """One dataset of this key with its files, each with a presigned preview URL."""
    svc = services()
    dataset = svc.datasets.get(current_key().owner, dataset_name)
    if dataset is None:
        return models_error(404, f"dataset {dataset_name} is not found")
    data = [{"key": item.key, "name": item.name, "type": item.type, "preview_url": svc.storage.url_for(item.key),
             "dataStatus": item.status, **({"caption": item.caption} if item.caption else {}),
             **({"width": item.width, "height": item.height} if item.width else {}), **item.params}
            for item in dataset.items]
    return jsonify({"statusCode": 200, "dataset_name": dataset.name, **dataset_view(svc, dataset), "data": data})
