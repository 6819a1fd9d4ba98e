"""Property-based fuzzing of every operation /openapi.json documents (schemathesis), against the real stack.

The rule it checks (issue 13): nothing a client can send gets a 5xx, and
every answer is JSON (errors in the serving dialect's shape). Valid and
invalid requests both (schemathesis' positive and negative modes, and its
coverage phase: boundaries, wrong types, missing fields, other methods),
derandomized so CI sees the same cases every run; `make fuzz` runs many more
examples (FUZZ_EXAMPLES).

Why a key of its own (tests/conftest.py KEY_FUZZ): no rate limits and no
pending cap (a 429 or 503 would end a case before it reaches the code under
test), and its jobs go to a queue no worker serves (api.keys[].queue): a
fuzzed 2048x2048 x 10 job must never reach the suite's one CPU worker (its
model merges go to the merge pool, where the same canceller watches). A
canceller cancels them as they arrive, so synchronous calls (A1111, /v1/draw)
answer at once, and what the fuzzer leaves behind (jobs, pools) is gone
before the next test module starts.

Why aiming: a fuzzer cannot guess a model name, a LoRA, a decodable image or
the id of a task, so nearly every case would stop at "unknown model". Fields
that take such names get real ones in turn (Targets), and the cases reach
the translation, the family checks and the stores behind them.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import not_a_server_error

from api import create_app
from common.settings import load_settings
from common.store import open_stores
from tests.conftest import FUZZ_QUEUE, KEY_FUZZ, STACK_ENV
from tests.helpers import data_url

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))   # per operation and mode; `make fuzz` sets more
FUZZ_POOL = "fuzz-endpoint"      # an AWS-extension endpoint of the fuzz key, served by no worker
REQUEST_TIMEOUT = 60             # a request the API never answers fails its case instead of hanging the suite
CANCEL_POLL_SECONDS = 0.02
HEADERS = {"X-API-Key": KEY_FUZZ}


class Canceller:
    """Cancels every job waiting in the fuzz queues, as it arrives, on a thread of its own."""

    def __init__(self, store, queues: tuple[str, ...]):
        self.store = store
        self.queues = queues
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="fuzz-canceller", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(CANCEL_POLL_SECONDS):
            try:
                self.cancel_waiting()
            except Exception:   # noqa: BLE001 - a Redis hiccup must not leave synchronous calls waiting 900 s
                pass

    def cancel_waiting(self) -> None:
        for queue in self.queues:
            for task_id in self.store.oldest_pending(queue, 100):
                try:
                    self.store.request_cancel(self.store.get(task_id))
                except Exception:   # noqa: BLE001 - gone meanwhile; the next pass sees the queue as it is
                    pass


@dataclass
class Targets:
    """Real names by kind. A generated string where such a name goes becomes each real one in turn, then stays
    random once; the turns follow the (derandomized) cases, so every run sends the same requests."""

    names: dict[str, list[str]]
    turns: dict[str, int] = field(default_factory=dict)

    def aim(self, value: Any, kind: str) -> Any:
        if not isinstance(value, str):
            return value                   # a wrong type stays: it is a case of its own
        choices = self.names[kind]
        if kind == "pool":                 # always: an AWS-extension job must never reach a served queue
            return choices[0]
        turn = self.turns[kind] = self.turns.get(kind, -1) + 1
        pick = turn % (len(choices) + 1)
        return choices[pick] if pick < len(choices) else value


A1111_AIMS = {"body.override_settings.sd_model_checkpoint": "model", "body.refiner_checkpoint": "model",
              "body.sampler_name": "sampler", "body.scheduler": "schedule", "body.prompt": "lora_tag",
              "body.init_images.*": "image", "body.mask": "image"}
JOB_QUERY = {"query.jobID": "aws_job"}
# operation path -> where ("body" / "path" / "query", then dotted fields, "*" for every item) -> kind of name
AIMS: dict[str, dict[str, str]] = {
    "/api/v1/generate": {"body.model": "model", "body.refiner": "model", "body.loras.*.name": "lora",
                         "body.init_image": "image", "body.callback_url": "no_callback"},
    "/api/v1/tasks/{task_id}": {"path.task_id": "task"},
    "/sdapi/v1/txt2img": A1111_AIMS,
    "/sdapi/v1/img2img": A1111_AIMS,
    "/sdapi/v1/options": {"body.sd_model_checkpoint": "model"},
    "/sdapi/v1/png-info": {"body.image": "image"},
    "/v1/draw": {"body.model": "model"},
    "/": {**A1111_AIMS, "body.alwayson_scripts.sd_model_checkpoint": "model",
          "body.alwayson_scripts.id_task": "fresh"},
    "/inference/v2": {**A1111_AIMS, "body.sagemaker_endpoint_name": "pool",
                      "body.models.Stable-diffusion.*": "model", "body.models.Lora.*": "lora_file"},
    "/inference/get-inference-job": JOB_QUERY,
    "/inference/get-inference-job-image-output": JOB_QUERY,
    "/inference/get-inference-job-param-output": JOB_QUERY,
    "/inference/get-endpoint-deployment-job": {"query.jobID": "pool_job"},
    "/checkpoint": {"query.id": "checkpoint", "query.checkpoint_id": "checkpoint",
                    "body.checkpoint_id": "checkpoint"},
    "/api/v1/merges": {"body.primary": "model", "body.secondary": "model", "body.tertiary": "model",
                       "body.callback_url": "no_callback"},
    "/api/v1/merges/{task_id}": {"path.task_id": "merge"},
    "/inference/run-model-merge": {"body.primary_model_name": "model", "body.secondary_model_name": "model",
                                   "body.tertiary_model_name": "model"},
}


def aim_at(node: Any, path: list[str], kind: str, targets: Targets) -> None:
    """Replace the value at `path` inside `node` where it exists; nothing is added."""
    head, rest = path[0], path[1:]
    if head == "*" and isinstance(node, list):
        for i, item in enumerate(node):
            if rest:
                aim_at(item, rest, kind, targets)
            else:
                node[i] = targets.aim(item, kind)
    elif isinstance(node, dict) and head in node:
        if rest:
            aim_at(node[head], rest, kind, targets)
        else:
            node[head] = targets.aim(node[head], kind)


def aim(case, targets: Targets) -> None:
    parts = {"body": case.body, "path": case.path_parameters, "query": case.query}
    for where, kind in AIMS.get(case.path, {}).items():
        part, *path = where.split(".")
        aim_at(parts[part], path, kind, targets)


def fresh_ids() -> list[str]:
    """SD on EKS's id_task is an idempotency key: a repeated one answers without translating anything."""
    return [f"fuzz-{n}" for n in range(100_000)]


