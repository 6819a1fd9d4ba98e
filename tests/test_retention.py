"""Retention of S3 objects: the bucket lifecycle rules sdqueue sets at start (common/lifecycle.py).

The rules are read back from the real local S3 server (SeaweedFS stores and
answers them); a server that refuses them is shown by a client whose server
says NotImplemented (none we can run does), and by a bucket that is not there.
"""
from __future__ import annotations

import logging
import os
import uuid

import pytest
from botocore.exceptions import ClientError

from common import lifecycle
from common.lifecycle import ABORT_RULE, RULE_PREFIX, WEBUI_OUTPUT_DIR, ensure_lifecycle, expiring_prefixes, \
    lifecycle_rules, merged_rules, same_rules
from common.settings import load_settings
from common.storage import Storage

OPERATOR_RULE = {"ID": "operator-logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled",
                 "Expiration": {"Days": 3}}


def offline_settings(**env: str):
    return load_settings(config_path=os.devnull, env=env)


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Warnings are once per process: each test starts with none given."""
    lifecycle._warned.clear()
    yield
    lifecycle._warned.clear()


# --- the rules ----------------------------------------------------------------------------
def test_job_files_expire_and_checkpoints_never():
    settings = offline_settings()
    assert expiring_prefixes(settings) == ["out/", "outputs/"]   # AWS extension; native, A1111 copies, SD on EKS
    rules = {rule["ID"]: rule for rule in lifecycle_rules(settings)}
    assert rules[RULE_PREFIX + "expire-outputs/"] == {
        "ID": RULE_PREFIX + "expire-outputs/", "Filter": {"Prefix": "outputs/"}, "Status": "Enabled",
        "Expiration": {"Days": 30}}
    assert rules[ABORT_RULE]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}
    assert rules[ABORT_RULE]["Filter"] == {"Prefix": ""}       # an abort never deletes a completed object
    models = settings.aws.models_prefix + "/"
    assert not any(models.startswith(r["Filter"]["Prefix"]) for r in rules.values() if "Expiration" in r)


def test_every_key_a_job_writes_is_under_an_expiring_prefix():
    from api.dialects.a1111.translate import OUTDIRS
    from api.dialects.eks.schemas import AlwaysOnScripts

    settings = offline_settings()
    storage = Storage(settings)
    prefixes = expiring_prefixes(settings)
    keys = [storage.output_key("t1", 0, "png"), storage.input_key("t1", "init.png"),
            *(f"{folder}/k_owner/2026-01-01/00000-1.png" for folder in OUTDIRS.values()),
            f"{AlwaysOnScripts().fields['save_dir'].load_default}/k_owner/j/image_0.png",
            f"{settings.aws.output_prefix}/job/result/image_0.jpg"]
    for key in keys:
        assert any(key.startswith(prefix) for prefix in prefixes), key
    assert all(folder.startswith(WEBUI_OUTPUT_DIR + "/") for folder in OUTDIRS.values())


def test_a_prefix_that_would_cover_checkpoints_gets_no_rule(caplog):
    settings = offline_settings(SDQ_AWS_MODELS_PREFIX="outputs/models", SDQ_STORAGE_PREFIX="native")
    with caplog.at_level(logging.WARNING, logger="sdqueue.storage"):
        assert expiring_prefixes(settings) == ["native/", "out/"]
    assert "also holds uploaded checkpoints" in caplog.text
    nested = offline_settings(SDQ_AWS_OUTPUT_PREFIX="outputs/aws", SDQ_STORAGE_PREFIX="")
    assert expiring_prefixes(nested) == ["/", "outputs/"]      # an empty prefix: keys begin with "/"


def test_zero_days_means_no_rule():
    assert [r["ID"] for r in lifecycle_rules(offline_settings(SDQ_STORAGE_RETENTION_DAYS="0"))] == [ABORT_RULE]
    assert lifecycle_rules(offline_settings(SDQ_STORAGE_RETENTION_DAYS="0", SDQ_STORAGE_ABORT_UPLOAD_DAYS="0")) == []


def test_only_sdqueues_rules_are_replaced():
    ours = lifecycle_rules(offline_settings())
    stale = {**ours[0], "Expiration": {"Days": 99}}
    assert merged_rules([OPERATOR_RULE, stale], ours) == [OPERATOR_RULE, *ours]
    answered = [{**rule, "Expiration": {**rule["Expiration"], "ExpiredObjectDeleteMarker": False}}
                if "Expiration" in rule else rule for rule in ours]   # defaults a server may add
    assert same_rules(answered, ours) and not same_rules([stale], ours[:1])


class RefusingClient:
    """An S3 client whose server has no lifecycle API (what an older SeaweedFS answered)."""

    def __init__(self):
        self.calls = 0

    def get_bucket_lifecycle_configuration(self, **_):
        self.calls += 1
        raise ClientError({"Error": {"Code": "NotImplemented", "Message": "A header you provided implies "
                                                                          "functionality that is not implemented"}},
                          "GetBucketLifecycleConfiguration")


def test_a_server_that_refuses_gets_one_warning_and_startup_goes_on(caplog):
    client = RefusingClient()
    settings = offline_settings()
    with caplog.at_level(logging.WARNING, logger="sdqueue.storage"):
        assert ensure_lifecycle(client, "sdqueue", settings) is False
        assert ensure_lifecycle(client, "sdqueue", settings) is False
    warnings = [r.getMessage() for r in caplog.records if "refused the lifecycle rules" in r.getMessage()]
    assert len(warnings) == 1 and client.calls == 2
    assert "set a lifecycle rule on the bucket yourself: expire out/, outputs/ after 30 days" in warnings[0]
    assert "abort incomplete multipart uploads after 7 days" in warnings[0]


def test_lifecycle_off_leaves_the_bucket_alone():
    client = RefusingClient()
    assert ensure_lifecycle(client, "sdqueue", offline_settings(SDQ_STORAGE_LIFECYCLE="false")) is True
    assert client.calls == 0


def test_images_that_outlive_their_task_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="sdqueue.storage"):
        lifecycle.warn_short_retention(offline_settings(SDQ_STORAGE_RETENTION_DAYS="3"))   # tasks: 7 days
        lifecycle.warn_short_retention(offline_settings())
    assert caplog.text.count("shorter than tasks.retention_seconds") == 1


# --- against the local stack's S3 server ------------------------------------------------------
@pytest.fixture
def bucket_storage(stack):
    """A Storage on a bucket of its own (the stack's bucket stays as the stack set it), removed afterwards."""
    made = []

    def make(bucket: str, **env: str) -> Storage:
        storage = Storage(load_settings(env={**stack.env(), "SDQ_STORAGE_BUCKET": bucket, **env}))
        made.append(storage)
        return storage

    yield make
    for storage in made:
        try:
            storage.client.delete_bucket_lifecycle(Bucket=storage.bucket)
            storage.client.delete_bucket(Bucket=storage.bucket)
        except ClientError:
            pass


def rules_of(storage: Storage) -> list[dict]:
    try:
        return storage.client.get_bucket_lifecycle_configuration(Bucket=storage.bucket)["Rules"]
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "NoSuchLifecycleConfiguration"
        return []


def count_puts(storage: Storage) -> list[int]:
    puts = [0]
    storage.client.meta.events.register("before-call.s3.PutBucketLifecycleConfiguration",
                                        lambda **_: puts.__setitem__(0, puts[0] + 1))
    return puts


def test_the_stacks_bucket_got_its_rules_at_start(storage):
    assert same_rules([r for r in rules_of(storage) if r["ID"].startswith(RULE_PREFIX)],
                      lifecycle_rules(storage.settings))


def test_rules_are_set_read_back_kept_and_removed(bucket_storage):
    bucket = f"sdq-lc-{uuid.uuid4().hex[:12]}"
    storage = bucket_storage(bucket, SDQ_STORAGE_RETENTION_DAYS="9", SDQ_STORAGE_ABORT_UPLOAD_DAYS="2")
    storage.ensure_bucket()                                      # creates the bucket, then sets the rules
    found = {rule["ID"]: rule for rule in rules_of(storage)}
    assert set(found) == {RULE_PREFIX + "expire-out/", RULE_PREFIX + "expire-outputs/", ABORT_RULE}
    assert found[RULE_PREFIX + "expire-outputs/"]["Expiration"]["Days"] == 9
    assert found[RULE_PREFIX + "expire-outputs/"]["Filter"]["Prefix"] == "outputs/"
    assert found[ABORT_RULE]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 2

    # An operator's own rule survives every start; a start with nothing to change writes nothing.
    storage.client.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [*rules_of(storage), OPERATOR_RULE]})
    puts = count_puts(storage)
    storage.ensure_bucket()
    assert puts[0] == 0 and "operator-logs" in {rule["ID"] for rule in rules_of(storage)}

    # Another retention rewrites sdqueue's rules only; none at all leaves the operator's.
    longer = bucket_storage(bucket, SDQ_STORAGE_RETENTION_DAYS="40", SDQ_STORAGE_ABORT_UPLOAD_DAYS="2")
    longer.ensure_bucket()
    found = {rule["ID"]: rule for rule in rules_of(storage)}
    assert found[RULE_PREFIX + "expire-out/"]["Expiration"]["Days"] == 40 and "operator-logs" in found
    forever = bucket_storage(bucket, SDQ_STORAGE_RETENTION_DAYS="0", SDQ_STORAGE_ABORT_UPLOAD_DAYS="0")
    forever.ensure_bucket()
    assert [rule["ID"] for rule in rules_of(storage)] == ["operator-logs"]

    # With no rule left at all, the configuration is deleted (S3 refuses an empty one).
    storage.client.delete_bucket_lifecycle(Bucket=bucket)
    storage.ensure_bucket()
    forever.ensure_bucket()
    assert rules_of(storage) == []


def test_a_refusal_from_the_real_server_is_a_warning(bucket_storage, caplog):
    storage = bucket_storage(f"sdq-lc-missing-{uuid.uuid4().hex[:8]}")     # never created: NoSuchBucket
    with caplog.at_level(logging.WARNING, logger="sdqueue.storage"):
        assert ensure_lifecycle(storage.client, storage.bucket, storage.settings) is False
    assert "refused the lifecycle rules" in caplog.text and storage.bucket in caplog.text
