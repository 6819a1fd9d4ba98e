"""Model merges through the real stack (issue 16): the AUTOMATIC1111 web UI's checkpoint merger as a job of the
merge pool (here the training pool's worker), from the native /api/v1/merges and the AWS SD extension's
/inference/run-model-merge. Inputs are a catalog diffusers folder (converted by the worker), a catalog single file
and the key's own uploads; the result, downloaded from S3, is the weighted sum (or added difference) of the
inputs' weights, generates through /inference/v2, and belongs to its key alone."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import KEY_NATIVE_ONLY
from tests.helpers import wait_until
from tests.test_trainings import make_dataset

FOLDER, SINGLE = "sdq-tiny", "tiny-single.safetensors"     # the same weights: a folder and its single file


def perturbed(source: Path, out: Path, seed: int) -> Path:
    """A copy of a single-file checkpoint with every float tensor moved a little (another SD 1.x model)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {k: v + 0.02 * torch.randn(v.shape, generator=generator).to(v.dtype) if v.is_floating_point() else v
               for k, v in load_file(source).items()}
    save_file(weights, str(out))
    return out


def upload(api, name: str, data: bytes) -> dict:
    """The key's Active Stable-diffusion checkpoint, uploaded as the AWS extension does (presigned PUT)."""
    r = api.post("/checkpoint", {"checkpoint_type": "Stable-diffusion", "filenames": [{"filename": name}]})
    assert r.status_code == 200, r.text
    created = r.json()
    put = requests.put(created["s3PresignUrl"][0]["urls"][0], data=data, timeout=60)
    assert put.status_code == 200, put.text
    r = api.put("/checkpoint", {"checkpoint_id": created["checkpoint"]["id"], "status": "Active"})
    assert r.status_code == 200, r.text
    return r.json()["checkpoint"]


@pytest.fixture(scope="module")
def uploads(api, settings, tmp_path_factory) -> dict[str, Path]:
    """Two of key A's own SD 1.x checkpoints (file name -> local copy), perturbed from the tiny model."""
    folder = tmp_path_factory.mktemp("merges")
    made = {}
    for seed in (1, 2):
        name = f"merge-input-{seed}-{uuid.uuid4().hex[:6]}.safetensors"
        path = perturbed(settings.models_dir / SINGLE, folder / name, seed)
        upload(api, name, path.read_bytes())
        made[name] = path
    return made


def start_merge(api, **body) -> dict:
    response = api.post("/api/v1/merges", body)
    assert response.status_code == 202, response.text
    return response.json()


