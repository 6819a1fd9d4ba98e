"""The AWS SD extension's training API against the real stack: a dataset through its /dataset routes, POST /train
(Initial), PUT /train (Training), GET /trains until Complete, the LoRA used by /inference/v2; a base model uploaded
as a .tar through POST/PUT /model and trained on; PUT /inference/v2/{id}/run both ways; errors in its shapes."""
from __future__ import annotations

import io
import tarfile
import uuid

import requests

from tests.helpers import wait_until
from tests.test_trainings import COLOURS, png_of

TINY = "sdq-tiny"
FAST = {"resolution": 64, "seed": 3}       # with 2 images and 2 epochs: 4 steps


def aws_dataset(api, images: int = 2, enable: bool = True) -> tuple[str, str]:
    """A dataset made through the extension's routes (presigned PUTs, captions as .txt files): (name, s3)."""
    name = f"aws-set-{uuid.uuid4().hex[:8]}"
    content = [{"filename": f"/photos/img{n}.png", "name": f"img{n}.png", "type": "png"} for n in range(images)]
    content.append({"filename": "/photos/img0.txt", "name": "img0.txt", "type": "txt"})
    created = api.post("/dataset", {"dataset_name": name, "content": content, "params": {"description": "stripes"}})
    assert created.status_code == 200, created.text
    urls = created.json()["s3PresignUrl"]
    for n in range(images):
        assert requests.put(urls[f"/photos/img{n}.png"], data=png_of(COLOURS[n % 3]), timeout=30).status_code == 200
    assert requests.put(urls["/photos/img0.txt"], data=b"a striped square", timeout=30).status_code == 200
    if enable:
        enabled = api.put("/dataset", {"dataset_name": name, "status": "Enabled"})
        assert enabled.status_code == 200, enabled.text
    listed = {d["datasetName"]: d for d in api.get("/datasets").json()["datasets"]}
    return name, listed[name]["s3"]


def dreambooth_body(data: str, lora_name: str, model_id: str | None = None, **config) -> dict:
    """The document's POST /train body (its /inference/v2/{id}/run example), made small."""
    body = {"train_type": "Stable-diffusion", "params": {
        "training_params": {"data_tar_list": [data], "class_data_tar_list": [""],
                            "training_instance_type": "ml.g5.2xlarge"},
        "config_params": {"concepts_list": [{"class_data_dir": "", "class_prompt": "", "instance_prompt": "sks",
                                             "num_class_images_per": 0, "is_valid": True}],
                          "model_dir": "models/dreambooth/", "model_name": lora_name, "num_train_epochs": 2,
                          "use_lora": True, "lora_learning_rate": 1e-2, "revision": "", **FAST, **config}}}
    if model_id is not None:
        body["model_id"] = model_id
    return body


def kohya_body(data: str, model: str, lora_name: str) -> dict:
    """A kohya job: the base and dataset in training_params, the toml's sections in config_params."""
    return {"train_type": "Stable-diffusion", "lora_train_type": "kohya", "params": {
        "training_params": {"s3_model_path": model, "s3_data_path": data, "training_instance_type": "ml.g5.2xlarge"},
        "config_params": {"training": {"max_train_epochs": 2, "seed": 3},
                          "additional_network": {"network_module": "networks.lora", "network_dim": 4,
                                                 "network_alpha": 4, "unet_lr": 1e-2},
                          "dataset": {"resolution": "64,64"}, "saving": {"output_name": lora_name}}}}


def listed_job(api, job_id: str) -> dict:
    return next(j for j in api.get("/trains").json()["trainJobs"] if j["id"] == job_id)


def wait_trained(api, job_id: str) -> dict:
    return wait_until(lambda: (j := listed_job(api, job_id))["status"] in ("Complete", "Fail") and j,
                      timeout=300, what=f"training job {job_id}")


def wait_inference(api, job_id: str) -> dict:
    def ended():
        job = api.get("/inference/get-inference-job", params={"jobID": job_id}).json()
        return job["status"] != "inprogress" and job
    return wait_until(ended, timeout=180, what=f"inference job {job_id}")


