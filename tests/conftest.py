"""Session fixtures: one real local stack (Redis, SeaweedFS, worker, callback
worker, gunicorn API) on free loopback ports, in a temporary data dir."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import redis
import yaml

from dev.localstack import LocalStack, build_default_model, free_port, free_port_block
from dev.tinymodel import build_tiny_embedding, ensure_tiny_controlnets, ensure_tiny_models, ensure_tiny_upscalers
from tests.helpers import Api, build_test_lora
from tests.single_file import write_single_file_checkpoint

KEY_A = "test-key-alpha-0123456789"
KEY_B = "test-key-bravo-9876543210"
KEY_LIMITED = "test-key-limited-55555555"     # 2 submissions/s, 4 reads/s
KEY_NATIVE_ONLY = "test-key-native-only-777"  # the native API only, the tiny model only, no high priority
KEY_POOLED = "test-key-pooled-31415926"       # may send AWS-extension jobs to the pool "gpu" only
KEY_FUZZ = "test-key-fuzz-27182818"           # tests/test_fuzz.py: no limits, its jobs wait where no worker serves
FUZZ_QUEUE = "fuzz"
KEY_LENIENT = "test-key-lenient-24681357"     # unsupported generation fields are warnings, not 422s
POLICIES = {"api": {"keys": [
    {"key": KEY_LIMITED, "name": "limited", "submit_limit": "2/second", "read_limit": "4/second"},
    {"key": KEY_NATIVE_ONLY, "name": "native-only", "dialects": ["native"], "models": ["sdq-tiny"],
     "priorities": ["normal", "low"]},
    {"key": KEY_POOLED, "name": "pooled", "pools": ["gpu"]},
    {"key": KEY_FUZZ, "name": "fuzz", "submit_limit": "", "read_limit": "", "max_pending": 0, "queue": FUZZ_QUEUE},
    {"key": KEY_LENIENT, "name": "lenient", "lenient": True},
]}}
CALLBACK_SECRET = "test-webhook-secret"
STACK_ENV = {
    "SDQ_CONFIG": os.devnull,                 # ignore a developer's config.yaml
    "SDQ_WORKER_TORCH_THREADS": "1",
    "SDQ_WORKERS_HEARTBEAT_INTERVAL": "1",
    "SDQ_WORKERS_HEARTBEAT_TTL": "4",
    "SDQ_WORKERS_REAP_INTERVAL": "1",
    "SDQ_CALLBACKS_SECRET": CALLBACK_SECRET,
    "SDQ_CALLBACKS_ALLOW_PRIVATE": "1",       # the test receiver listens on loopback
    "SDQ_CALLBACKS_TIMEOUT": "3",
    "SDQ_API_WORKERS": "2",
    "SDQ_API_THREADS": "80",                  # one API process alone holds test_a1111's 60 waiting calls
    "SDQ_API_MAX_WAITERS": "64",              # (the kernel, not sdqueue, spreads connections over processes)
    "SDQ_API_MAX_STREAMS": "12",              # waiters + streams stay below the threads
    "SDQ_API_SUBMIT_LIMIT": "",               # rate limits are tested with keys that have their own
    "SDQ_API_READ_LIMIT": "",
    "SDQ_TASKS_PROGRESS_INTERVAL": "0.05",
    # The tests' SD 1.x models run 4 steps when a request names none (the tiny families keep their own defaults).
    "SDQ_MODELS_OVERRIDES": json.dumps({"sdq-tiny": {"steps": 4}, "tiny-single.safetensors": {"steps": 4}}),
    "SDQ_DOWNLOADS_ALLOW_HOSTS": "127.0.0.2",  # the model-hub stand-in of test_aws
    "SDQ_API_AUTH_FAILURES_PER_MINUTE": "0",   # the suite sends wrong keys on purpose; test_bounds tests the limit
    "SDQ_METRICS_CACHE_SECONDS": "0",          # each scrape reads Redis anew; test_metrics tests the cache itself
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> LocalStack:
    data = tmp_path_factory.mktemp("sdq")
    config = data / "config.yaml"
    config.write_text(yaml.safe_dump(POLICIES))
    st = LocalStack(data_dir=data, redis_port=free_port(), s3_port=free_port_block(), api_port=free_port(),
                    flower_port=free_port(), api_keys=[KEY_A, KEY_B, KEY_LIMITED, KEY_NATIVE_ONLY, KEY_POOLED, KEY_FUZZ,
                                                       KEY_LENIENT],
                    flower_password="pw",
                    extra_env={**STACK_ENV, "SDQ_CONFIG": str(config)})
    try:
        build_default_model(st)
        settings = st.settings()
        ensure_tiny_models(settings.models_dir)        # SDXL (+ refiner), SD3, Flux (dev, schnell): tests/test_families
        ensure_tiny_controlnets(settings.models_dir, settings.controlnet_dir)   # tests/test_controlnet.py
        ensure_tiny_upscalers(settings.upscalers_dir)                           # tests/test_esrgan.py
        lora_dir = settings.lora_dir
        lora_dir.mkdir(parents=True, exist_ok=True)
        build_test_lora(settings.models_dir / "sdq-tiny", lora_dir / "tiny_style.safetensors")
        (lora_dir / "broken.safetensors").write_bytes(b"this is not a safetensors file")
        build_test_lora(settings.models_dir / "sdq-tiny-xl", lora_dir / "tiny_xl_style.safetensors")
        embeddings = settings.embeddings_dir            # tests/test_embeddings.py, tests/test_prompts.py
        build_tiny_embedding(settings.models_dir / "sdq-tiny", embeddings / "tiny_emb.safetensors")
        build_tiny_embedding(settings.models_dir / "sdq-tiny", embeddings / "Tiny_Trained.pt", vectors=3, seed=12)
        build_tiny_embedding(settings.models_dir / "sdq-tiny-xl", embeddings / "tiny_xl_emb.safetensors", seed=13)
        (embeddings / "broken_emb.pt").write_bytes(b"this is not an embedding")
        write_single_file_checkpoint(settings.models_dir / "sdq-tiny",
                                     settings.models_dir / "tiny-single.safetensors")
        write_single_file_checkpoint(settings.models_dir / "sdq-tiny-xl",
                                     settings.models_dir / "tiny-xl-single.safetensors")
        shutil.copyfile(settings.models_dir / "sdq-tiny-flux" / "transformer" / "diffusion_pytorch_model.safetensors",
                        settings.models_dir / "tiny-flux-transformer.safetensors")   # a Flux fine-tune's file
        st.start_redis()
        st.start_s3()
        st.ensure_bucket()
        st.start_worker("worker")
        st.start_callback_worker()
        st.start_api()
        yield st
    finally:
        st.stop()


@pytest.fixture(scope="session")
def settings(stack):
    return stack.settings()


@pytest.fixture(scope="session")
def api(stack) -> Api:
    return Api(stack.api_url, KEY_A)


@pytest.fixture(scope="session")
def api_b(stack) -> Api:
    return Api(stack.api_url, KEY_B)


@pytest.fixture
def rds(stack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, decode_responses=True)


@pytest.fixture
def storage(settings):
    from common.storage import Storage

    return Storage(settings)


@pytest.fixture(scope="session")
def trainer(stack, settings):
    """A worker of the training pool (training.queue), started by the first test that trains."""
    if "trainer" not in stack.services or not stack.services["trainer"].alive():
        stack.start_worker("trainer", "--pool", settings.training.queue)
    return stack.services["trainer"]
