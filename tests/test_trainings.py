"""LoRA training jobs through the real stack (issue 16): a dataset uploaded by presigned PUT, a job on the
training pool's own worker, its loss and progress, the LoRA it registers (usable at once by its key only),
cancel, and a SIGKILLed trainer whose job resumes from its last checkpoint in S3."""
from __future__ import annotations

import base64
import io
import json
import math
import signal
import uuid

import pytest
import requests
from PIL import Image
from safetensors.torch import load as load_safetensors

from common.store import keys
from tests.helpers import Receiver, fetch, pixels, stream_events, wait_until

TINY = "sdq-tiny"
FAST_TRAINING = {"model": TINY, "resolution": 64, "learning_rate": 1e-2, "rank": 4, "seed": 3}
COLOURS = ((220, 40, 40), (40, 200, 60), (30, 60, 230))


def png_of(colour: tuple[int, int, int], size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size), colour)
    for x in range(0, size, 8):                                # some structure, not a flat field
        image.paste((255 - colour[0], 255 - colour[1], 255 - colour[2]), (x, 0, x + 4, size))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_dataset(api, images: int = 3) -> str:
    """An Enabled dataset of `images` small images with captions (uploaded by presigned PUT)."""
    name = f"set-{uuid.uuid4().hex[:8]}"
    files = [{"name": f"img{n}.png", "caption": f"a striped square number {n}"} for n in range(images)]
    created = api.post("/api/v1/datasets", {"name": name, "files": files})
    assert created.status_code == 201, created.text
    for n, item in enumerate(created.json()["files"]):
        put = requests.put(item["upload_url"], data=png_of(COLOURS[n % len(COLOURS)]), timeout=30)
        assert put.status_code == 200, put.text
    enabled = api.post(f"/api/v1/datasets/{name}/enable")
    assert enabled.status_code == 200 and enabled.json()["status"] == "Enabled", enabled.text
    return name


def start_training(api, dataset: str, **body) -> dict:
    response = api.post("/api/v1/trainings", {"dataset": dataset, **FAST_TRAINING, **body})
    assert response.status_code == 202, response.text
    return response.json()


def training(api, task_id: str) -> dict:
    response = api.get(f"/api/v1/trainings/{task_id}")
    assert response.status_code == 200, response.text
    return response.json()


def named(response: requests.Response, field: str) -> bool:
    """Whether a native 422 names `field` ({"detail": [{"loc": [..., field, ...], "msg": ...}]})."""
    return any(field in entry["loc"] for entry in response.json()["detail"])


def image_of(api, **body) -> bytes:
    done = api.run(model=TINY, width=64, height=64, num_inference_steps=3, seed=21, **body)
    assert done["status"] == "completed", done
    return pixels(fetch(done["result_url"]))


