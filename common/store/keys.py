"""Every Redis key sdqueue writes, named once (as rq's `keys.py` does).

Why one module: a key spelled in two places drifts, and a newcomer asking
"what is in Redis?" should read one table. Python code builds keys with
these `Key` objects; the Lua scripts never spell a key: they receive each
key (or, for keys that depend on what the script reads, the key's prefix)
through KEYS. `python -m common.store` prints the table that
docs/architecture.md carries (a test keeps the two equal).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "sdq:"
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Key:
    """One key pattern (without the prefix), its Redis type and why it exists."""

    pattern: str
    kind: str
    doc: str

    def __post_init__(self) -> None:
        numbered = iter(range(len(self.placeholders)))
        object.__setattr__(self, "_template", PREFIX + _FIELD.sub(lambda _: "{%d}" % next(numbered), self.pattern))

    def __call__(self, *parts: str) -> str:
        """The full key for these placeholder values, in the pattern's order."""
        return self._template.format(*parts)

    @property
    def placeholders(self) -> list[str]:
        return _FIELD.findall(self.pattern)

    def prefix(self, *parts: str) -> str:
        """The key up to its next unfilled placeholder: what a Lua script appends a value read in Redis to."""
        cut = self.pattern.index("{%s}" % self.placeholders[len(parts)])
        return Key(self.pattern[:cut], self.kind, self.doc)(*parts)


# --- training data --------------------------------------------------------------------------------
DATASET = Key("dataset:{owner}:{name}", "string",
              "one dataset of an API key (JSON: name, status Initialed / Enabled / Disabled, its items with S3 keys, "
              "captions and sizes; common/store/datasets.py); names are per key")
DATASETS = Key("datasets:{owner}", "sorted set", "an API key's dataset names by creation time")
TRAININGS = Key("trainings:{owner}", "sorted set", "an API key's training jobs (task ids) by creation time (listings)")
MERGES = Key("merges:{owner}", "sorted set", "an API key's model merges (task ids) by creation time (listings)")
DATASET_LOCK = Key("dataset-lock:{owner}:{name}", "string", "lock while a dataset is checked or changed")
TRAIN_JOB = Key("train-job:{owner}:{id}", "string (JSON)",
                "an AWS SD extension training job of an API key (POST /train: base model, dataset and settings, the "
                "echoed params, when PUT /train queued its task, whose id is the job's; common/store/trainjobs.py); "
                "expires `tasks.retention_seconds` after its last write")
TRAIN_JOBS = Key("train-jobs:{owner}", "sorted set", "an API key's AWS-extension training job ids by creation time")
MODEL_JOB = Key("model-job:{owner}:{id}", "string (JSON)",
                "an AWS SD extension \"model\" of an API key (POST /model: a base model for training; status "
                "Initial / Creating / Complete / Fail, the owned checkpoint or catalog model it is)")
MODEL_JOBS = Key("model-jobs:{owner}", "sorted set", "an API key's AWS-extension model ids by creation time")
EXTENSION_LOCK = Key("extension-lock:{owner}:{id}", "string", "lock while an AWS-extension training job or model "
                     "is started or changed")


# --- tasks and their indexes ------------------------------------------------------------------
TASK = Key("task:{id}", "hash",
           "one task: `id`, `status`, `owner` (hash of the API key), `spec` (the JobSpec as JSON), `queue`, `model`, "
           "`priority`, `attempt`, `worker`, `runs`, timestamps (`created_at`, `updated_at`, `started_at`, "
           "`finished_at`, `requeued_at`), `progress_step`, `progress_total`, `result_keys`, `seeds`, `error`, "
           "`cancel_requested`, `compute_seconds`, `scheduler_used`, `callback_status`, `steps_since` and "
           "`steps_from` (where the ETA is measured from); expires "
           "`tasks.retention_seconds` after its last change")
EVENTS = Key("events:{id}", "pub/sub channel",
             "the kind of each new event of a task (`queued`, `started`, `progress`, `preview`, or its final "
             "status): waiters of `?wait=`, the synchronous dialects and SSE streams listen")
EVENT_LOG = Key("event-log:{id}", "stream",
                "a task's events (`event` and its fields), what SSE streams send and resume from by their ids; "
                "about 200 kept, only the final one once the task ended; expires with the task")
PREVIEW = Key("preview:{id}", "string",
              "a running task's newest preview (JSON: step, total, image as a data URL, width, height); "
              "deleted when the task ends or is put back in its queue")
PENDING = Key("pending:{queue}", "sorted set",
              "the tasks waiting in a queue (worker pool); score = priority rank × 10^15 + µs since 2020-01-01, "
              "so the order is the order workers take them in")
PENDING_MODEL = Key("pending:{queue}:m:{model}", "sorted set",
                    "the same tasks, per model (model affinity: a worker's own jobs)")
PENDING_INDEXES = Key("pending-indexes", "set",
                      "names of the queue and per-model waiting indexes ever written (what /metrics counts, "
                      "without scanning the keyspace; emptied ones are pruned at a scrape)")
