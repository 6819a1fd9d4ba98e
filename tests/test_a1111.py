"""The A1111 dialect (/sdapi/v1, the AUTOMATIC1111 web UI API) against the real stack."""
from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
import requests
from PIL import Image

from api.auth import ApiKey
from common.infotext import parse_infotext
from tests.conftest import KEY_A, KEY_B, KEY_LENIENT
from tests.helpers import data_url, gradient

SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def sd(stack):
    """A requests session speaking to /sdapi/v1 with HTTP Basic auth, as A1111 clients with --api-auth do."""
    session = requests.Session()
    session.auth = ("anyone", KEY_A)
    base = stack.api_url

    class Client:
        def get(self, path, **kw):
            return session.get(f"{base}/sdapi/v1/{path}", timeout=120, **kw)

        def post(self, path, body=None, **kw):
            return session.post(f"{base}/sdapi/v1/{path}", json=body, timeout=300, **kw)

    return Client()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_txt2img_answers_images_parameters_and_info(sd):
    r = sd.post("txt2img", {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 1234, "batch_size": 2,
                            "sampler_name": "Euler a", **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2
    image = decode(body["images"][0])
    assert image.size == (64, 64)
    text = image.info["parameters"]
    assert parse_infotext(text)["Sampler"] == "Euler a"
    info = json.loads(body["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["cfg_scale"] == 7.0
    assert info["infotexts"][1] == decode(body["images"][1]).info["parameters"]
    assert body["parameters"]["prompt"] == "a red fox" and body["parameters"]["n_iter"] == 1
    assert body["parameters"]["sampler_index"] == "Euler"


def test_same_seed_same_pixels_and_n_iter_numbers_on(sd):
    first = sd.post("txt2img", {"prompt": "tower", "seed": 77, "batch_size": 1, "n_iter": 2, **SMALL}).json()
    again = sd.post("txt2img", {"prompt": "tower", "seed": 77, "batch_size": 1, "n_iter": 2, **SMALL}).json()
    assert json.loads(first["info"])["all_seeds"] == [77, 78]
    assert first["images"] == again["images"]


def test_karras_sampler_names_and_unknown_sampler_fall_back(sd):
    body = sd.post("txt2img", {"prompt": "x", "sampler_name": "DPM++ 2M Karras", **SMALL}).json()
    info = json.loads(body["info"])
    assert info["sampler_name"] == "DPM++ 2M"
    assert "Schedule type: Karras" in info["infotexts"][0]
    odd = sd.post("txt2img", {"prompt": "x", "sampler_name": "no such sampler", **SMALL})
    assert odd.status_code == 200
    assert json.loads(odd.json()["info"])["sampler_name"] == "DPM++ 2M"


def test_unsupported_values_are_refused_by_name_unless_the_key_is_lenient(sd, stack):
    body = {"prompt": "x", "restore_faces": True, "firstphase_width": 256, "styles": ["cinematic"],
            "alwayson_scripts": {"ADetailer": {"args": [True, {}]}, "extra options": {"args": []}}, **SMALL}
    r = sd.post("txt2img", body)
    assert r.status_code == 422, r.text
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {
        ("body", "restore_faces"), ("body", "firstphase_width"), ("body", "styles"),
        ("body", "alwayson_scripts", "ADetailer")}
    r = requests.post(f"{stack.api_url}/sdapi/v1/txt2img", json=body, auth=("anyone", KEY_LENIENT), timeout=120)
    assert r.status_code == 200, r.text
    warnings = " ".join(json.loads(r.json()["info"])["warnings"])
    assert "restore_faces" in warnings and "alwayson_scripts.ADetailer" in warnings and "firstphase_width" in warnings
    defaults = {"prompt": "x", "restore_faces": False, "tiling": False, "enable_hr": False, "styles": [],
                "subseed_strength": 0, "alwayson_scripts": {}, **SMALL}
    assert sd.post("txt2img", defaults).status_code == 200        # what clients send by default is never refused


def test_img2img_and_inpainting(sd):
    init = data_url(gradient(64, 64))
    r = sd.post("img2img", {"prompt": "x", "init_images": [init], "denoising_strength": 0.5, "seed": 5, **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert decode(body["images"][0]).size == (64, 64)
    assert body["parameters"]["init_images"] is None        # not echoed back, as A1111
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    inpaint = sd.post("img2img", {"prompt": "x", "init_images": [init], "seed": 5, "mask_blur": 0,
                                  "mask": base64.b64encode(buf.getvalue()).decode(), **SMALL})
    assert inpaint.status_code == 200, inpaint.text
    out = decode(inpaint.json()["images"][0]).convert("RGB")
    original = gradient(64, 64).convert("RGB")
    # the unmasked (black) half is kept close to the original; the masked half is repainted
    kept = sum(abs(a - b) for a, b in zip(out.crop((40, 0, 64, 64)).tobytes(), original.crop((40, 0, 64, 64)).tobytes()))
    painted = sum(abs(a - b) for a, b in zip(out.crop((0, 0, 24, 64)).tobytes(), original.crop((0, 0, 24, 64)).tobytes()))
    assert kept < painted


def test_img2img_without_images_is_a_validation_error(sd):
    r = sd.post("img2img", {"prompt": "x"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "init_images"]
    bad = sd.post("txt2img", {"prompt": "x", "steps": "many"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "steps"]


def test_auth_basic_header_and_refusals(stack):
    url = f"{stack.api_url}/sdapi/v1/sd-models"
    assert requests.get(url, auth=("x", KEY_A), timeout=10).status_code == 200
    assert requests.get(url, headers={"X-API-Key": KEY_A}, timeout=10).status_code == 200
    missing = requests.get(url, timeout=10)
    assert missing.status_code == 401 and missing.json()["detail"] == "Not authenticated"
    wrong = requests.get(url, auth=("x", "wrong"), timeout=10)
    assert wrong.status_code == 401 and wrong.json()["detail"] == "Incorrect username or password"


def test_models_options_and_model_choice(sd, stack):
    models = sd.get("sd-models").json()
    titles = {m["title"]: m for m in models}
    single = next(m for m in models if m["model_name"] == "tiny-single")
    assert single["title"] == f"tiny-single.safetensors [{single['hash']}]" and len(single["sha256"]) == 64
    assert sd.post("options", {"sd_model_checkpoint": single["title"]}).json() is None
    assert sd.get("options").json()["sd_model_checkpoint"] == single["title"]
    body = sd.post("txt2img", {"prompt": "x", **SMALL}).json()
    assert json.loads(body["info"])["sd_model_name"] == "tiny-single"
    # per key: the other key still gets the default model
    other = requests.get(f"{stack.api_url}/sdapi/v1/options", auth=("x", KEY_B), timeout=10).json()
    assert other["sd_model_checkpoint"] != single["title"]
    refused = sd.post("options", {"sd_model_checkpoint": "nope.safetensors [0123456789]"})
    assert refused.status_code == 422 and "not found" in refused.json()["detail"]
    default = next(t for t in titles if not t.startswith("tiny-single"))
    assert sd.post("options", {"sd_model_checkpoint": default}).status_code == 200


@pytest.mark.parametrize("path", ["samplers", "schedulers", "loras", "sd-vae", "upscalers", "embeddings", "memory",
                                  "cmd-flags", "progress", "options"])
def test_listing_endpoints_answer_in_a1111_shapes(sd, path):
    r = sd.get(path)
    assert r.status_code == 200, r.text
    body = r.json()
    if path == "samplers":
        assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "LMS", "Heun", "DPM2", "DPM2 a", "PLMS", "UniPC"} <= {
            s["name"] for s in body}
    if path == "loras":
        assert "tiny_style" in {lr["name"] for lr in body}
    if path == "progress":
        assert set(body) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    if path == "memory":
        assert body["ram"]["total"] > 0


def test_png_info_reads_the_parameters_chunk(sd):
    image = sd.post("txt2img", {"prompt": "a lighthouse", "seed": 9, **SMALL}).json()["images"][0]
    info = sd.post("png-info", {"image": "data:image/png;base64," + image}).json()
    assert info["parameters"]["Prompt"] == "a lighthouse" and info["parameters"]["Seed"] == "9"
    assert info["parameters"]["Size-1"] == "64"
    bad = sd.post("png-info", {"image": "not base64!"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "image"]


def test_progress_and_interrupt_of_a_running_job(sd):
    result = {}

    def call():
        result["r"] = sd.post("txt2img", {"prompt": "slow", "width": 128, "height": 128, "steps": 150})

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = sd.get("progress").json()
        if state["state"]["sampling_step"] > 0:
            break
        time.sleep(0.1)
    assert state["state"]["sampling_steps"] > 0 and 0 < state["progress"] <= 1
    assert sd.post("interrupt").json() == {}
    worker.join(60)
    body = result["r"].json()
    assert result["r"].status_code == 200 and body["images"] == []
    assert json.loads(body["info"])["interrupted"] is True


def test_a1111_client_script_runs_unmodified(sd, stack, storage):
    """The A1111 API's documented client script, host substituted, model title taken from /sd-models, loop bounded to 2.

    It asks for restore_faces, which sdqueue does not run: a lenient key (api.keys[].lenient) accepts it.
    """
    host = stack.api_url
    session = requests.Session()
    session.auth = ("user", KEY_LENIENT)
    title = session.get(f"{host}/sdapi/v1/sd-models").json()[0]["title"]
    session.post(url=f'{host}/sdapi/v1/options', json={
        'sd_model_checkpoint': title,
    })
    body = {
        'prompt': 'beautiful, masterpiece, best quality, extremely detailed face',
        'negative_prompt': 'paintings, sketches',
        'width': 480,
        'height': 270,
        'batch_size': 4,
        'save_images': True,
        'send_images': False,
        'restore_faces': True,
        'steps': 20,
    }
    seeds = []
    for _ in range(2):
        r = session.post(url=f'{host}/sdapi/v1/txt2img', json=body)
        assert r.status_code == 200, r.text
        assert r.json()["images"] == []
        seeds += json.loads(r.json()["info"])["all_seeds"]
    folder = f"outputs/txt2img-images/{ApiKey(KEY_LENIENT, 'l').owner}/{time.strftime('%Y-%m-%d')}"   # this key's copies
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{folder}/")
    names = sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", []))
    mine = [n for n in names if int(n.split("-", 1)[1].split(".")[0]) in seeds]
    assert len(mine) == 8
    numbers = sorted(int(n.split("-")[0]) for n in mine)
    assert numbers == list(range(numbers[0], numbers[0] + 8))       # NNNNN numbered on, as A1111 does
    first = next(n for n in mine if int(n.split("-")[0]) == numbers[0])
    saved = Image.open(io.BytesIO(storage.get(f"{folder}/{first}")))
    assert saved.size == (480, 264) and "parameters" in saved.info


def test_api_keeps_serving_while_many_synchronous_calls_wait(sd, stack, settings):
    """Sixty A1111 calls wait on the event hub at once; health and reads still answer meanwhile.

    None may be refused: the kernel, not sdqueue, spreads the connections over
    the API processes, unevenly and possibly all onto one, so the premise is
    that one process alone has a wait slot (api.max_waiters) and a thread
    (api.threads) for each call, and a thread to spare for /health.
    """
    crowd = 60
    assert settings.api.max_waiters >= crowd and settings.api.threads > crowd, "tests/conftest.py sizes the API"
    results = []

    def call():
        try:
            results.append(sd.post("txt2img", {"prompt": "crowd", "width": 64, "height": 64, "steps": 2}).status_code)
        except requests.RequestException as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=call) for _ in range(crowd)]
    for t in threads:
        t.start()
    health = requests.get(f"{stack.api_url}/health", timeout=10)
    assert health.status_code == 200
    for t in threads:
        t.join(300)
    assert results.count(200) == crowd, results


def test_lora_prompt_tags_apply_loras(sd):
    """A1111 clients pick LoRAs in the prompt; the tags are removed from the text and applied."""
    plain = sd.post("txt2img", {**SMALL, "prompt": "a fox", "seed": 5}).json()
    tagged = sd.post("txt2img", {**SMALL, "prompt": "a fox <lora:tiny_style:0.9> <lora:missing:1>", "seed": 5}).json()
    info = json.loads(tagged["info"])
    assert info["prompt"] == "a fox"
    assert "Lora weights: \"tiny_style: 0.9\"" in info["infotexts"][0]
    assert any("missing" in w for w in info["warnings"])
    assert decode(tagged["images"][0]).tobytes() != decode(plain["images"][0]).tobytes()
