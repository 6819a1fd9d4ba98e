"""The native API's translation: a validated request -> the canonical JobSpec, a task -> its JSON.

Why public (the package exports these): api/fastsubmit.py answers well-formed
submissions before Flask with the same builder and the same 202 body.
"""
from __future__ import annotations

from flask_smorest import abort

from api.auth import ApiKey
from api.controlnet import NATIVE_NAMES, UnitRequest, plan_controlnet
from api.inpaint import plan_inpaint
from api.loras import owned_loras
from api.uploads import owned_model
from api.modelfit import DEFAULT_REFINER_SWITCH, abort_unless_fits, default_scheduler, image_size
from api.services import Services
from api.submission import resolve_seed
from common.catalog import ModelInfo
from common.timestamps import iso
from common.jobspec import JobSpec, LoraRef
from common.store.results import EVENT_KINDS
from common.promptsyntax import A1111
from common.storage import Storage, task_metadata
from common.store import Task, TaskStatus, TaskStore


CREATED_MESSAGE = "任务已创建，正在处理中"   # the original service's exact message


def created_body(task_id: str) -> dict:
    """The 202 answer to a submission."""
    return {"task_id": task_id, "status": TaskStatus.PENDING.value, "message": CREATED_MESSAGE}


def build_jobspec(data: dict, svc: Services, key: ApiKey, init_image_key: str | None = None) -> JobSpec:
    """Native request (validated) -> canonical job, every value it leaves out filled from its model's defaults."""
    model_name = data["model"] or svc.catalog.default_model()
    if model_name is None:
        abort(503, message="no model is available yet; add one to the model directory")
    if not key.may_use_model(model_name):
        abort(403, message=f"this API key may not use model '{model_name}'")
    if not key.may_use_priority(data["priority"]):
        abort(403, message=f"this API key may not use priority '{data['priority']}'")
    model, assets = svc.catalog.model(model_name), []
    own = owned_model(svc, key.owner, model_name) if model is None and data["model"] else None
    if own is not None:                        # one of the key's own checkpoints (uploaded, or a merge's result)
        model, assets = own[0], [own[1]]
    if model is None:
        abort(503, message=f"model '{model_name}' is not in the model directory")
    defaults = model.request_defaults
    image = data["init_image"]
    if image is not None:
        width, height = image_size(image.width, image.height, model)
    else:
        width, height = data["width"] or defaults.width, data["height"] or defaults.height
    mode = ("inpaint" if data.get("mask_image") is not None else "img2img") if image is not None else "txt2img"
    scheduler = data["scheduler"] or defaults.scheduler or default_scheduler(svc.settings, model)
    refiner = svc.catalog.model(data["refiner"]) if data["refiner"] else None
    if refiner is not None and not key.may_use_model(refiner.name):
        abort(403, message=f"this API key may not use model '{refiner.name}'")
    available = svc.catalog.loras()
    loras, lora_assets = key_loras(svc, key, model, data["loras"])
    steps = data["num_inference_steps"] or defaults.steps
    switch = data["refiner_switch"] or DEFAULT_REFINER_SWITCH
    abort_unless_fits(model, mode=mode, width=width, height=height, scheduler=data["scheduler"],
                      negative_prompt=data["negative_prompt"], refiner=refiner, steps=steps, refiner_switch=switch,
                      prompt_syntax=data["prompt_syntax"],
                      loras=[(lr["name"], available[lr["name"]]) for lr in data["loras"] if lr["name"] in available])
    return JobSpec(
        prompt=data["prompt"], negative_prompt=data["negative_prompt"], model=model.name,
        width=width, height=height, num_images=data["num_images"],
        num_inference_steps=steps,
        guidance_scale=data["guidance_scale"] if data["guidance_scale"] is not None else defaults.guidance_scale,
        strength=(data["strength"] if data["strength"] is not None else defaults.strength) if image else None,
        scheduler=scheduler, seed=resolve_seed(data["seed"]), output_format=data["output_format"],
        init_image_key=init_image_key, loras=loras, assets=[*assets, *lora_assets],
        callback_url=data["callback_url"], dialect="native", priority=data["priority"],
        refiner=refiner.name if refiner else None,
        refiner_switch=switch if refiner else None, family=model.family,
        inpaint_fill=data["masked_content"] if mode == "inpaint" else None,
        prompt_syntax=A1111 if data["prompt_syntax"] == A1111 else None,
        preview_every=data["preview_every"],
        callback_events=sorted(set(data["callback_events"]), key=EVENT_KINDS.index) if data["callback_events"] else None,
    )


