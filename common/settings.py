"""sdqueue settings: one table of options, read from config.yaml then SDQ_* env.

Why one table: every option is declared once with its type, default and
meaning (as Flower does), so config.example.yaml, env overrides and the
README can never disagree about what exists. Settings are built once at
start and passed explicitly; nothing reads os.environ at import time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import yaml

from common.families import check_overrides


@dataclass(frozen=True)
class Option:
    """One setting: dotted name, type, default, and what it is for."""

    name: str
    type: type
    default: Any
    help: str

    @property
    def env_name(self) -> str:
        """`api.key_header` -> `SDQ_API_KEY_HEADER`."""
        return "SDQ_" + self.name.replace(".", "_").upper()


OPTIONS: tuple[Option, ...] = (
    Option("data_dir", str, "./data", "Local state: Redis/S3 data, models, LoRAs, logs."),
    Option("api.port", int, 8000, "API port."),
    Option("api.keys", list, [], "Accepted API keys (strings, or {key, name} maps). Env: comma-separated."),
    Option("api.key_header", str, "X-API-Key", "Header that carries the API key."),
    Option("api.workers", int, 2, "gunicorn worker processes."),
    Option("api.threads", int, 224, "Threads per gunicorn worker, started on demand (each waiting request and each "
           "open SSE stream holds one)."),
    Option("api.max_wait_seconds", int, 60, "Longest ?wait= a task read may block for."),
    Option("api.max_waiters", int, 128, "Requests that may wait for a job at once per API process (?wait=, A1111, /v1/draw); "
           "beyond, ?wait= answers at once and synchronous calls get 503. Keep it below api.threads."),
    Option("api.max_streams", int, 64, "SSE streams (GET /api/v1/tasks/{id}/events) one API process holds open at "
           "once; beyond, 503 with Retry-After. Keep api.max_waiters + api.max_streams below api.threads."),
    Option("api.stream_seconds", int, 300, "Longest an SSE stream stays open; the client resumes with Last-Event-ID "
           "(EventSource does) and loses nothing."),
    Option("api.sync_timeout", int, 900, "Longest a synchronous call (A1111, /v1/draw) waits for its job."),
    Option("api.submit_limit", str, "10/second", "Default per-key submission rate (Flask-Limiter syntax, ';' separates limits)."),
    Option("api.read_limit", str, "50/second", "Default per-key rate of status reads and listings."),
    Option("api.auth_failures_per_minute", int, 30, "Requests with a wrong or missing key one client address may "
           "make per minute; beyond, 429 until the minute ends (0: no limit). Behind a proxy, the proxy's address "
           "counts unless it sets the client's (gunicorn forwarded_allow_ips)."),
    Option("api.stage_prefix", str, "/prod", "API Gateway-style stage: every route also answers under it "
           "(/prod/ for SD on EKS, /prod/inference/v2 for the AWS extension); empty: off."),
    Option("api.max_body_bytes", int, 32 * 1024 * 1024, "Largest request body accepted (init images are base64)."),
    Option("api.lenient", bool, False, "Accept generation fields sdqueue cannot honour (restore_faces: true, tiling, "
           "hr_checkpoint_name, ControlNet, ...) and name them in info.warnings instead of refusing them with a 422 naming "
           "the field (api.keys[].lenient overrides per key). Values that leave the image unchanged (false, 0, "
           "empty) are always accepted."),
    Option("api.fast_submit", bool, True, "Answer well-formed native submissions without Flask's request machinery "
           "(same schema, same answer; any refusal is still rendered by Flask). Off: every request through Flask."),
    Option("redis.url", str, "redis://127.0.0.1:6379/0", "Redis for task state, heartbeats and notifications."),
    Option("redis.broker_url", str, "", "Celery broker URL; empty means redis.url."),
    Option("storage.endpoint_url", str, "http://127.0.0.1:8333", "S3 endpoint the services use; empty means AWS."),
    Option("storage.public_endpoint_url", str, "", "S3 endpoint presigned URLs point at (what clients reach); empty means endpoint_url."),
    Option("storage.public_base_url", str, "", "If set, image URLs are {public_base_url}/{key} instead of presigned."),
    Option("storage.bucket", str, "sdqueue", "Bucket for outputs and init images; created if missing."),
    Option("storage.prefix", str, "outputs", "Key prefix: s3://{bucket}/{prefix}/{task_id}/{n}.{ext}."),
    Option("storage.region", str, "us-east-1", "S3 region."),
    Option("storage.access_key", str, "sdqueue", "S3 access key id."),
    Option("storage.secret_key", str, "sdqueue-secret", "S3 secret key."),
    Option("storage.presign_expiry", int, 3600, "Seconds a presigned image URL stays valid."),
    Option("storage.retention_days", int, 30, "Days after which S3 deletes a job's files (images, init images, "
           "side files, saved copies; never uploaded checkpoints), by a bucket lifecycle rule set at start "
           "(0: kept forever). Keep it at least tasks.retention_seconds, so a task that still answers has its images."),
    Option("storage.abort_upload_days", int, 7, "Days after which S3 aborts a multipart upload never completed "
           "(an abandoned checkpoint upload) and frees its parts (0: never)."),
    Option("storage.lifecycle", bool, True, "Set the bucket lifecycle rules above at start (rules of other names "
           "are kept); off: the operator manages the bucket's lifecycle."),
    Option("models.dir", str, "", "Model directory (diffusers folders, .safetensors files); empty: {data_dir}/models."),
    Option("models.default", str, "", "Default model name; empty: the first model found, or the built tiny model."),
    Option("models.lora_dir", str, "", "LoRA directory; empty: {data_dir}/loras."),
    Option("models.embeddings_dir", str, "", "Textual inversion embeddings (.safetensors, .pt; the file stem is the "
           "word a prompt uses, as in A1111); empty: {models_dir}/embeddings."),
    Option("models.controlnet_dir", str, "", "ControlNet models (diffusers folders with config.json, or single "
           ".safetensors/.pth files), as sd-webui-controlnet's models folder; empty: {models_dir}/controlnet."),
    Option("models.upscalers_dir", str, "", "ESRGAN / Real-ESRGAN upscalers (.pth, .safetensors; the file stem is the "
           "name hr_upscaler takes, as in A1111's models/ESRGAN); empty: {models_dir}/upscalers."),
    Option("models.single_file_config", str, "", "Local diffusers folder describing single-file checkpoints; empty: the default model's folder."),
    Option("models.overrides", dict, {}, "Per model name: request defaults {width, height, steps, guidance_scale, "
           "strength, scheduler} replacing its family's, and `family` (sd1, sd2, sdxl, sdxl-refiner, sd3, flux) for a "
           "file whose family cannot be read (.ckpt). Env: JSON."),
    Option("models.max_loaded", int, 2, "Warm pipelines a worker keeps (least recently used is dropped)."),
    Option("limits.min_size", int, 64, "Smallest width/height."),
    Option("limits.max_size", int, 2048, "Largest width/height."),
    Option("limits.max_steps", int, 150, "Largest num_inference_steps."),
    Option("limits.max_images", int, 10, "Largest num_images."),
    Option("limits.max_prompt_chars", int, 10000, "Longest prompt or negative prompt."),
    Option("limits.max_extra_bytes", int, 64 * 1024, "Largest free-form value (A1111 script_args, comments, "
           "alwayson_scripts, override_settings, styles, /options; the AWS extension's checkpoint params) as JSON: "
           "they are stored with the job, the checkpoint or the key."),
    Option("limits.max_image_pixels", int, 4096 * 4096, "Most pixels of an uploaded image or mask (width x height), "
           "checked from the image header before anything is decoded."),
    Option("defaults.scheduler", str, "", "Scheduler for SD 1.x/2.x/SDXL models (beta schedules) when a request names "
           "none; empty: the model's own. Steps, guidance, size and strength default per model family "
           "(models.overrides changes them per model)."),
    Option("tasks.queue", str, "gpu", "Celery queue GPU workers consume."),
    Option("tasks.retention_seconds", int, 7 * 24 * 3600, "How long task hashes are kept after their last change."),
    Option("tasks.time_limit", int, 600, "Longest a job may run on a worker (fetching its files and loading its "
           "model included) before it is failed."),
    Option("tasks.progress_interval", float, 0.2, "Least seconds between progress writes."),
    Option("tasks.preview_size", int, 256, "Long side in pixels of the previews a job sends while it runs (preview_every)."),
    Option("tasks.max_previews", int, 50, "Most previews one job makes: a preview_every that would make more is "
           "widened to steps / this."),
    Option("tasks.preview_format", str, "jpeg", "Previews' image format: jpeg or webp."),
    Option("tasks.max_pending", int, 0, "Most jobs that may wait in a queue; beyond, submissions are refused (0: no limit)."),
    Option("tasks.max_attempts", int, 3, "A job whose worker dies this many times is failed, not resent."),
    Option("tasks.max_pending_per_key", int, 100, "Most jobs one API key may have waiting (api.keys[].max_pending overrides); "
           "beyond, its submissions are refused with 503 + Retry-After (0: no limit)."),
    Option("routing.affinity", bool, True, "Model affinity: a worker takes jobs for models it holds warm first; "
           "off: every worker takes pending jobs in plain priority + arrival order."),
    Option("routing.affinity_wait", float, 10.0, "Seconds a job for a model that another live worker holds waits "
           "for that worker before a free worker loads the model itself."),
    Option("routing.poll_interval", float, 0.25, "Pause of a free worker that found only jobs left to other "
           "workers, before it looks again."),
    Option("workers.heartbeat_interval", float, 2.0, "Seconds between worker heartbeats."),
    Option("workers.heartbeat_ttl", float, 10.0, "A worker silent this long is dead; its job is redelivered."),
    Option("workers.reap_interval", float, 3.0, "Seconds between scans for jobs of dead workers."),
    Option("workers.watchdog_margin", float, 60.0, "Seconds past tasks.time_limit after which a job still running is "
           "failed by its worker's watchdog (which then restarts the worker: its GPU call or download is hung) or, "
           "if that worker cannot, by the reaper. Every job ends within tasks.time_limit + this margin."),
    Option("workers.stall_timeout", float, 300.0, "Seconds a running job may go without a denoising step (or the "
           "end of its VAE decode) before the watchdog restarts its worker and the job is resent as its next attempt "
           "(0: off). Fetching files and loading a model are bounded by the time limit only."),
    Option("worker.device", str, "", "Device for this worker: cuda, cuda:N, cpu; empty: cuda:0 if present else cpu."),
    Option("worker.name", str, "", "Worker name shown in health/Flower; empty: gpu<N>@<host>."),
    Option("worker.pool", str, "", "Worker pool (queue) this worker serves, e.g. an AWS-extension endpoint name; empty: tasks.queue."),
    Option("worker.owned_cache_gb", float, 200.0, "Most GB of keys' own checkpoints and LoRAs (fetched from S3 "
           "into the hidden .owned/ folders) a worker host keeps; beyond, the least recently used go (S3 keeps them). "
           "0: keep everything."),
    Option("worker.torch_threads", int, 0, "torch CPU threads; 0 leaves torch's default."),
    Option("worker.max_batch", int, 0, "Images one pipeline call may hold: waiting jobs that can share a call (same model, mode, size, steps, scheduler, guidance, LoRAs, negative prompt or none) run together. 0: 8 on CUDA, 1 (no batching) on CPU."),
    Option("worker.output_depth", int, 1, "Jobs whose encoding, uploads and finish may wait for the output stage while the GPU runs the next one (1-2)."),
    Option("worker.png_level", int, 1, "PNG compression level, 0-9: lossless at every level; higher is smaller and slower (zlib's default is 6)."),
    Option("worker.sdpa", bool, True, "PyTorch scaled_dot_product_attention (flash / memory-efficient kernels); off: diffusers' classic attention."),
    Option("worker.channels_last", bool, True, "UNet and VAE in channels-last memory layout (CUDA only; SD3/Flux: the VAE)."),
    Option("worker.fuse_qkv", bool, False, "Fused QKV projections in the UNet's attention (jobs with LoRAs run unfused; SD3/Flux: not applied)."),
    Option("worker.tf32", bool, True, "TF32 matmuls and convolutions for fp32 work (CUDA only)."),
    Option("worker.compile", bool, False, "torch.compile the UNet (SD3/Flux: the transformer), warmed up before the worker is ready; recompiles per new size, batch size and LoRA set."),
    Option("worker.dtype", str, "auto", "Weights' precision: auto (the model family's choice on CUDA: float16 for SD 1.x/2.x/SDXL, bfloat16 for SD3/Flux; float32 on CPU), float16, bfloat16 or float32."),
    Option("datasets.prefix", str, "datasets", "Key prefix of training datasets: s3://{bucket}/{prefix}/{owner}/{name}/{file}."),
    Option("datasets.max_files", int, 1000, "Most files (images and captions) in one dataset."),
    Option("datasets.max_file_bytes", int, 20 * 1024 * 1024, "Largest file of a dataset; a bigger one keeps it from "
           "being enabled."),
    Option("datasets.max_pixels", int, 4096 * 4096, "Largest image of a dataset, in pixels."),
    Option("datasets.max_caption_bytes", int, 4096, "Largest caption (a .txt file or a caption field), UTF-8."),
    Option("training.queue", str, "train", "Worker pool (Celery queue) LoRA training jobs go to; its workers are started "
           "with --pool train. Set it to tasks.queue to let inference workers train too."),
    Option("training.time_limit", int, 6 * 3600, "Longest a training job may run (its own limit, instead of "
           "tasks.time_limit); a rerun after a killed worker starts a new limit from its checkpoint."),
    Option("training.max_attempts", int, 10, "Workers that may die running one training job before it fails "
           "(instead of tasks.max_attempts): each rolling restart of a trainer kills its run, which resumes from its "
           "last checkpoint."),
    Option("training.max_steps", int, 20000, "Most optimizer steps one training job may ask for."),
    Option("training.checkpoint_every", int, 100, "Default steps between a training job's resumable checkpoints in S3."),
    Option("training.prefix", str, "trainings", "Key prefix of training checkpoints: s3://{bucket}/{prefix}/{task}/state.pt."),
    Option("training.curve_points", int, 200, "Most points of the loss curve a training job reports (longer runs are "
           "averaged into this many buckets)."),
    Option("merge.queue", str, "", "Worker pool (Celery queue) model merges go to; empty: training.queue. A merge "
           "needs memory for the merged checkpoint (about its file size), no GPU."),
    Option("merge.time_limit", int, 3600, "Longest a model merge may run (fetching and converting its inputs and "
           "uploading the result included)."),
    Option("aws.models_prefix", str, "models", "Key prefix of uploaded checkpoints: s3://{bucket}/{prefix}/{type}/{id}/{file}."),
    Option("aws.output_prefix", str, "out", "Key prefix of AWS-extension outputs: s3://{bucket}/{prefix}/{job}/result/image_{n}.jpg."),
    Option("aws.list_limit", int, 1000, "Most jobs GET /inference/list-inference-jobs returns (newest first)."),
    Option("downloads.allow_hosts", list, [], "Host names or CIDR ranges that /upload_checkpoint and SD on EKS image_link "
           "may fetch from although they are (or resolve to) private or loopback addresses."),
    Option("downloads.max_bytes", int, 32 * 1024 ** 3, "Largest file /upload_checkpoint downloads."),
    Option("downloads.timeout", float, 30.0, "Seconds to connect to / wait for data from a model or image URL."),
    Option("downloads.total_timeout", float, 3600.0, "Longest one download may take in all."),
    Option("callbacks.queue", str, "callbacks", "Celery queue for webhook delivery (CPU worker)."),
    Option("callbacks.secret", str, "", "Webhook signing secret (Standard Webhooks webhook-signature, and the legacy "
           "X-SDQueue-Signature): whsec_<base64>, or any string; `make run` generates one (data/webhook_secret), "
           "compose requires one; empty: unsigned."),
    Option("callbacks.allow_private", bool, False, "Allow callback URLs on any address, loopback/private/link-local "
           "included (the address check is off; URLs are still read strictly)."),
    Option("callbacks.allow_hosts", list, [], "Host names or CIDR ranges callback URLs may reach although they are (or "
           "resolve to) private or loopback addresses (the guard stays on for the rest)."),
    Option("callbacks.max_retries", int, 8, "Webhook retries (exponential backoff) before giving up."),
    Option("callbacks.timeout", float, 10.0, "Seconds a webhook receiver gets to answer."),
    Option("callbacks.backoff_max", int, 600, "Longest pause between webhook retries."),
    Option("flower.port", int, 5555, "Flower port (local stack)."),
    Option("flower.user", str, "admin", "Flower basic-auth user."),
    Option("flower.password", str, "", "Flower basic-auth password; empty: generated by `make run`."),
    Option("metrics.token", str, "", "If set, GET /metrics requires `Authorization: Bearer <token>`; empty: open "
           "(keep /metrics off the public network, or set this). Compose and Kubernetes require one."),
    Option("metrics.cache_seconds", float, 5.0, "Seconds an API process reuses the queue figures it read from "
           "Redis for /metrics, so many scrapers cost one read per interval (0: read at every scrape)."),
    Option("metrics.worker_port", int, 0, "Port of each worker process's Prometheus endpoint /metrics "
           "(0: off; compose and k8s use 9101; the local stack picks a free port per worker)."),
    Option("metrics.worker_addr", str, "0.0.0.0", "Address the worker's Prometheus endpoint listens on (it has no "
           "auth: compose and k8s never publish it outside their internal network)."),
    Option("logs.format", str, "json", "Log lines of the API and workers: json (one object per line: ts, level, "
           "logger, msg, task_id, worker, model, ...) or text."),
    Option("logs.level", str, "INFO", "Log level of the API and workers (a worker's --loglevel overrides it)."),
)

_PARSERS: dict[type, Callable[[str], Any]] = {
    str: str,
    int: int,
    float: float,
    bool: lambda v: v.strip().lower() in {"1", "true", "yes", "on"},
    list: lambda v: [p.strip() for p in v.split(",") if p.strip()],
    dict: lambda v: _json_object(v),
}


def _json_object(text: str) -> dict:
    """A dict option from the environment: a JSON object."""
    import json

    value = json.loads(text or "{}")
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


class SettingsError(ValueError):
    """A config file or env value that cannot be used."""


def _lookup(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _coerce(option: Option, value: Any) -> Any:
    if value is None:
        return option.default
    if isinstance(value, str) and option.type is not str:
        try:
            return _PARSERS[option.type](value)
        except ValueError as exc:
            raise SettingsError(f"{option.name}: {exc}") from exc
    if option.type is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, option.type):
        raise SettingsError(f"{option.name}: expected {option.type.__name__}, got {value!r}")
    return value


def _nest(flat: dict[str, Any]) -> SimpleNamespace:
    """Sections become namespaces; option values (a dict option included) stay as they are."""
    root = SimpleNamespace()
    for name, value in flat.items():
        node = root
        *parents, leaf = name.split(".")
        for p in parents:
            if not hasattr(node, p):
                setattr(node, p, SimpleNamespace())
            node = getattr(node, p)
        setattr(node, leaf, value)
    return root


class Settings(SimpleNamespace):
    """Attribute access by section (`settings.api.key_header`) plus derived paths."""

    flat: dict[str, Any]

    @property
    def models_dir(self) -> Path:
        return Path(self.models.dir or Path(self.data_dir) / "models")

    @property
    def lora_dir(self) -> Path:
        return Path(self.models.lora_dir or Path(self.data_dir) / "loras")

    @property
    def embeddings_dir(self) -> Path:
        return Path(self.models.embeddings_dir or self.models_dir / "embeddings")

    @property
    def controlnet_dir(self) -> Path:
        return Path(self.models.controlnet_dir or self.models_dir / "controlnet")

    @property
    def upscalers_dir(self) -> Path:
        return Path(self.models.upscalers_dir or self.models_dir / "upscalers")

    @property
    def broker_url(self) -> str:
        return self.redis.broker_url or self.redis.url


def keep_key_policies(keys: list, configured: list) -> list:
    """SDQ_API_KEYS chooses which keys are accepted; a key config.yaml describes as a map keeps its name and policy."""
    maps = {str(item["key"]): item for item in configured or [] if isinstance(item, dict) and item.get("key")}
    return [maps.get(str(k), k) for k in keys]


def load_settings(config_path: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build settings: defaults < config.yaml < SDQ_* env < explicit overrides.

    The config file is `config_path`, else $SDQ_CONFIG, else ./config.yaml if present.
    """
    env = os.environ if env is None else env
    path = config_path or env.get("SDQ_CONFIG") or ("config.yaml" if Path("config.yaml").exists() else None)
    tree: dict[str, Any] = {}
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SettingsError(f"cannot read config {path}: {exc}") from exc
    flat: dict[str, Any] = {}
    for option in OPTIONS:
        found, value = _lookup(tree, option.name)
        value = _coerce(option, value) if found else option.default
        if option.env_name in env:
            configured = value
            value = _coerce(option, env[option.env_name])
            if option.name == "api.keys":
                value = keep_key_policies(value, configured)
        if overrides and option.name in overrides:
            value = _coerce(option, overrides[option.name])
        flat[option.name] = value
    nested = _nest(flat)
    settings = Settings(**vars(nested))
    settings.flat = flat
    try:
        check_overrides(settings.models.overrides, settings.limits.max_size, settings.limits.max_steps)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    warn_unknown_options(tree, env)
    return settings