def merge_of(api, task_id: str) -> dict:
    response = api.get(f"/api/v1/merges/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def downloaded(storage, s3_location: str, tmp_path: Path) -> dict:
    """The merged file's tensors, read from S3."""
    key = s3_location.split("/", 3)[3]
    path = tmp_path / "merged.safetensors"
    path.write_bytes(storage.get(key))
    return load_file(path)


def named(response: requests.Response, field: str) -> bool:
    """Whether a 422 names `field` ({"detail": [{"loc": [..., field], "msg": ...}]})."""
    return any(field in entry["loc"] for entry in response.json()["detail"])


def aws_job(api, job_id: str) -> dict:
    return api.get("/inference/get-inference-job", params={"jobID": job_id}).json()


def test_a_weighted_sum_is_the_weighted_sum_of_the_weights_and_generates(api, api_b, trainer, settings, storage,
                                                                       uploads, tmp_path):
    secondary = next(iter(uploads))
    name = f"merged-{uuid.uuid4().hex[:6]}"
    created = start_merge(api, primary=FOLDER, secondary=secondary, multiplier=0.25, name=name)
    assert created["status"] == "pending" and created["method"] == "weighted_sum" and created["dtype"] == "keep"
    assert created["inputs"] == {"primary": FOLDER, "secondary": secondary, "tertiary": None}
    assert created["file"] == f"{name}.safetensors" and created["family"] == "sd1" and created["checkpoint"] is None
    assert created["events_url"] == f"/api/v1/tasks/{created['id']}/events"

    done = api.wait(created["id"], timeout=300)
    assert done["status"] == "completed", done
    body = merge_of(api, created["id"])
    checkpoint = body["checkpoint"]
    assert checkpoint["name"] == f"{name}.safetensors" and checkpoint["checkpoint_id"] == created["checkpoint_id"]
    assert body["progress"]["step"] == body["progress"]["total"] > 0 and body["progress"]["fraction"] == 1.0
    assert created["id"] in [m["id"] for m in api.get("/api/v1/merges").json()["merges"]]

    # The folder was converted to the single file's layout: A is tiny-single's weights, B the upload's.
    merged = downloaded(storage, checkpoint["s3_location"], tmp_path)
    a, b = load_file(settings.models_dir / SINGLE), load_file(uploads[secondary])
    assert set(merged) == set(a) and checkpoint["tensors_merged"] > 0
    for key, value in a.items():
        if value.is_floating_point():
            expected = (value.float() * 0.75 + b[key].float() * 0.25).to(value.dtype)
            assert torch.allclose(merged[key], expected, atol=1e-6), key
        else:
            assert torch.equal(merged[key], value), key

    # The key's own checkpoint: listed by the AWS API and generating through /inference/v2 by its file name.
    listed = {c["name"][0]: c for c in api.get("/checkpoints?checkpoint_type=Stable-diffusion").json()["checkpoints"]}
    assert listed[f"{name}.safetensors"]["status"] == "Active"
    assert listed[f"{name}.safetensors"]["params"]["method"] == "weighted_sum"
    job = api.post("/inference/v2", {"task_type": "txt2img", "models": {"Stable-diffusion": [f"{name}.safetensors"]},
                                     "sagemaker_endpoint_name": "gpu", "prompt": "a merged fox", "steps": 2,
                                     "width": 64, "height": 64})
    assert job.status_code == 200, job.text
    job_id = job.json()["inference_id"]
    finished = wait_until(lambda: aws_job(api, job_id)["status"] != "inprogress" and aws_job(api, job_id),
                          timeout=180, what="the merged model's image")
    assert finished["status"] == "succeed", finished
    assert finished["image_names"] == ["image_0.jpg"]
    own = {m["name"]: m for m in api.get("/api/v1/models").json()["own"]}
    assert own[f"{name}.safetensors"]["source"] == "merge" and own[f"{name}.safetensors"]["family"] == "sd1"
    assert f"{name}.safetensors" not in {m["name"] for m in api_b.get("/api/v1/models").json()["own"]}
    native = api.run(model=f"{name}.safetensors", width=64, height=64, num_inference_steps=2)   # natively too
    assert native["status"] == "completed", native
    trained = api.post("/api/v1/trainings", {"dataset": make_dataset(api, images=1), "model": f"{name}.safetensors",
                                             "max_steps": 1, "resolution": 64})   # and as a training base
    assert trained.status_code == 202, trained.text
    assert api.wait(trained.json()["id"], timeout=180)["status"] == "completed"

    # Another key: neither the merge nor its checkpoint exists for it.
    assert api_b.get(f"/api/v1/merges/{created['id']}").status_code == 404
    assert api_b.delete(f"/api/v1/merges/{created['id']}").status_code == 404
    assert created["id"] not in [m["id"] for m in api_b.get("/api/v1/merges").json()["merges"]]
    refused = api_b.post("/inference/v2", {"task_type": "txt2img", "sagemaker_endpoint_name": "gpu",
                                           "models": {"Stable-diffusion": [f"{name}.safetensors"]}, "prompt": "x"})
    assert refused.status_code == 400 and "not found" in refused.text
    unknown = api_b.post("/api/v1/generate", {"prompt": "x", "model": f"{name}.safetensors"})
    assert unknown.status_code == 422 and "unknown model" in unknown.text and named(unknown, "model")
    reused = api_b.post("/api/v1/merges", {"primary": f"{name}.safetensors", "secondary": SINGLE})
    assert reused.status_code == 422 and named(reused, "primary")


def test_add_difference_from_the_aws_extension_adds_the_secondary_s_tuning(api, trainer, settings, storage, uploads,
                                                                           tmp_path):
    secondary, tertiary = uploads
    custom = f"diff-{uuid.uuid4().hex[:6]}"
    r = api.post("/inference/run-model-merge", {
        "primary_model_name": SINGLE, "secondary_model_name": secondary, "teritary_model_name": tertiary,
        "interp_method": "Add difference", "interp_amount": 0.5, "save_as_half": "True", "custom_name": custom,
        "checkpoint_format": "safetensors", "bake_in_vae": "None"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "inprogress" and answer["checkpoint_name"] == f"{custom}.safetensors"
    assert (answer["primary_model_name"], answer["secondary_model_name"], answer["tertiary_model_name"]) == \
        (SINGLE, secondary, tertiary)
    assert answer["output_path"].endswith(f"/Stable-diffusion/{answer['checkpoint_id']}")
    job_id = answer["inference_id"]
    finished = wait_until(lambda: aws_job(api, job_id)["status"] != "inprogress" and aws_job(api, job_id),
                          timeout=300, what="the merge")
    assert finished["status"] == "succeed" and finished["taskType"] == "merge", finished

    body = merge_of(api, job_id)                     # the native view of the same job
    assert body["method"] == "add_difference" and body["dtype"] == "fp16" and body["multiplier"] == 0.5
    merged = downloaded(storage, body["checkpoint"]["s3_location"], tmp_path)
    a, b, c = (load_file(p) for p in (settings.models_dir / SINGLE, uploads[secondary], uploads[tertiary]))
    key = next(k for k, v in a.items() if v.is_floating_point() and v.ndim == 2)
    expected = (a[key].float() + (b[key].float() - c[key].float()) * 0.5).half()
    assert merged[key].dtype == torch.float16 and torch.equal(merged[key], expected)
    assert body["checkpoint"]["s3_location"].startswith(answer["output_path"])


def test_an_sdxl_folder_merges_with_an_sdxl_single_file_and_the_result_generates(api, trainer):
    created = start_merge(api, primary="sdq-tiny-xl", secondary="tiny-xl-single.safetensors", multiplier=0.5,
                          dtype="fp16", name=f"xl-mix-{uuid.uuid4().hex[:6]}")
    assert created["family"] == "sdxl"
    done = api.wait(created["id"], timeout=300)
    assert done["status"] == "completed", done
    file = merge_of(api, created["id"])["checkpoint"]["name"]
    job = api.post("/inference/v2", {"task_type": "txt2img", "models": {"Stable-diffusion": [file]},
                                     "sagemaker_endpoint_name": "gpu", "prompt": "a merged lighthouse", "steps": 2})
    assert job.status_code == 200, job.text
    job_id = job.json()["inference_id"]
    finished = wait_until(lambda: aws_job(api, job_id)["status"] != "inprogress" and aws_job(api, job_id),
                          timeout=180, what="the merged SDXL model's image")
    assert finished["status"] == "succeed", finished


def test_a_merge_waiting_for_the_pool_is_cancelled_and_makes_no_checkpoint(api, trainer):
    from tests.test_trainings import make_dataset, start_training

    busy = start_training(api, make_dataset(api, images=1), max_steps=5000, checkpoint_every=0)
    api.wait_for(busy["id"], lambda t: t["status"] == "processing", timeout=180)
    try:
        created = start_merge(api, primary=FOLDER, secondary=SINGLE)
        assert created["file"] == "0.7(sdq-tiny) + 0.3(tiny-single).safetensors"     # the web UI's name
        assert merge_of(api, created["id"])["status"] == "pending"
        cancelled = api.delete(f"/api/v1/merges/{created['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        assert merge_of(api, created["id"])["checkpoint"] is None
        names = [c["name"][0] for c in api.get("/checkpoints?checkpoint_type=Stable-diffusion").json()["checkpoints"]]
        assert created["file"] not in names
        assert api.delete(f"/api/v1/merges/{created['id']}").status_code == 200    # cancelling again: no change
    finally:
        api.delete(f"/api/v1/trainings/{busy['id']}")


def test_merges_the_service_cannot_run_get_clear_errors(api, uploads):
    secondary = next(iter(uploads))
    cases = {
        "secondary": {"primary": FOLDER, "secondary": "sdq-tiny-xl"},                # another family
        "primary": {"primary": "no-such-model", "secondary": SINGLE},
        "tertiary": {"primary": FOLDER, "secondary": SINGLE, "method": "add_difference"},
        "multiplier": {"primary": FOLDER, "secondary": SINGLE, "multiplier": 1.5},
        "method": {"primary": FOLDER, "secondary": SINGLE, "method": "average"},
        "dtype": {"primary": FOLDER, "secondary": SINGLE, "dtype": "int8"},
        "name": {"primary": FOLDER, "secondary": SINGLE, "name": "../escape"},
    }
    for field, body in cases.items():
        response = api.post("/api/v1/merges", body)
        assert response.status_code == 422, (field, response.text)
        assert named(response, field), (field, response.json())
    three = api.post("/api/v1/merges", {"primary": FOLDER, "secondary": SINGLE, "tertiary": secondary})
    assert three.status_code == 422 and named(three, "tertiary")       # a weighted sum takes two
    hidden = api.post("/api/v1/merges", {"primary": FOLDER, "secondary": SINGLE, "name": "tiny-single"})
    assert hidden.status_code == 422 and named(hidden, "name")        # it would hide the catalog's model
    sd3 = api.post("/api/v1/merges", {"primary": "sdq-tiny-sd3", "secondary": SINGLE})
    assert sd3.status_code == 422 and named(sd3, "primary") and "folder" in sd3.text
    forbidden = api.post("/api/v1/merges", {"primary": FOLDER, "secondary": SINGLE}, key=KEY_NATIVE_ONLY)
    assert forbidden.status_code == 403 and SINGLE in forbidden.text

    aws_cases = {
        "secondary_model_name": {"primary_model_name": FOLDER, "secondary_model_name": "tiny-xl-single.safetensors"},
        "tertiary_model_name": {"primary_model_name": FOLDER, "secondary_model_name": SINGLE,
                                "interp_method": "Add difference"},
        "interp_amount": {"primary_model_name": FOLDER, "secondary_model_name": SINGLE, "interp_amount": 2},
        "interp_method": {"primary_model_name": FOLDER, "secondary_model_name": SINGLE,
                          "interp_method": "No interpolation"},
        "primary_model_name": {"secondary_model_name": SINGLE},
    }
    for field, body in aws_cases.items():
        response = api.post("/inference/run-model-merge", body)
        assert response.status_code == 422, (field, response.text)
        assert named(response, field), (field, response.json())
    assert api.post("/inference/run-model-merge", key="wrong-key").status_code == 403


def test_an_idempotency_key_makes_a_retried_merge_answer_with_the_first_one(api):
    key = {"Idempotency-Key": f"merge-{uuid.uuid4().hex}"}
    body = {"primary": "sdq-tiny", "secondary": SINGLE, "name": f"idem-{uuid.uuid4().hex[:8]}"}
    first, again = (requests.post(f"{api.base}/api/v1/merges", json=body, headers={**api.headers(), **key}, timeout=30)
                    for _ in range(2))
    assert first.status_code == again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