@pytest.fixture(scope="module")
def fuzz_world(stack) -> Iterator[Targets]:
    """The fuzz key's endpoint and objects, the real names to aim at, and the canceller for the module's
    duration; afterwards nothing of it waits or is recorded."""
    base = stack.api_url
    settings_ = stack.settings()
    store = open_stores(settings_.redis.url, settings_.tasks.retention_seconds).tasks
    merges = settings_.merge.queue or settings_.training.queue      # merges go to their pool, not the key's queue
    canceller = Canceller(store, (FUZZ_QUEUE, FUZZ_POOL, merges))
    canceller.thread.start()
    try:
        yield read_targets(base)
    finally:
        canceller.stop.set()
        canceller.thread.join(timeout=10)
        canceller.cancel_waiting()
        store.client.delete(FUZZ_QUEUE, FUZZ_POOL)   # the cancelled jobs' deliveries, which no worker would take
        forget_fuzz_endpoints(base)


def call(method: str, url: str, **kw: Any) -> Any:
    response = requests.request(method, url, headers=HEADERS, timeout=30, **kw)
    assert response.status_code in (200, 202), response.text
    return response.json()


def read_targets(base: str) -> Targets:
    """The stack's names, and one object of each kind the fuzz key owns (so ids in paths and queries hit)."""
    pool = call("POST", f"{base}/endpoints", json={"endpoint_name": FUZZ_POOL})
    models = [m["name"] for m in call("GET", f"{base}/api/v1/models")["models"] if not m.get("problem")]
    loras = [lr["name"] for lr in call("GET", f"{base}/api/v1/loras")["loras"]]
    task = call("POST", f"{base}/api/v1/generate", json={"prompt": "a fuzzed lighthouse"})
    job = call("POST", f"{base}/inference/v2", json={"task_type": "txt2img", "prompt": "a fuzzed lighthouse",
                                                     "models": {"Stable-diffusion": [models[0]]},
                                                     "sagemaker_endpoint_name": FUZZ_POOL})
    checkpoint = call("POST", f"{base}/checkpoint", json={"checkpoint_type": "Lora", "filenames": [
        {"filename": "fuzzed.safetensors", "parts_number": 2}]})
    merge = call("POST", f"{base}/api/v1/merges", json={"primary": "sdq-tiny", "secondary": "tiny-single.safetensors"})
    return Targets({
        "model": models,
        "lora": loras,
        "lora_file": [f"{name}.safetensors" for name in loras],
        "lora_tag": [f"a lighthouse <lora:{name}:0.7>" for name in loras],
        "sampler": [sampler["name"] for sampler in call("GET", f"{base}/sdapi/v1/samplers")],
        "schedule": [schedule["label"] for schedule in call("GET", f"{base}/sdapi/v1/schedulers")],
        "image": [data_url(Image.new("RGB", (64, 64), "white")), data_url(Image.new("L", (72, 64)))],
        "pool": [FUZZ_POOL],
        "pool_job": [pool["EndpointDeploymentJobId"]],
        "task": [task["task_id"]],
        "aws_job": [job["inference_id"]],
        "checkpoint": [checkpoint["checkpoint"]["id"]],
        "merge": [merge["id"]],
        "fresh": fresh_ids(),
        "no_callback": [None],     # half the submissions: a valid URL would have the webhook worker call it
    })