REMOVED = {   # options that no longer exist -> what replaced them (a config that sets one is told, not ignored)
    "defaults.num_inference_steps": "each model family's default steps (models.overrides per model)",
    "defaults.guidance_scale": "each model family's default guidance (models.overrides per model)",
    "defaults.strength": "each model family's default strength (models.overrides per model)",
}


def warn_unknown_options(tree: Mapping[str, Any], env: Mapping[str, str]) -> None:
    """Log each option a config file or SDQ_* variable sets that sdqueue does not have (a typo, a removed one)."""
    import logging

    known = {option.name for option in OPTIONS}
    env_names = {option.env_name for option in OPTIONS}
    found = [name for name in _dotted(tree) if name not in known and not any(name.startswith(k + ".") for k in known)]
    found += [name for name in env if name.startswith("SDQ_") and name not in env_names and name != "SDQ_CONFIG"]
    for name in found:
        dotted = name.removeprefix("SDQ_").lower().replace("_", ".", 1) if name.startswith("SDQ_") else name
        hint = REMOVED.get(dotted, "")
        logging.getLogger("sdqueue.settings").warning(
            "unknown option %s is ignored%s", name, f": replaced by {hint}" if hint else "")


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of a config tree's leaves."""
    names = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        names += _dotted(value, name + ".") if isinstance(value, Mapping) and value else [name]
    return names


def example_yaml() -> str:
    """config.example.yaml, generated from OPTIONS so the two never disagree."""
    lines = ["# sdqueue configuration. Every option may also be set as an environment",
             "# variable: SDQ_ + the dotted name in capitals with dots as underscores",
             "# (api.key_header -> SDQ_API_KEY_HEADER; lists are comma-separated).",
             "# Regenerate with: python -m common.settings > config.example.yaml", ""]
    section = None
    for option in OPTIONS:
        parts = option.name.split(".")
        if len(parts) == 1:
            lines += [f"# {option.help}", f"{option.name}: {_yaml_value(option.default, option.name)}", ""]
            continue
        if parts[0] != section:
            section = parts[0]
            lines.append(f"{section}:")
        lines.append(f"  # {option.help} (env {option.env_name})")
        lines.append(f"  {parts[1]}: {_yaml_value(option.default, option.name)}")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any, name: str = "") -> str:
    if name == "api.keys":
        return '["change-me-to-a-long-random-key"]'
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()


if __name__ == "__main__":
    print(example_yaml(), end="")