PENDING_OWNER = Key("pending-owner:{owner}", "sorted set", "an API key's waiting tasks, by time (per-key backpressure)")
RUNNING = Key("running", "sorted set", "tasks being processed, by claim time (the reaper scans it)")
STATS = Key("stats:jobs", "hash", "counters: `submitted`, `completed`, `failed`, `cancelled`, `requeued`")
OWNER_TASKS = Key("owner:{owner}", "sorted set", "an API key's tasks by creation time (listings)")
DELIVERY = Key("delivery:{token}", "string",
               "the task a delivery (Celery message id) took, so a retried delivery gets the same job; 24 h")
MESSAGE_TEMPLATE = Key("message-template:{nonce}:{queue}", "list",
                       "scratch: a Celery message that common/queue.py has Celery publish once per message template "
                       "(under kombu's `global_keyprefix`) and pops at once")

# --- workers, pools, the reaper -----------------------------------------------------------------
WORKER = Key("worker:{id}", "string (JSON)",
             "a live worker process's heartbeat: name, device, queues, state, models held, current task, the tasks "
             "it owes an ending; expires after `workers.heartbeat_ttl`")
WORKERS = Key("workers", "sorted set", "index of worker ids by last heartbeat (dead entries pruned on read)")
POOLS = Key("pools", "hash",
            "worker pools recorded through the AWS SD extension API's `/endpoints`: name → JSON (desired replicas, "
            "instance type, `owner`: the key that recorded it and alone sees it; none: shared, ...)")

# --- uploaded models ------------------------------------------------------------------------------
CHECKPOINT = Key("checkpoint:{id}", "string (JSON)",
                 "an uploaded checkpoint (AWS SD extension API): type, file names, status, S3 prefix, `owner` (the "
                 "key that uploaded it and alone sees it)")
CHECKPOINT_LOCK = Key("checkpoint:{id}:lock", "string", "lock while a checkpoint is changed")
CHECKPOINTS = Key("checkpoints", "sorted set", "index of checkpoint ids by creation time")

CALLBACK_OUTBOX = Key("callback-outbox", "sorted set",
                      "ended tasks whose webhook is not yet handed to Celery, by ending time (the reaper resends "
                      "those a lost enqueue left behind)")

# --- the reaper ----------------------------------------------------------------------------------
REAPER_LOCK = Key("reaper-lock", "string", "one reaper at a time (expires after half the heartbeat TTL)")
DEFICIT = Key("deficit:{queue}", "string",
              "waiting jobs found without a message at the reaper's previous pass; 1 h")

AUTH_FAILURES = Key("auth-failures:{address}", "string (counter)",
                    "requests with a missing or wrong API key from one client address in the current minute")

# --- per-key dialect state -----------------------------------------------------------------------
IDEMPOTENCY = Key("idem:{owner}:{digest}", "string",
                  "`<task id> <sha256 of the body>` a native submission's Idempotency-Key (sha256 `digest`) "
                  "answered with; 24 h")
SEQUENCE = Key("seq:{folder}", "string (counter)",
               "AUTOMATIC1111 `save_images` file numbering, per output folder (one per key and day: the folder "
               "carries the key's owner id)")
A1111_OPTIONS = Key("a1111:options:{owner}", "hash", "an API key's AUTOMATIC1111 `/options`")
A1111_CURRENT = Key("a1111:current:{owner}", "string",
                    "an API key's latest AUTOMATIC1111 job (for `/progress`, `/interrupt`); 1 h")

ALL: tuple[Key, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, Key))

# Keys that libraries name (sdqueue only chooses a prefix or a queue name): listed for the key map, as Markdown.
RATE_LIMIT_PREFIX = PREFIX + "rl"
LIBRARY_KEYS = (
    (f"`LIMITS:LIMITER/{RATE_LIMIT_PREFIX}/...`", "list",
     f"Flask-Limiter's moving-window counters per API key and scope (named by the library, with sdqueue's "
     f"prefix `{RATE_LIMIT_PREFIX}`)"),
    ("`{queue}` (e.g. `gpu`, `callbacks`, a pool name)", "list",
     "Celery's queue: the wake-up messages (and webhook tasks) waiting for a worker; KEDA scales on its length"),
    ("`unacked`, `unacked_index`, `unacked_mutex`", "hash, sorted set, string",
     "Celery's messages delivered but not yet acknowledged"),
    ("`_kombu.binding.{queue}`", "set", "kombu's routing table"),
)


def key_map_markdown() -> str:
    """The key table of docs/architecture.md (between its keys:begin / keys:end markers)."""
    rows = ["| key | type | what |", "|---|---|---|"]
    rows += [f"| `{PREFIX}{k.pattern}` | {k.kind} | {k.doc} |" for k in ALL]
    rows += [f"| {name} | {kind} | {doc} |" for name, kind, doc in LIBRARY_KEYS]
    return "\n".join(rows) + "\n"