def start(api, job_id: str) -> dict:
    started = api.put("/train", {"train_job_id": job_id, "status": "Training"})
    assert started.status_code == 200, started.text
    return started.json()


def test_a_kohya_job_is_created_started_and_its_lora_runs_in_inference(api, api_b, trainer):
    dataset, s3 = aws_dataset(api)
    lora = f"aws-lora-{uuid.uuid4().hex[:6]}"
    created = api.post("/train", kohya_body(s3, TINY, lora))
    assert created.status_code == 200, created.text
    body = created.json()
    job = body["job"]
    assert body["statusCode"] == 200 and body["s3PresignUrl"] is None
    assert job["status"] == "Initial" and job["trainType"] == "Stable-diffusion"
    assert set(job) == {"id", "status", "trainType", "params", "input_location", "warnings"}
    assert any("have no caption" in w for w in job["warnings"])                  # img1.png has no .txt
    assert job["params"]["training_type"] == "kohya" and job["params"]["training_params"]["s3_data_path"] == s3
    assert job["input_location"].startswith("s3://") and job["input_location"].endswith(f"/{job['id']}/input")
    listed = listed_job(api, job["id"])
    assert listed["status"] == "Initial" and listed["sagemakerTrainName"] == "" and listed["modelName"] == TINY
    assert api.get(f"/api/v1/trainings/{job['id']}").status_code == 404        # no task before PUT /train

    started = start(api, job["id"])
    assert started["statusCode"] == 200 and started["job"]["id"] == job["id"]
    assert started["job"]["status"] == "Training" and isinstance(started["job"]["created"], float)
    again = start(api, job["id"])                                               # idempotent: one task
    assert again["job"]["status"] in ("Training", "Complete")
    other = api.put("/train", {"train_job_id": job["id"], "status": "Stopped"})
    assert other.json() == {"statusCode": 200, "msg": "not implemented for train job status Stopped"}

    done = wait_trained(api, job["id"])
    assert done["status"] == "Complete", done
    made = done["params"]["resp"]["lora"]
    assert made["name"] == lora and made["file"] == f"{lora}.safetensors" and made["checkpoint_id"]
    native = api.get(f"/api/v1/trainings/{job['id']}").json()                    # the same job, natively
    assert native["status"] == "completed" and native["config"]["rank"] == 4 and native["config"]["resolution"] == 64
    assert native["config"]["max_steps"] == 4 and native["dataset"] == dataset
    assert native["config"]["trigger_word"] == ""
    assert [j["id"] for j in api.get("/trains?status=Complete").json()["trainJobs"]].count(job["id"]) == 1
    assert job["id"] not in [j["id"] for j in api.get("/trains?status=Initial").json()["trainJobs"]]
    assert job["id"] not in [j["id"] for j in api.get("/trains?types=Lora").json()["trainJobs"]]

    infer = {"task_type": "txt2img", "models": {"Stable-diffusion": [TINY], "Lora": [made["file"]]},
             "sagemaker_endpoint_name": "gpu", "prompt": f"a square <lora:{lora}:1>", "steps": 3, "width": 64,
             "height": 64, "seed": 21}
    submitted = api.post("/inference/v2", infer)
    assert submitted.status_code == 200, submitted.text
    inference_id = submitted.json()["inference_id"]
    ended = wait_inference(api, inference_id)
    assert ended["status"] == "succeed", ended
    assert "warnings" not in ended or not any("LoRA" in w for w in ended["warnings"])

    # PUT /inference/v2/{id}/run without a training body: the inference job as get-inference-job shows it.
    run = api.put(f"/inference/v2/{inference_id}/run")
    assert run.status_code == 200 and run.json() == ended
    missing = api.put(f"/inference/v2/{uuid.uuid4()}/run")
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]

    # Another key: no such job, and the LoRA is not its own.
    assert job["id"] not in [j["id"] for j in api_b.get("/trains").json()["trainJobs"]]
    refused = api_b.post("/inference/v2", infer)
    assert refused.status_code == 400 and "is not found" in refused.text