def key_loras(svc: Services, key: ApiKey, model: ModelInfo, requested: list[dict]) -> tuple[list[LoraRef], list[dict]]:
    """The job's LoRAs and the files a worker fetches for them: names of the LoRA directory as they are, the key's
    own LoRAs (api/loras.py) by their worker-side names; a 422 for one of the key's that does not fit `model`."""
    local = svc.catalog.loras()
    owned = owned_loras(svc, key.owner) if any(lr["name"] not in local for lr in requested) else {}
    refs, assets, misfits = [], [], {}
    for i, lr in enumerate(requested):
        mine = owned.get(lr["name"]) if lr["name"] not in local else None
        if mine is None:
            refs.append(LoraRef(lr["name"], lr["weight"]))
            continue
        if problem := mine.problem_with(model):
            misfits[i] = {"name": [f"LoRA '{lr['name']}' does not fit {model.name}: {problem}"]}
        refs.append(LoraRef(mine.local_name, lr["weight"]))
        assets.append(mine.asset)
    if misfits:
        abort(422, errors={"json": {"loras": misfits}})
    return refs, assets


def attach_mask(svc: Services, spec: JobSpec, data: dict, task_id: str) -> None:
    """Inpainting: the mask, prepared as the web UI prepares one (blurred, at the job's size), stored for the
    worker; the job becomes an inpainting job."""
    plan = plan_inpaint(data["mask_image"], data["init_image"], spec.width, spec.height, blur_x=data["mask_blur"],
                        blur_y=data["mask_blur"], fill=data["masked_content"])
    spec.mask_image_key = svc.storage.input_key(task_id, "mask.png")
    svc.storage.put(spec.mask_image_key, plan.mask_png, "image/png", metadata=task_metadata(task_id))


def attach_controlnet(svc: Services, spec: JobSpec, data: dict, task_id: str) -> None:
    """The request's ControlNet units, checked and their images stored (api/controlnet.py)."""
    if spec.refiner:
        abort(422, errors={"json": {"controlnet": ["ControlNet runs without a refiner pass; leave refiner out"]}})
    units = [UnitRequest(model=u["model"], image=u["image"], where=("controlnet", str(i)), names=NATIVE_NAMES,
                         scale=u["scale"], start=u["start"], end=u["end"], preprocessor=u["preprocessor"],
                         low=u["low_threshold"], high=u["high_threshold"], processor_res=u["processor_res"],
                         resize_mode=u["resize_mode"], guess_mode=u["guess_mode"])
             for i, u in enumerate(data["controlnet"])]
    if len({u.guess_mode for u in units}) > 1:
        abort(422, errors={"json": {"controlnet": ["guess_mode applies to the whole call: every unit must agree"]}})
    spec.controlnet = plan_controlnet(svc, units, svc.catalog.model(spec.model), task_id,
                                      spec.init_image_key is not None)


def image_urls(task: Task, storage: Storage) -> list[str]:
    return [storage.url_for(key) for key in task.result_keys]


def render_task(task: Task, storage: Storage, store: TaskStore) -> dict:
    """A task as GET /api/v1/tasks/{id} shows it (the original's fields plus progress, priority, seeds)."""
    urls = image_urls(task, storage) if task.status is TaskStatus.COMPLETED else []
    total = task.progress_total
    return {
        "task_id": task.id,
        "status": task.status.value,
        "result_url": urls[0] if len(urls) == 1 else None,
        "result_urls": urls if len(urls) > 1 else None,
        "error_message": task.error if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED) else None,
        "created_at": iso(task.created_at),
        "updated_at": iso(task.updated_at),
        "progress": {"step": task.progress_step, "total": total,
                     "fraction": round(task.progress_step / total, 4) if total else 0.0},
        "queue_position": store.queue_position(task),
        "priority": task.spec.priority,
        "seeds": task.seeds or task.spec.seeds,
        "model": task.spec.model,
        "num_images": task.spec.num_images,
        "callback_status": task.callback_status if task.spec.callback_url else None,
    }
