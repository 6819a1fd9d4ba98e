"""The AWS SD extension API's model routes: checkpoints uploaded into S3.

Why: clients bring their own checkpoints and LoRAs. POST /checkpoint opens
one S3 multipart upload per file and hands out presigned part URLs (the
bytes never pass through the API); PUT /checkpoint completes them and makes
the checkpoint Active; POST /upload_checkpoint has the service fetch files
from URLs (SSRF-guarded). Inference requests then name the files, and the
worker that runs them copies them into its model directory. Answers carry
`statusCode` beside their fields; errors are {"statusCode", "error"}.

A checkpoint is its creator's: listed, shown, changed and used for that key
only (file names are per key, too); another key's id answers as a missing one.
Its files in S3 carry the owner (common/storage.py: OWNER_META).
"""
from __future__ import annotations

from flask import jsonify
from flask_smorest import Blueprint

from api.auth import bearer_token, current_key
from api.dialects.aws import schemas
from api.dialects.aws.errors import CHECKPOINTS_BLUEPRINT, DIALECT, forbidden, models_error, not_allowed
from api.dialects.aws.translate import checkpoint_view, listed_view, local_views, now_text
from api.downloads import DownloadRefused, open_download
from api.limits import read_limited, submit_limited
from api.services import Services, services
from common.errors import StorageError
from common.storage import owner_metadata
from common.store.checkpoints import Checkpoint, filename_problem


SECURITY = [{"ApiKeyAuth": []}]

blp = Blueprint(CHECKPOINTS_BLUEPRINT, __name__, description="AWS SD extension API: checkpoints in S3")


@blp.before_request
def authenticate():
    """The key header, or `Authorization: Bearer <key>`."""
    return services().keys.check(DIALECT, bearer_token, forbidden, not_allowed)


def name_problem(svc: Services, kind: str, name: str) -> str | None:
    """Why a new upload may not use this file name: a model of the workers' directories has it (and would
    shadow it). Other keys' uploads never matter: names are per key."""
    local = {m.name for m in svc.catalog.models()} if kind == "Stable-diffusion" else \
        {p.name for p in svc.catalog.loras().values()} if kind == "Lora" else set()
    if name in local:
        return f"{name} is already in the workers' {kind} directory"
    return None


def create_checkpoint(svc: Services, data: dict):
    """POST /checkpoint: a record in Initial and, per file, a multipart upload with presigned part URLs."""
    store = svc.checkpoints
    files = data["filenames"]
    for item in files:
        if problem := name_problem(svc, data["checkpoint_type"], item["filename"]):
            return models_error(400, problem)
    checkpoint = store.new(data["checkpoint_type"], [f["filename"] for f in files], data["params"],
                           current_key().owner)
    opened = open_uploads(svc, checkpoint, [(f["filename"], f["parts_number"]) for f in files])
    uploads = {name: {k: v for k, v in upload.items() if k != "urls"} for name, upload in opened.items()}
    presigned = [{**uploads[name], "filename": name, "urls": upload["urls"]} for name, upload in opened.items()]
    checkpoint.params = {**checkpoint.params, "created": now_text(), "multipart_upload": uploads}
    store.save(checkpoint)
    return jsonify({"statusCode": 200, "checkpoint": checkpoint_view(svc, checkpoint), "s3PresignUrl": presigned})


def open_uploads(svc: Services, checkpoint: Checkpoint, files: list[tuple[str, int]]) -> dict[str, dict]:
    """One multipart upload per (file name, parts) into the checkpoint, recorded in `checkpoint.uploads` (not
    saved): name -> {upload_id, bucket, key, urls: a presigned PUT URL per part}."""
    opened = {}
    for name, parts in files:
        key = checkpoint.key_of(name)
        upload_id = svc.storage.start_multipart(key, owner_metadata(checkpoint.owner))
        checkpoint.uploads[name] = upload_id
        opened[name] = {"upload_id": upload_id, "bucket": svc.storage.bucket, "key": key,
                        "urls": svc.storage.part_urls(key, upload_id, parts)}
    return opened


def complete_uploads(svc: Services, checkpoint: Checkpoint, tags: dict[str, list[dict]]) -> None:
    """Complete each file's multipart upload from the client's ETags, else from the parts S3 holds.

    A file whose upload is gone but whose object exists was completed by an
    earlier try: it counts as done, so a retried PUT always converges.
    """
    for name, upload_id in list(checkpoint.uploads.items()):
        key = checkpoint.key_of(name)
        try:
            parts = tags.get(name) or tags.get(f"{name}.tar") or svc.storage.uploaded_parts(key, upload_id)
            if not parts:
                raise ValueError(f"no parts of {name} were uploaded yet")
            svc.storage.finish_multipart(key, upload_id, parts)
        except StorageError as exc:
            if "NoSuchUpload" in str(exc) and svc.storage.exists(key):
                del checkpoint.uploads[name]
                continue
            hint = " (every part but the last must be at least 5 MiB: use fewer parts)" if "EntityTooSmall" in str(exc) else ""
            raise ValueError(f"{name}: {exc}{hint}") from exc
        del checkpoint.uploads[name]