def test_a_trained_lora_reports_its_loss_and_changes_the_key_s_images(api, api_b, trainer, storage):
    dataset = make_dataset(api)
    lora_name = f"stripes-{uuid.uuid4().hex[:6]}"
    created = start_training(api, dataset, max_steps=6, checkpoint_every=2, trigger_word="sks", lora_name=lora_name)
    assert created["status"] in ("pending", "processing") and created["dataset"] == dataset and created["lora_name"] == lora_name
    assert created["config"]["max_steps"] == 6 and created["config"]["alpha"] == 4.0   # defaults filled
    assert created["events_url"] == f"/api/v1/tasks/{created['id']}/events" and created["lora"] is None

    done = api.wait(created["id"], timeout=300)
    assert done["status"] == "completed", done
    body = training(api, created["id"])
    assert body["progress"] == {"step": 6, "total": 6, "fraction": 1.0}
    assert math.isfinite(body["loss"]) and len(body["loss_curve"]) == 6
    assert [point[0] for point in body["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    lora = body["lora"]
    assert lora["name"] == lora_name and lora["file"] == f"{lora_name}.safetensors" and lora["resumed_from_step"] == 0
    weights = load_safetensors(fetch(lora["download_url"]))              # the file itself, by its presigned URL
    assert weights and all(name.startswith("unet.") for name in weights)
    assert not storage.exists(f"trainings/{created['id']}/state.pt")        # the checkpoint went with the LoRA
    assert created["id"] in [t["id"] for t in api.get("/api/v1/trainings").json()["trainings"]]

    # Usable at once by its key: native `loras`, A1111 <lora:> tags, the listings; it changes the image.
    assert lora_name in [entry["name"] for entry in api.get("/api/v1/loras").json()["loras"]]
    plain, styled = image_of(api), image_of(api, loras=[{"name": lora_name, "weight": 1.0}])
    assert plain != styled
    a1111 = api.post("/sdapi/v1/txt2img", {"prompt": f"a square <lora:{lora_name}:1>", "steps": 3, "width": 64,
                                            "height": 64, "seed": 21, "override_settings": {"sd_model_checkpoint": TINY}})
    assert a1111.status_code == 200, a1111.text
    assert "no such LoRA" not in a1111.text and lora_name in a1111.json()["info"]
    untagged = api.post("/sdapi/v1/txt2img", {"prompt": "a square", "steps": 3, "width": 64, "height": 64, "seed": 21,
                                              "override_settings": {"sd_model_checkpoint": TINY}})
    assert base64.b64decode(a1111.json()["images"][0]) != base64.b64decode(untagged.json()["images"][0])
    assert lora_name in [entry["name"] for entry in api.get("/sdapi/v1/loras").json()]
    aws = {c["name"][0]: c for c in api.get("/checkpoints?checkpoint_type=Lora").json()["checkpoints"]}
    assert aws[f"{lora_name}.safetensors"]["status"] == "Active"

    # Another key: neither the job nor the dataset nor the LoRA exists for it.
    assert api_b.get(f"/api/v1/trainings/{created['id']}").status_code == 404
    assert api_b.delete(f"/api/v1/trainings/{created['id']}").status_code == 404
    assert created["id"] not in [t["id"] for t in api_b.get("/api/v1/trainings").json()["trainings"]]
    assert lora_name not in [entry["name"] for entry in api_b.get("/api/v1/loras").json()["loras"]]
    refused = api_b.post("/api/v1/generate", {"prompt": "x", "model": TINY, "loras": [{"name": lora_name}]})
    assert refused.status_code == 422 and "unknown LoRA" in refused.text
    assert api_b.post("/api/v1/trainings", {"dataset": dataset}).status_code == 404
    ignored = api_b.post("/sdapi/v1/txt2img", {"prompt": f"a square <lora:{lora_name}:1>", "steps": 3, "width": 64,
                                               "height": 64, "seed": 21,
                                               "override_settings": {"sd_model_checkpoint": TINY}})
    assert ignored.status_code == 200 and "no such LoRA" in ignored.text


def bodies(receiver: Receiver) -> list[dict]:
    """What a webhook receiver got so far, parsed."""
    return [json.loads(r["body"]) for r in receiver.received]


def test_progress_events_and_webhooks_carry_the_loss_and_the_lora(api, trainer):
    receiver = Receiver()
    try:
        created = start_training(api, make_dataset(api, images=2), max_steps=4, checkpoint_every=0,
                                 callback_url=receiver.url, callback_events=["progress", "completed"])
        events = stream_events(api, created["id"])
        progress = [e.data for e in events if e.kind == "progress"]
        assert progress and all(math.isfinite(p["loss"]) for p in progress)
        assert events[-1].kind == "completed"
        final = wait_until(lambda: next((b for b in bodies(receiver) if "status" in b), None), what="final webhook")
        assert final["status"] == "completed" and final["lora"]["name"] == created["lora_name"]
        hooked = [b["data"] for b in bodies(receiver) if b.get("type") == "progress"]
        assert all(math.isfinite(data["loss"]) for data in hooked)
    finally:
        receiver.close()


def test_a_training_job_is_cancelled_mid_run_and_makes_no_lora(api, trainer, storage, settings):
    created = start_training(api, make_dataset(api), max_steps=5000, checkpoint_every=5)
    state_key = f"{settings.training.prefix}/{created['id']}/state.pt"
    api.wait_for(created["id"], lambda t: t["status"] == "processing" and t["progress"]["step"] > 5, timeout=180)
    cancelled = api.delete(f"/api/v1/trainings/{created['id']}")
    assert cancelled.status_code in (200, 202), cancelled.text
    done = api.wait(created["id"], timeout=120)
    assert done["status"] == "cancelled"
    body = training(api, created["id"])
    assert body["lora"] is None and 0 < body["progress"]["step"] < 5000
    assert created["lora_name"] not in [entry["name"] for entry in api.get("/api/v1/loras").json()["loras"]]
    assert not storage.exists(state_key)                      # nothing will resume it: its checkpoint is gone
    assert api.delete(f"/api/v1/trainings/{created['id']}").status_code == 200     # cancelling again: no change


def test_a_killed_trainer_s_job_resumes_from_its_last_checkpoint(stack, api, trainer, rds, storage, settings):
    # Enough steps that the kill lands mid-run on a fast machine too (the tiny model makes ~100 steps/s).
    created = start_training(api, make_dataset(api), max_steps=1000, checkpoint_every=10, resolution=128)
    state_key = f"{settings.training.prefix}/{created['id']}/state.pt"
    api.wait_for(created["id"], lambda t: t["progress"]["step"] >= 25, timeout=240)
    assert storage.exists(state_key)
    killed = stack.services["trainer"]
    killed.signal(signal.SIGKILL)
    killed.proc.wait(10)
    stack.start_worker("trainer", "--pool", settings.training.queue)      # a fresh process (new identity)

    done = api.wait(created["id"], timeout=600)
    assert done["status"] == "completed", done
    assert rds.hget(keys.TASK(created["id"]), "attempt") == "1"
    body = training(api, created["id"])
    resumed = body["lora"]["resumed_from_step"]
    assert resumed >= 20 and resumed % 10 == 0                     # from its newest checkpoint, not from zero
    assert body["progress"] == {"step": 1000, "total": 1000, "fraction": 1.0}
    curve = body["loss_curve"]                             # every step, resumed ones too, averaged into buckets
    assert len(curve) <= settings.training.curve_points and curve[-1][0] == 1000
    assert not storage.exists(state_key)


def test_training_requests_the_service_cannot_run_get_clear_errors(api):
    missing = api.post("/api/v1/trainings", {"dataset": "no-such-dataset"})
    assert missing.status_code == 404 and "not found" in missing.text
    pending = f"set-{uuid.uuid4().hex[:8]}"
    assert api.post("/api/v1/datasets", {"name": pending, "files": [{"name": "a.png"}]}).status_code == 201
    not_enabled = api.post("/api/v1/trainings", {"dataset": pending})
    assert not_enabled.status_code == 409 and "enable" in not_enabled.text
    dataset = make_dataset(api, images=1)
    cases = {
        "model": {"model": "sdq-tiny-flux"},
        "max_steps": {"max_steps": 10**9},
        "epochs": {"max_steps": 5, "epochs": 2},
        "resolution": {"resolution": 100},
        "lora_name": {"lora_name": "../escape"},
        "lora_name ": {"lora_name": "tiny_style"},                 # the shared directory's would win over it
        "lr_scheduler": {"lr_scheduler": "sometimes"},
        "rank": {"rank": 0},
        "callback_events": {"callback_events": ["progress"]},
    }
    for field, extra in cases.items():
        response = api.post("/api/v1/trainings", {"dataset": dataset, **extra})
        assert response.status_code == 422, (field, response.text)
        assert named(response, field.strip()), (field, response.json())
    unknown_model = api.post("/api/v1/trainings", {"dataset": dataset, "model": "no-such-model"})
    assert unknown_model.status_code == 422 and named(unknown_model, "model")


def test_an_sdxl_lora_trains_and_fits_sdxl_only(api, trainer):
    created = start_training(api, make_dataset(api, images=2), model="sdq-tiny-xl", max_steps=2, checkpoint_every=0)
    assert api.wait(created["id"], timeout=300)["status"] == "completed"
    lora_name = training(api, created["id"])["lora"]["name"]
    done = api.run(model="sdq-tiny-xl", width=64, height=64, num_inference_steps=2, loras=[{"name": lora_name}])
    assert done["status"] == "completed", done
    misfit = api.post("/api/v1/generate", {"prompt": "x", "model": TINY, "loras": [{"name": lora_name}]})
    assert misfit.status_code == 422 and "does not fit" in misfit.text and named(misfit, "loras")
    listed = {entry["name"]: entry for entry in api.get("/api/v1/loras").json()["loras"]}
    assert listed[lora_name]["source"] == "own" and listed[lora_name]["family"] == "sdxl"
    assert listed[lora_name]["training_job"] == created["id"] and listed["tiny_style"]["source"] == "directory"

    # The key deletes its own LoRA; the shared directory's are not a key's to delete.
    assert api.delete(f"/api/v1/loras/{lora_name}").status_code == 204
    assert training(api, created["id"])["lora"]["download_url"] is None
    gone = api.post("/api/v1/generate", {"prompt": "x", "model": "sdq-tiny-xl", "loras": [{"name": lora_name}]})
    assert gone.status_code == 422 and "unknown LoRA" in gone.text
    assert api.delete(f"/api/v1/loras/{lora_name}").status_code == 404
    assert api.delete("/api/v1/loras/tiny_style").status_code == 409


def submit_with(api, body: dict, headers: dict) -> requests.Response:
    return requests.post(f"{api.base}/api/v1/trainings", json=body, headers={**api.headers(), **headers}, timeout=30)


def test_an_idempotency_key_makes_a_retried_training_submission_answer_with_the_first_job(api):
    dataset, key = make_dataset(api, images=1), {"Idempotency-Key": f"train-{uuid.uuid4().hex}"}
    body = {"dataset": dataset, **FAST_TRAINING, "max_steps": 1}
    first, again = submit_with(api, body, key), submit_with(api, body, key)
    assert first.status_code == again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = submit_with(api, {**body, "max_steps": 2}, key)
    assert other.status_code == 422 and named(other, "Idempotency-Key")
    refused = {"Idempotency-Key": f"train-{uuid.uuid4().hex}"}
    assert submit_with(api, {**body, "dataset": "no-such-set"}, refused).status_code == 404
    retried = submit_with(api, body, refused)        # a refused submission frees its key
    assert retried.status_code == 202 and "Idempotent-Replayed" not in retried.headers


def test_a_trainer_told_to_stop_checkpoints_at_once_and_its_job_resumes_there(stack, api, trainer, rds, settings):
    """A warm shutdown (SIGTERM: a rolling restart) does not wait hours for the job nor lose steps: the job saves a
    checkpoint at its next step, the worker exits, and the next trainer resumes from that step."""
    created = start_training(api, make_dataset(api), max_steps=1000, checkpoint_every=500, resolution=128)
    seen = api.wait_for(created["id"], lambda t: t["progress"]["step"] >= 20, timeout=240)["progress"]["step"]
    stopped = stack.services["trainer"]
    stopped.signal(signal.SIGTERM)
    assert stopped.proc.wait(120) == 0                                    # a clean exit, long before the job's end
    stack.start_worker("trainer", "--pool", settings.training.queue)

    done = api.wait(created["id"], timeout=600)
    assert done["status"] == "completed", done
    assert rds.hget(keys.TASK(created["id"]), "attempt") == "1"
    resumed = training(api, created["id"])["lora"]["resumed_from_step"]
    # Where it stopped: a checkpoint made for the stop (neither 0 nor a periodic one), however fast the steps ran.
    assert resumed >= seen and resumed % 500 != 0


def test_an_old_attempt_never_touches_the_checkpoint_a_newer_one_resumes_from(rds, storage, settings):
    """An attempt cut off from Redis trains on; once the reaper resent the job it must neither overwrite the
    newer attempt's checkpoint, nor delete it (a failure, or its own end), nor register a LoRA."""
    from types import SimpleNamespace

    from common.errors import StaleAttempt
    from common.queue import MessageBuilder, create_celery
    from common.store import TaskStore
    from tests.test_taskstore import running_job, spec, take
    from worker.trainingjob import drop_state, save_state, still_mine
    from worker.training import TrainingState

    store, queue = TaskStore(rds, 600), f"stale-{uuid.uuid4().hex[:8]}"
    task_id = str(uuid.uuid4())
    store.create(task_id, "owner-x", spec(), queue)
    take(store, queue, "old-worker")
    store.requeue(running_job(store, task_id), MessageBuilder(create_celery(settings)).generate(task_id, 1, queue), 10)
    key = f"{settings.training.prefix}/{task_id}/state.pt"
    storage.put(key, b"the newer attempt's checkpoint", "application/octet-stream")
    old = SimpleNamespace(store=store, storage=storage, info=SimpleNamespace(id="old-worker"))
    state = TrainingState(step=1, lora_state_dict={}, optimizer_state={}, scheduler_state={}, rng_states={})
    with pytest.raises(StaleAttempt):
        save_state(old, task_id, 0, key, state)
    with pytest.raises(StaleAttempt):
        still_mine(old, task_id, 0)                    # checked before a LoRA is registered
    drop_state(old, task_id, 0, key)
    assert storage.get(key) == b"the newer attempt's checkpoint"
