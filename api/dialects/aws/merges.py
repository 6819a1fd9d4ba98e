"""The AWS SD extension's model merge: POST /inference/run-model-merge (api/merges.py is the core).

Why it answers as it does: the extension's WebUI sends the three model
names and only logs the answer; its own server route never worked (an
unfinished stub that referenced an undefined inference_id). sdqueue runs
the merge the names ask for, with the web UI's merger defaults (weighted
sum, M = 0.3) or the container payload's fields when a client sends them,
and answers as the extension's inference routes do: the job's id, status
"inprogress", the pool and the S3 location of the result, plus the three
names (the public document's example body). The merge is a job of this
key: GET /inference/get-inference-job?jobID=... follows it (taskType
"merge"), and once it succeeded its checkpoint is this key's Active
Stable-diffusion checkpoint, usable in /inference/v2 by its file name.
"""
from __future__ import annotations

from flask import jsonify
from flask_smorest import abort

from api.auth import current_key
from api.dialects.a1111 import find_checkpoint
from api.dialects.aws import schemas
from api.dialects.aws.errors import DIALECT, inference_error
from api.dialects.aws.routes import SECURITY, blp
from api.limits import submit_limited
from api.merges import DEFAULT_MULTIPLIER, MergeProblem, merge_queue, submit_merge
from api.services import services

# The core's field names -> the request's.
FIELDS = {"primary": "primary_model_name", "secondary": "secondary_model_name", "tertiary": "tertiary_model_name",
          "method": "interp_method", "multiplier": "interp_amount", "name": "custom_name", "dtype": "save_as_half"}


def merge_request(data: dict) -> dict:
    """The validated request -> the core's fields and the warnings for what sdqueue does differently."""
    method = schemas.MERGE_METHODS[data["interp_method"]]
    tertiary, warnings = data.get("tertiary_model_name") or None, []
    if method == "weighted_sum" and tertiary:
        warnings.append("tertiary_model_name: not used by a weighted sum (the web UI's default method); send "
                        "interp_method \"Add difference\" to merge three models")
        tertiary = None
    if data["checkpoint_format"] == "ckpt":
        warnings.append("checkpoint_format: sdqueue writes .safetensors, never pickled .ckpt files")
    amount = next((v for v in (data["interp_amount"], data["multiplier"]) if v is not None), DEFAULT_MULTIPLIER)
    return {"primary": data["primary_model_name"], "secondary": data["secondary_model_name"], "tertiary": tertiary,
            "method": method, "multiplier": amount, "name": data.get("custom_name") or None,
            "dtype": "fp16" if data["save_as_half"] else "keep", "dialect": DIALECT, "meta": {"task_type": "merge"},
            "warnings": warnings}


@blp.route("/inference/run-model-merge", methods=["POST"])
@submit_limited
@blp.arguments(schemas.ModelMergeRequest(), location="json")
@blp.doc(security=SECURITY)
def run_model_merge(data: dict):
    """Queue a model merge (the web UI's checkpoint merger) on the merge pool; answers at once."""
    svc = services()
    try:
        task_id, planned = submit_merge(svc, current_key(), merge_request(data),
                                        find=lambda name: find_checkpoint(svc, name))
    except MergeProblem as exc:
        if exc.status == 422:
            abort(422, errors={"json": {FIELDS.get(exc.field, exc.field): [str(exc)]}})
        return inference_error(exc.status, str(exc))
    merge = planned.spec.merge
    body = {"inference_id": task_id, "status": "inprogress", "endpoint_name": merge_queue(svc.settings),
            "output_path": svc.storage.s3_uri(svc.checkpoints.prefix_of("Stable-diffusion", merge["checkpoint_id"])),
            "primary_model_name": data["primary_model_name"], "secondary_model_name": data["secondary_model_name"],
            "tertiary_model_name": data.get("tertiary_model_name") or "", "checkpoint_name": merge["file"],
            "checkpoint_id": merge["checkpoint_id"]}
    if planned.warnings:
        body["warnings"] = planned.warnings
    return jsonify(body)
