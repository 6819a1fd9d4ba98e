"""The LoRAs a key may name: the LoRA directory's (shared), then its own Active Lora checkpoints.

Why: a LoRA a key trained (api/trainings.py) or uploaded through the AWS
extension's /checkpoint lives in S3, recorded as that key's checkpoint; the
native `loras` field and A1111 `<lora:name:weight>` tags must find it at
once, by the name the key gave it, and no other key may (for them the name
does not exist). A job naming one carries it as an asset: the worker copies
the file into its LoRA directory under a name holding the checkpoint id
(worker/assets.py), which is the name the job applies it by. A name in the
LoRA directory wins over a key's own LoRA of the same name, as it always has.
"""
from __future__ import annotations

from dataclasses import dataclass

from api.services import Services
from common.catalog import ModelInfo
from common.store.checkpoints import Checkpoint

WEIGHT_SUFFIX = ".safetensors"     # what workers load as a LoRA


@dataclass(frozen=True)
class OwnedLora:
    """One of a key's LoRAs: the checkpoint holding it and the file."""

    checkpoint: Checkpoint
    file: str

    @property
    def asset(self) -> dict[str, str]:
        """What the worker fetches (JobSpec.assets)."""
        return self.checkpoint.asset(self.file)

    @property
    def local_name(self) -> str:
        """The name the job applies it by: the worker's file name without its suffix."""
        return self.asset["name"].removesuffix(WEIGHT_SUFFIX)

    def problem_with(self, model: ModelInfo) -> str | None:
        """Why it cannot adapt `model`, when its record knows its family (a trained LoRA's does)."""
        family = self.checkpoint.params.get("family")
        if family and family != model.family and {family, model.family} != {"sdxl", "sdxl-refiner"}:
            return f"it was trained on a {family} model ({self.checkpoint.params.get('base_model', '?')}), " \
                   f"not {model.profile.label}"
        return None


def owned_loras(svc: Services, owner: str) -> dict[str, OwnedLora]:
    """name (file stem) -> the newest Active Lora checkpoint of `owner` with that file (its own uploads and
    trainings, and shared records); .safetensors files only."""
    found: dict[str, OwnedLora] = {}
    for checkpoint in svc.checkpoints.visible(owner):          # oldest first: a newer one replaces an older
        if checkpoint.type != "Lora" or checkpoint.status != "Active":
            continue
        for file in checkpoint.names:
            if file.endswith(WEIGHT_SUFFIX):
                found[file.removesuffix(WEIGHT_SUFFIX)] = OwnedLora(checkpoint, file)
    return found


def usable_loras(svc: Services, owner: str) -> list[dict]:
    """Every LoRA `owner` may use, as GET /api/v1/loras lists them: the LoRA directory's, then its own (with
    what it was trained on)."""
    local = svc.catalog.loras()
    mine = [{"name": name, "source": "own", "checkpoint_id": lora.checkpoint.id,
             "base_model": lora.checkpoint.params.get("base_model"), "family": lora.checkpoint.params.get("family"),
             "training_job": lora.checkpoint.params.get("training_job")}
            for name, lora in owned_loras(svc, owner).items() if name not in local]
    return [*({"name": name, "source": "directory"} for name in local), *mine]


def forget_lora(svc: Services, owner: str, name: str) -> int:
    """Delete every LoRA `owner` itself made or uploaded under `name` (records and S3 files); how many.

    Shared records (no owner) and the LoRA directory's files are not a key's to delete.
    """
    gone = 0
    for checkpoint in svc.checkpoints.visible(owner):
        file = f"{name}{WEIGHT_SUFFIX}"
        if checkpoint.type == "Lora" and checkpoint.owner == owner and file in checkpoint.names:
            svc.storage.delete([checkpoint.key_of(n) for n in checkpoint.names])
            svc.checkpoints.forget(checkpoint.id)
            gone += 1
    return gone
