"""The bucket's lifecycle rules: which objects S3 deletes on its own, and when.

Why S3 does it and not a sweeper of ours: the object store expires objects
itself (no process lists millions of keys), and it is the only one that can
abort a multipart upload a client abandoned (its parts cost storage but are
in no listing).

What sdqueue writes in the bucket, and whether it expires after
`storage.retention_days`:

  {storage.prefix}/{task_id}/{n}.{ext}, .../input/{name}   native jobs' images, init images, masks    expires
  outputs/txt2img-images|img2img-images/{owner}/...         A1111 `save_images` copies                 expires
  outputs/{owner}/{id_task}/...                             SD on EKS images and .out (default save_dir) expires
  {aws.output_prefix}/{job}/result/...                      AWS-extension images and param JSON        expires
  {aws.models_prefix}/{type}/{id}/{file}                    uploaded checkpoints and LoRAs (a key's)   kept
  {save_dir}/{owner}/{id_task}/... for another save_dir     SD on EKS, a client's own folder           kept

A prefix that would also cover `aws.models_prefix` (a storage.prefix of
"models", say) gets no rule: checkpoints are never expired by accident.
Stale multipart uploads are aborted bucket-wide (an abort never touches a
completed object). sdqueue owns only the rules whose ID starts with
`sdqueue-`; the bucket's other rules are kept as they are.
"""
from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("sdqueue.storage")

RULE_PREFIX = "sdqueue-"
ABORT_RULE = RULE_PREFIX + "abort-incomplete-uploads"
# A1111's saved copies (api/dialects/a1111 OUTDIRS) and SD on EKS's default save_dir live under this folder,
# whatever storage.prefix is.
WEBUI_OUTPUT_DIR = "outputs"
_NO_CONFIGURATION = ("NoSuchLifecycleConfiguration",)
_warned: set[str] = set()


def folder(prefix: str) -> str:
    """A key prefix as the folder S3 rules match: "outputs" -> "outputs/" ("" -> "/", as the keys then begin)."""
    return prefix.strip("/") + "/"


def expiring_prefixes(settings) -> list[str]:
    """The folders whose objects are a job's (see the module's map), minus any that would cover checkpoints."""
    models = folder(settings.aws.models_prefix)
    wanted = {folder(settings.storage.prefix), folder(WEBUI_OUTPUT_DIR), folder(settings.aws.output_prefix)}
    covering = {prefix for prefix in wanted if models.startswith(prefix)}
    for prefix in sorted(covering):
        warn_once(f"covers-models:{prefix}", f"storage: {prefix!r} also holds uploaded checkpoints (aws.models_prefix "
                                              f"{models!r}): it gets no expiry rule")
    safe = wanted - covering
    return sorted(p for p in safe if not any(p != other and p.startswith(other) for other in safe))


def lifecycle_rules(settings) -> list[dict[str, Any]]:
    """The rules sdqueue wants on its bucket (an empty list: none)."""
    s = settings.storage
    rules = []
    if s.retention_days > 0:
        rules += [{"ID": f"{RULE_PREFIX}expire-{prefix}"[:255], "Filter": {"Prefix": prefix}, "Status": "Enabled",
                   "Expiration": {"Days": s.retention_days}} for prefix in expiring_prefixes(settings)]
    if s.abort_upload_days > 0:
        rules.append({"ID": ABORT_RULE, "Filter": {"Prefix": ""}, "Status": "Enabled",
                      "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": s.abort_upload_days}})
    return rules


def merged_rules(current: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bucket's rules with sdqueue's replaced by `ours` (an operator's own rules stay)."""
    return [rule for rule in current if not str(rule.get("ID", "")).startswith(RULE_PREFIX)] + ours


def _essence(rule: dict[str, Any]) -> tuple:
    """What sdqueue sets in a rule, ignoring the defaults a server adds when it answers."""
    return (rule.get("ID"), rule.get("Status"), (rule.get("Filter") or {}).get("Prefix", rule.get("Prefix")),
            (rule.get("Expiration") or {}).get("Days"),
            (rule.get("AbortIncompleteMultipartUpload") or {}).get("DaysAfterInitiation"))


def same_rules(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return sorted(map(_essence, a), key=repr) == sorted(map(_essence, b), key=repr)


def read_rules(client, bucket: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The bucket's rules, and the other settings of its configuration to keep when it is written again."""
    try:
        found = client.get_bucket_lifecycle_configuration(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _NO_CONFIGURATION:
            return [], {}
        raise
    extra = {k: found[k] for k in ("TransitionDefaultMinimumObjectSize",) if found.get(k)}
    return list(found.get("Rules") or []), extra


def write_rules(client, bucket: str, rules: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """Put the configuration (S3 replaces it whole), or delete it when no rule is left (S3 refuses an empty one)."""
    if rules:
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules}, **extra)
    else:
        client.delete_bucket_lifecycle(Bucket=bucket)


def ensure_lifecycle(client, bucket: str, settings) -> bool:
    """Make the bucket's sdqueue rules what the settings say; idempotent (nothing is written when they already are).

    Never raises: a server that refuses lifecycle configuration (or a role
    without s3:GetLifecycleConfiguration / s3:PutLifecycleConfiguration) gets
    one warning per process, and the service starts anyway. False then.
    """
    if not settings.storage.lifecycle:
        return True
    ours = lifecycle_rules(settings)
    warn_short_retention(settings)
    try:
        current, extra = read_rules(client, bucket)
        mine = [rule for rule in current if str(rule.get("ID", "")).startswith(RULE_PREFIX)]
        if same_rules(mine, ours):
            return True
        write_rules(client, bucket, merged_rules(current, ours), extra)
        log.info("storage: lifecycle rules of bucket %s set: %s", bucket, [rule["ID"] for rule in ours] or "none")
        return True
    except (BotoCoreError, ClientError) as exc:
        warn_once(bucket, f"storage: the S3 server refused the lifecycle rules of bucket {bucket} ({exc}); "
                          f"{manual_rule_hint(settings)} (docs/operations.md, Retention)")
        return False


def manual_rule_hint(settings) -> str:
    """What the operator should set by hand when sdqueue cannot."""
    s = settings.storage
    parts = []
    if s.retention_days > 0:
        parts.append(f"expire {', '.join(expiring_prefixes(settings))} after {s.retention_days} days")
    if s.abort_upload_days > 0:
        parts.append(f"abort incomplete multipart uploads after {s.abort_upload_days} days")
    if not parts:
        return "nothing expires (storage.retention_days and storage.abort_upload_days are 0)"
    return "set a lifecycle rule on the bucket yourself: " + "; ".join(parts)


def warn_short_retention(settings) -> None:
    """Images that go before their task hash: the task would answer with URLs of deleted objects."""
    days = settings.storage.retention_days
    if 0 < days * 86400 < settings.tasks.retention_seconds:
        warn_once("short-retention", f"storage.retention_days ({days}) is shorter than tasks.retention_seconds "
                                     f"({settings.tasks.retention_seconds} s): tasks will name images already deleted")


def warn_once(key: str, message: str) -> None:
    """One warning per process and cause (every API process and worker applies the rules at start)."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