def model_tar(settings, member: str) -> bytes:
    """The extension's upload: a .tar holding the checkpoint (tests/conftest.py's tiny SD 1.x single file)."""
    data = (settings.models_dir / "tiny-single.safetensors").read_bytes()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        readme = tarfile.TarInfo("README.txt")
        readme.size = 5
        archive.addfile(readme, io.BytesIO(b"hello"))
        info = tarfile.TarInfo(member)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def upload_model(api, name: str, filename: str, data: bytes) -> dict:
    """POST /model, PUT the one part to its presigned URL, PUT /model Creating; the model once it ended."""
    create = {"model_type": "Stable-diffusion", "name": name, "filenames": [{"filename": filename, "parts_number": 1}],
              "params": {"create_model_params": {"new_model_name": name, "ckpt_path": "v1-5-pruned-emaonly.safetensors",
                                                 "from_hub": False, "extract_ema": False, "is_512": True}}}
    created = api.post("/model", create)
    assert created.status_code == 200, created.text
    body = created.json()
    job = body["job"]
    assert body["statusCode"] == 200 and job["status"] == "Initial" and job["model_type"] == "Stable-diffusion"
    assert job["s3_base"].startswith("s3://") and job["params"] == create["params"]
    (url,) = body["s3PresignUrl"][filename]
    put = requests.put(url, data=data, timeout=60)
    assert put.status_code == 200, put.text
    tags = {filename: [{"ETag": put.headers["ETag"].strip('"'), "PartNumber": 1}]}
    creating = api.put("/model", {"model_id": job["id"], "status": "Creating", "multi_parts_tags": tags})
    assert creating.status_code == 200, creating.text
    answer = creating.json()
    assert answer["statusCode"] == 200 and answer["job"]["id"] == job["id"] and answer["job"]["jobType"] == \
        "Stable-diffusion" and answer["job"]["jobStatus"] in ("Creating", "Complete")
    assert answer["job"]["output_path"] == job["s3_base"]

    def ended():
        model = next(m for m in api.get("/models").json()["models"] if m["id"] == job["id"])
        return model["status"] in ("Complete", "Fail") and model
    return wait_until(ended, timeout=120, what=f"model {job['id']}")


def test_a_model_uploaded_as_a_tar_becomes_a_checkpoint_and_is_trained_on(api, trainer, settings, storage):
    name = f"base-{uuid.uuid4().hex[:6]}"
    model = upload_model(api, name, "v1-5-pruned-emaonly.safetensors.tar",
                         model_tar(settings, "models/Stable-diffusion/v1-5-pruned-emaonly.safetensors"))
    assert model["status"] == "Complete", model
    assert model["model_name"] == name and model["checkpoint_name"] == f"{name}.safetensors"
    assert isinstance(model["created"], float) and model["output_s3_location"].startswith("s3://")
    checkpoint = api.get("/checkpoint", params={"id": model["checkpoint_id"]}).json()["checkpoint"]
    assert checkpoint["status"] == "Active" and checkpoint["name"] == [f"{name}.safetensors"]
    prefix = checkpoint["s3_location"].split("/", 3)[3]
    expected = (settings.models_dir / "tiny-single.safetensors").read_bytes()
    assert storage.get(f"{prefix}/{name}.safetensors") == expected                  # unpacked as it was
    assert not storage.exists(f"{prefix}/v1-5-pruned-emaonly.safetensors.tar")     # the archive is gone
    assert model["id"] in [m["id"] for m in api.get("/models?types=Stable-diffusion&status=Complete").json()["models"]]
    assert model["id"] not in [m["id"] for m in api.get("/models?status=Fail").json()["models"]]
    again = api.put("/model", {"model_id": model["id"], "status": "Creating"})     # idempotent once Complete
    assert again.status_code == 200 and again.json()["job"]["jobStatus"] == "Complete"

    # Trained on with model_id; the body sent to PUT /inference/v2/{id}/run, as the document lists it.
    _, s3 = aws_dataset(api)
    lora = f"on-{name}"
    created = api.put(f"/inference/v2/{uuid.uuid4()}/run", dreambooth_body(s3, lora, model["id"]))
    assert created.status_code == 200, created.text
    job = created.json()["job"]
    assert job["status"] == "Initial" and created.json()["s3PresignUrl"] is None
    assert job["params"]["training_params"]["model_name"] == name and job["params"]["training_type"] == "dreambooth"
    start(api, job["id"])
    done = wait_trained(api, job["id"])
    assert done["status"] == "Complete", done
    assert done["modelName"] == name and done["sagemakerTrainName"] == job["id"]
    native = api.get(f"/api/v1/trainings/{job['id']}").json()
    assert native["model"] == f"{name}-{model['checkpoint_id'][:8]}.safetensors"   # the worker's copy of the upload
    assert native["config"]["trigger_word"] == "sks" and native["lora"]["name"] == lora
    shared = [m["name"] for m in api.get("/api/v1/models").json()["models"]]
    assert native["model"] not in shared         # the key's own checkpoint stays out of the shared catalog


