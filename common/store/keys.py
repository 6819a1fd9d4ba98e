"""Every Redis key sdqueue writes, named once (as rq's `keys.py` does).

Why one module: a key spelled in two places drifts, and a newcomer asking
"what is in Redis?" should read one table. Python code builds keys with
these `Key` objects; the Lua scripts never spell a key: they receive each
key (or, for keys that depend on what the script reads, the key's prefix)
through KEYS. `python -m common.store.keys` prints the table that
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


# --- tasks and their indexes ------------------------------------------------------------------
TASK = Key("task:{id}", "hash",
           "A task: status, owner, spec (JobSpec JSON), queue, model, priority, attempt, worker, timestamps, "
           "progress, result keys, seeds, error, cancel flag, callback state")
EVENTS = Key("events:{id}", "channel", "Pub/sub: each new status of a task, for waiters (long polls, synchronous calls)")
OWNER_TASKS = Key("owner:{owner}", "zset", "An API key's tasks by creation time (listing)")
PENDING = Key("pending:{queue}", "zset",
              "Waiting tasks of a queue (worker pool) in the order workers take them: "
              "score = priority rank * 1e15 + µs since 2020")
PENDING_MODEL = Key("pending:{queue}:m:{model}", "zset", "The same tasks per model (a worker's own jobs: model affinity)")
PENDING_OWNER = Key("pending-owner:{owner}", "zset", "An API key's waiting tasks by time (per-key backpressure)")
RUNNING = Key("running", "zset", "Tasks a worker is processing, by claim time (the reaper's list)")
STATS = Key("stats:jobs", "hash", "Counters: submitted, completed, failed, cancelled, requeued")
DELIVERY = Key("delivery:{token}", "string", "The task a Celery delivery took (24 h), so a retried delivery gets it back")
SEQUENCE = Key("seq:{folder}", "string", "A1111 saved-image numbering counter per output folder and day")

# --- workers, pools, the reaper -----------------------------------------------------------------
WORKER = Key("worker:{id}", "string", "A live worker process's heartbeat (JSON, short TTL): state, queues, models held")
WORKERS = Key("workers", "zset", "Index of worker ids by last heartbeat (stale entries pruned on read)")
POOLS = Key("pools", "hash", "Worker pools asked for (AWS extension endpoints): name -> JSON with desired replicas")
REAPER_LOCK = Key("reaper-lock", "string", "Which worker runs the reaper pass now (short TTL)")
DEFICIT = Key("deficit:{queue}", "string", "Deliveries found missing at the reaper's previous pass")

# --- uploaded models and per-key dialect state --------------------------------------------------
CHECKPOINT = Key("checkpoint:{id}", "string", "An uploaded model's record (JSON): type, files in S3, status, owner")
CHECKPOINT_LOCK = Key("checkpoint:{id}:lock", "string", "One writer per checkpoint record (redis-py lock)")
CHECKPOINTS = Key("checkpoints", "zset", "Index of checkpoint ids by creation time")
A1111_OPTIONS = Key("a1111:options:{owner}", "hash", "An API key's A1111 /options values (JSON each)")
A1111_CURRENT = Key("a1111:current:{owner}", "string", "An API key's latest A1111 job (for /progress, /interrupt; 1 h)")
RATE_LIMITS = Key("rl*", "strings", "Flask-Limiter's moving-window counters (prefix passed to the limiter)")

ALL: tuple[Key, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, Key))
RATE_LIMIT_PREFIX = PREFIX + "rl"
BROKER_KEYS = "Celery's own keys (not named here): one list per queue, `unacked`, `unacked_index`, `_kombu.binding.*`"


def key_map_markdown() -> str:
    """The key table for docs/architecture.md."""
    rows = ["| key | type | what it holds |", "|---|---|---|"]
    rows += [f"| `{PREFIX}{k.pattern}` | {k.kind} | {k.doc} |" for k in ALL]
    return "\n".join(rows) + f"\n\nAlso: {BROKER_KEYS}.\n"


if __name__ == "__main__":
    print(key_map_markdown(), end="")