def forget_fuzz_endpoints(base: str) -> None:
    """Every pool the fuzz key recorded (its own endpoint, and those the fuzzer created)."""
    listed = requests.get(f"{base}/endpoints", headers=HEADERS, timeout=30).json()
    names = [e["endpoint_name"] for e in listed]   # shared pools among them are skipped by the API
    for start in range(0, len(names), 100):
        requests.delete(f"{base}/endpoints", json={"delete_endpoint_list": names[start:start + 100]},
                        headers=HEADERS, timeout=30)


def documented_api() -> dict:
    """/openapi.json as the suite's stack serves it, built at collection (one test per operation needs it before
    the stack runs; test_the_fuzzed_document_is_the_live_one checks it is the same). Nothing is reached: the
    app answers its document without Redis or S3."""
    env = {**STACK_ENV, "SDQ_CONFIG": os.devnull, "SDQ_REDIS_URL": "redis://127.0.0.1:1/0",
           "SDQ_STORAGE_ENDPOINT_URL": "http://127.0.0.1:1", "SDQ_API_KEYS": KEY_FUZZ}
    logging.getLogger("sdqueue.api").disabled = True   # "could not ensure bucket": nothing is there, on purpose
    try:
        app = create_app(load_settings(os.devnull, env=env))
    finally:
        logging.getLogger("sdqueue.api").disabled = False
    return app.test_client().get("/openapi.json").get_json()


DOCUMENT = documented_api()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_fuzzed_document_is_the_live_one(stack):
    assert requests.get(f"{stack.api_url}/openapi.json", timeout=30).json() == DOCUMENT


def json_answer(ctx, response, case) -> None:
    """Every documented operation answers JSON, errors included (no HTML error page). HEAD and OPTIONS (which
    schemathesis sends to probe methods) answer no body, as HTTP says."""
    if response.request.method in ("HEAD", "OPTIONS"):
        return
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if not content_type.startswith("application/json"):
        raise AssertionError(f"{response.status_code} answered {content_type!r}, not JSON: {response.text[:200]!r}")
    response.json()


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error_or_a_non_json_answer(case, stack, fuzz_world):
    aim(case, fuzz_world)
    case.call_and_validate(base_url=stack.api_url, headers=HEADERS, checks=[not_a_server_error, json_answer],
                           timeout=REQUEST_TIMEOUT)