def test_a_model_may_name_what_exists_and_a_bad_upload_fails_with_its_reason(api, settings):
    named = api.post("/model", {"model_type": "Stable-diffusion", "name": "named-tiny",
                                "params": {"create_model_params": {"ckpt_path": TINY}}})
    assert named.status_code == 200, named.text
    assert named.json()["job"]["status"] == "Complete" and named.json()["s3PresignUrl"] == {}
    listed = next(m for m in api.get("/models").json()["models"] if m["id"] == named.json()["job"]["id"])
    assert listed["catalog_model"] == TINY and listed["status"] == "Complete"

    raw = upload_model(api, f"raw-{uuid.uuid4().hex[:6]}", "mine.safetensors",
                       (settings.models_dir / "tiny-single.safetensors").read_bytes())
    assert raw["status"] == "Complete" and raw["checkpoint_name"] == f"{raw['model_name']}.safetensors"
    by_id = api.post("/model", {"model_type": "Stable-diffusion", "name": "by-id", "checkpoint_id": raw["checkpoint_id"]})
    assert by_id.json()["job"]["status"] == "Complete"

    broken = upload_model(api, f"broken-{uuid.uuid4().hex[:6]}", "broken.tar", b"this is not a tar archive" * 40)
    assert broken["status"] == "Fail" and "not a readable tar archive" in broken["error"]
    empty = upload_model(api, f"empty-{uuid.uuid4().hex[:6]}", "empty.tar", tar_of({"notes.txt": b"no weights"}))
    assert empty["status"] == "Fail" and "holds no .safetensors or .ckpt file" in empty["error"]


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def refused(response: requests.Response, status: int, *words: str) -> None:
    """An error in the extension's model-API shape, naming what is wrong."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"statusCode", "error"} and body["statusCode"] == status, body
    assert all(word in body["error"] for word in words), body


def test_requests_it_cannot_run_get_the_extension_s_errors(api):
    _, s3 = aws_dataset(api, images=1)
    refused(api.post("/train", dreambooth_body(s3, "x", use_lora=False)), 400, "use_lora", "LoRAs only")
    refused(api.post("/train", dreambooth_body(s3.rsplit("/", 1)[0] + "/no-such-set", "x")), 404,
            "data_tar_list", "is not found")
    refused(api.post("/train", dreambooth_body("no-such-set", "x")), 404, "is not found")
    pending, pending_s3 = aws_dataset(api, images=1, enable=False)
    refused(api.post("/train", dreambooth_body(pending_s3, "x")), 400, "is Initialed", "enable")
    refused(api.post("/train", dreambooth_body(s3, "x", model_id=str(uuid.uuid4()))), 404, "model with id",
            "is not found")
    initial = api.post("/model", {"model_type": "Stable-diffusion", "name": "never-uploaded",
                                  "filenames": [{"filename": "m.tar"}]}).json()["job"]["id"]
    refused(api.post("/train", dreambooth_body(s3, "x", model_id=initial)), 400, "in Initial state")
    refused(api.post("/train", dreambooth_body(s3, "x", num_train_epochs="many")), 400,
            "params.config_params.num_train_epochs")
    refused(api.post("/train", dreambooth_body(s3, "bad name!")), 400, "params.config_params.model_name")
    refused(api.post("/train", dreambooth_body(s3, "x", resolution=100)), 400, "params.config_params.resolution")
    body = dreambooth_body(s3, "x")
    body["params"]["training_params"]["class_data_tar_list"] = ["s3://bucket/class/"]
    refused(api.post("/train", body), 400, "class_data_tar_list", "not supported")
    body = kohya_body(s3, "no-such-model.safetensors", "x")
    refused(api.post("/train", body), 400, "s3_model_path", "is not found")
    body["params"]["training_params"]["s3_model_path"] = "sdq-tiny-flux"
    refused(api.post("/train", body), 400, "s3_model_path", "flux")
    refused(api.post("/train", {"params": {"training_params": {}}}), 400, "train_type")
    refused(api.put(f"/inference/v2/{uuid.uuid4()}/run", {"train_type": "Lora", "params": []}), 400, "params")
    refused(api.put("/train", {"train_job_id": str(uuid.uuid4()), "status": "Training"}), 404, "is not found")
    refused(api.post("/model", {"model_type": "Stable-diffusion", "name": "nothing"}), 400,
            "either checkpoint_id or filenames")
    refused(api.post("/model", {"model_type": "Stable-diffusion", "name": "tiny-single",
                                "filenames": [{"filename": "m.tar"}]}), 400, "already in the workers")
    refused(api.post("/model", {"model_type": "Stable-diffusion", "name": "m", "filenames": [{"filename": "m.zip"}]}),
            400, "filenames")
    refused(api.put("/model", {"model_id": str(uuid.uuid4()), "status": "Creating"}), 404, "is not found")
    refused(api.put("/model", {"model_id": initial, "status": "Complete"}), 400, "Creating")


def test_the_webui_s_uploaded_db_config_sets_the_training(api, trainer):
    """The extension's WebUI sends its dreambooth settings as db_config.tar (uploaded to the job's presigned URL),
    not in config_params: PUT /train reads it; values the body gives win."""
    import json

    _, s3 = aws_dataset(api)
    body = {"train_type": "Stable-diffusion", "filenames": ["db_config.tar"],
            "params": {"training_params": {"data_tar_list": [s3], "training_instance_type": "ml.g5.2xlarge"},
                       "config_params": {"seed": 3}}}
    created = api.post("/train", body)
    assert created.status_code == 200, created.text
    job = created.json()["job"]
    config = {"model_name": f"from-file-{uuid.uuid4().hex[:6]}", "num_train_epochs": 1, "lora_unet_rank": 2,
              "lora_learning_rate": 0.01, "resolution": 64, "use_lora": True, "seed": 99,
              "concepts_list": [{"instance_prompt": "zzx", "class_prompt": ""}]}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        data = json.dumps(config).encode()
        info = tarfile.TarInfo("db_config.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    put = requests.put(created.json()["s3PresignUrl"]["db_config.tar"], data=archive.getvalue(), timeout=30)
    assert put.status_code == 200, put.text
    start(api, job["id"])
    assert wait_trained(api, job["id"])["status"] == "Complete"
    native = api.get(f"/api/v1/trainings/{job['id']}").json()
    assert native["lora_name"] == config["model_name"] and native["config"]["rank"] == 2
    assert native["config"]["trigger_word"] == "zzx" and native["config"]["seed"] == 3    # the body's seed wins

    broken = api.post("/train", body).json()
    requests.put(broken["s3PresignUrl"]["db_config.tar"], data=b"not a tar", timeout=30)
    refused = api.put("/train", {"train_job_id": broken["job"]["id"], "status": "Training"})
    assert refused.status_code == 400 and "db_config.tar" in refused.json()["error"]
