"""A key's own uploaded checkpoints (the AWS extension's /checkpoint, trainings, merges) as models a job can name.

Why a module of its own: the AWS extension's /inference/v2 and a model
merge (api/merges.py, native or AWS) both name a key's Active uploads by
file name, and both need the upload's family before anything is queued,
read from its safetensors header in S3 (never downloading the weights).
Another key's upload is not found, as a missing one.
"""
from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from api.services import Services
from common.catalog import DEFAULT_SINGLE_FILE_FAMILY, WEIGHT_SUFFIXES, ModelInfo, owned_dir, single_file_model
from common.checkpoint_keys import family_from_keys, parse_safetensors_header
from common.store import CheckpointStore


def uploaded_asset(store: CheckpointStore, kind: str, name: str, owner: str) -> dict[str, str]:
    """The file a worker must fetch for an Active upload of `kind` called `name` that `owner` may use;
    LookupError says why not (another key's upload is not found, as a missing one)."""
    checkpoint = store.find_active(kind, name, owner)
    if checkpoint is None:
        raise LookupError(f"checkpoint with name {name}, type {kind} is not found")
    if not name.endswith(WEIGHT_SUFFIXES):
        raise LookupError(f"{kind} {name} cannot be loaded: workers load {' or '.join(WEIGHT_SUFFIXES)} files")
    return checkpoint.asset(name)


def owned_model(svc: Services, owner: str, name: str) -> tuple[ModelInfo, dict[str, str]] | None:
    """One of `owner`'s Active Stable-diffusion checkpoints (uploaded, or a merge's result) named by its file
    name, as a model and the file a worker fetches for it; None when it has none of that name."""
    try:
        asset = uploaded_asset(svc.checkpoints, "Stable-diffusion", name, owner)
    except LookupError:
        return None
    return uploaded_model(svc, asset), asset


def owned_models(svc: Services, owner: str) -> list[dict]:
    """`owner`'s own Active Stable-diffusion checkpoints as GET /api/v1/models lists them: the file name `model`
    takes, its family (recorded by a merge, else read from the file's header once), where it came from."""
    out = []
    for checkpoint in svc.checkpoints.visible(owner):
        if checkpoint.type != "Stable-diffusion" or checkpoint.status != "Active":
            continue
        for name in checkpoint.names:
            if not name.endswith(WEIGHT_SUFFIXES):
                continue
            family = checkpoint.params.get("family") or uploaded_model(svc, checkpoint.asset(name)).family
            out.append({"name": name, "family": family, "checkpoint_id": checkpoint.id,
                        "source": "merge" if checkpoint.params.get("method") else "upload",
                        "created": checkpoint.created})
    return out


UPLOAD_HEADER_BYTES = 16 * 1024 * 1024   # real checkpoints' headers are under 2 MB; an upload's is read per request
_UPLOAD_FAMILIES: dict[str, str] = {}      # S3 key -> family (an Active upload never changes)
_UPLOAD_FAMILIES_KEPT = 256


def uploaded_model(svc: Services, asset: dict[str, str]) -> ModelInfo:
    """An uploaded checkpoint as the catalog would describe it once on disk: its family read from the
    safetensors header in S3 (two ranged reads, once per upload), so an SDXL upload gets SDXL's defaults
    and checks."""
    family = _UPLOAD_FAMILIES.get(asset["key"])
    if family is None:
        family = upload_family(svc, asset)
        if len(_UPLOAD_FAMILIES) >= _UPLOAD_FAMILIES_KEPT:
            _UPLOAD_FAMILIES.pop(next(iter(_UPLOAD_FAMILIES)))
        _UPLOAD_FAMILIES[asset["key"]] = family
    return single_file_model(asset["name"], owned_dir(svc.settings.models_dir) / asset["name"], family,
                             svc.catalog.overrides.get(asset["name"]))


def upload_family(svc: Services, asset: dict[str, str]) -> str:
    """The family an uploaded file's weight names say; SD 1.x when they cannot be read (a .ckpt, a bad header,
    S3 failing: the worker's load then says what is wrong)."""
    if not asset["name"].lower().endswith(".safetensors"):
        return DEFAULT_SINGLE_FILE_FAMILY
    try:
        shapes = parse_safetensors_header(lambda start, length: svc.storage.read_range(asset["key"], start, length),
                                          asset["key"], UPLOAD_HEADER_BYTES)
    except (ValueError, ClientError, BotoCoreError):
        return DEFAULT_SINGLE_FILE_FAMILY
    return family_from_keys(shapes) or DEFAULT_SINGLE_FILE_FAMILY