def update_checkpoint(svc: Services, data: dict):
    """PUT /checkpoint: Active completes the uploads; Disabled / Initial only set the status."""
    store = svc.checkpoints
    wanted = data["checkpoint_id"]
    found = store.get(wanted)
    if found is None or found.owner != current_key().owner:   # another key's (or a shared one): not there for it
        return models_error(404, f"checkpoint not found with id {wanted}")   # before the lock: no wait tells either
    with store.lock(wanted):
        checkpoint = store.get(wanted)   # records are never deleted: still there, still this key's
        if data["status"] == "Active" and checkpoint.uploads:
            try:
                complete_uploads(svc, checkpoint, data["multi_parts_tags"])
            except ValueError as exc:
                store.save(checkpoint)   # files completed so far stay completed
                return models_error(400, str(exc))
        checkpoint.status = data["status"]
        store.save(checkpoint)
    return jsonify({"statusCode": 200, "checkpoint": checkpoint_view(svc, checkpoint)})


def upload_from_urls(svc: Services, data: dict):
    """POST /upload_checkpoint: fetch every URL into S3 (synchronously), then an Active checkpoint."""
    store = svc.checkpoints
    checkpoint = store.new(data["checkpointType"], [], data["params"], current_key().owner)
    stored: dict[str, dict] = {}
    for url in data["modelUrl"]:
        try:
            download = open_download(url, svc.settings)
        except DownloadRefused as exc:
            return models_error(400, f"contains invalid urls: {exc}")
        with download.response:
            if problem := filename_problem(download.name):
                return models_error(400, f"contains invalid urls: {url}: {problem}")
            if problem := name_problem(svc, data["checkpointType"], download.name):
                return models_error(400, problem)
            if download.name in stored:
                return models_error(400, f"contains invalid urls: two URLs give the file {download.name}")
            key = checkpoint.key_of(download.name)
            try:
                svc.storage.put_stream(key, download.stream, owner_metadata(checkpoint.owner))
            except DownloadRefused as exc:
                return models_error(400, f"contains invalid urls: {exc}")
            stored[download.name] = {"uploadId": None, "bucket": svc.storage.bucket, "key": key,
                                     "size": download.stream.read_bytes}
    checkpoint.names = list(stored)
    checkpoint.status = "Active"
    checkpoint.params = {**checkpoint.params, "created": now_text(), "multipart_upload": stored}
    store.save(checkpoint)
    return jsonify({"statusCode": 200, "checkpoint": checkpoint_view(svc, checkpoint)})


# --- routes --------------------------------------------------------------------------------
@blp.route("/checkpoints", methods=["GET"])
@read_limited
@blp.arguments(schemas.CheckpointsQuery(), location="query")
@blp.doc(security=SECURITY)
def list_checkpoints(query: dict):
    """This key's uploaded checkpoints and the models already in the workers' directories, filtered by status and
    types."""
    svc = services()
    found = [listed_view(svc, c) for c in svc.checkpoints.visible(current_key().owner)] + local_views(svc)
    found = [c for c in found if (not query["status"] or c["status"] in query["status"])
             and (not query["types"] or c["type"] in query["types"])]
    return jsonify({"statusCode": 200, "checkpoints": found})


@blp.route("/checkpoint", methods=["GET"])
@read_limited
@blp.arguments(schemas.CheckpointQuery(), location="query")
@blp.doc(security=SECURITY)
def get_checkpoint(query: dict):
    """One uploaded checkpoint of this key by `id` (or `checkpoint_id`)."""
    svc = services()
    wanted = query["id"] or query["checkpoint_id"]
    if not wanted:
        return models_error(400, "query parameter id is required")
    checkpoint = svc.checkpoints.get_visible(wanted, current_key().owner)
    if checkpoint is None:   # missing, or another key's: the same answer
        return models_error(404, f"checkpoint not found with id {wanted}")
    return jsonify({"statusCode": 200, "checkpoint": checkpoint_view(svc, checkpoint)})


@blp.route("/checkpoint", methods=["POST"])
@submit_limited
@blp.arguments(schemas.CheckpointCreate(), location="json")
@blp.doc(security=SECURITY)
def post_checkpoint(data: dict):
    """Create a checkpoint: presigned part URLs per file (PUT each part, keep its ETag)."""
    return create_checkpoint(services(), data)


@blp.route("/checkpoint", methods=["PUT"])
@submit_limited
@blp.arguments(schemas.CheckpointUpdate(), location="json")
@blp.doc(security=SECURITY)
def put_checkpoint(data: dict):
    """Set a checkpoint's status; Active completes its uploads (ETags from multi_parts_tags or S3)."""
    return update_checkpoint(services(), data)


@blp.route("/upload_checkpoint", methods=["POST"])
@submit_limited
@blp.arguments(schemas.UploadCheckpoint(), location="json")
@blp.doc(security=SECURITY)
def upload_checkpoint(data: dict):
    """Fetch model files from public URLs into S3 (private and loopback hosts refused unless allow-listed)."""
    return upload_from_urls(services(), data)
