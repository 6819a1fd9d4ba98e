"""Task state: one Redis hash per task, moved forward by atomic Lua scripts.

Why Lua: a task is touched by the API (create, cancel), by whichever worker
holds the current delivery (pick, progress, finish) and by the reaper that
rescues jobs of dead workers. Each transition checks and writes in one
script (common/store/lua/), so a completed task never returns to processing
and a stale delivery (an older `attempt`) can never overwrite the result of
a newer one. Every key is named in common/store/keys.py.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable

import orjson
import redis
from redis.exceptions import NoScriptError

from common.errors import JobCancelled, QueueFull, StaleAttempt, TaskNotFound
from common.jobspec import JobSpec
from common.queue import BrokerMessage
from common.store import keys
from common.store.results import (CancelOutcome, Claim, NoPick, Picked, Preview, Progressed, Requeue, RequeueOutcome, RunningJob,
                                  TaskEvent)
from common.store.scripts import LuaScript

DELIVERY_TTL = 24 * 3600   # how long a delivery remembers the job it took (beyond any job time limit)
STATUS_SCAN_LIMIT = 2000   # listing with a status filter scans at most this many of an owner's newest tasks
DEFICIT_TTL = 3600         # the reaper's memory of missing deliveries outlives any pause between its passes
MAX_SCANNED_KEYS = 2000    # waiting indexes counted per metrics scrape (queues and per-model indexes)
IDEMPOTENCY_SECONDS = 24 * 3600   # a native Idempotency-Key answers with its first task this long


class TaskStatus(str, Enum):
    """Lifecycle: pending -> processing -> completed | failed | cancelled."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


# Pending work is ordered by one score: priority class first, then enqueue time.
PRIORITIES = ("high", "normal", "low")
DEFAULT_PRIORITY = "normal"
SCORE_EPOCH = 1577836800   # 2020-01-01: enqueue times are µs since then, < PRIORITY_SPAN until 2051
PRIORITY_SPAN = 10 ** 15   # score = rank * PRIORITY_SPAN + enqueue µs; at most 3e15, exact in a double


def priority_rank(priority: str | None) -> int:
    """0 for the first class; an unknown or missing priority ranks as the default."""
    return PRIORITIES.index(priority if priority in PRIORITIES else DEFAULT_PRIORITY)


def pending_score(priority: str, enqueued_at: float) -> int:
    return priority_rank(priority) * PRIORITY_SPAN + int((enqueued_at - SCORE_EPOCH) * 1e6)


def front_score(priority: str | None) -> int:
    """The score ahead of every waiting job of its class: where a rescued job goes."""
    return priority_rank(priority) * PRIORITY_SPAN


def priority_score_ranges() -> list[tuple[str, str, str]]:
    """(priority, min, max) ZCOUNT bounds of each class in a pending:{queue} zset; the outer classes are open-ended."""
    last = len(PRIORITIES) - 1
    return [(p, "-inf" if rank == 0 else str(rank * PRIORITY_SPAN),
             "+inf" if rank == last else f"({(rank + 1) * PRIORITY_SPAN}") for rank, p in enumerate(PRIORITIES)]


@dataclass
class Task:
    """A task hash, decoded."""

    id: str
    status: TaskStatus
    owner: str
    spec: JobSpec
    queue: str
    attempt: int
    created_at: float
    updated_at: float
    worker: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    progress_step: int = 0
    progress_total: int = 0
    result_keys: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    compute_seconds: float | None = None
    callback_status: str | None = None
    loss: float | None = None                 # a training job's latest loss
    loss_curve: list = field(default_factory=list)     # its loss curve, [[step, loss], ...] (capped in length)
    result: dict = field(default_factory=dict)         # what a job made besides images (a training job's LoRA)
    steps_since: float | None = None          # when this attempt reported its first step (progress.lua)
    steps_from: int = 0                       # that first step

    def eta(self, now: float) -> float | None:
        """Seconds left at the pace since this attempt's first reported step (as the progress events say)."""
        step, total = self.progress_step, self.progress_total
        if self.status is not TaskStatus.PROCESSING or self.steps_since is None or step <= self.steps_from:
            return None
        return round((now - self.steps_since) / (step - self.steps_from) * max(total - step, 0), 2)

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> "Task":
        def num(name: str) -> float | None:
            return float(data[name]) if data.get(name) else None

        if not {"id", "status", "spec", "created_at", "updated_at"} <= data.keys():
            raise TaskNotFound(data.get("id", "?"))

        return cls(
            id=data["id"], status=TaskStatus(data["status"]), owner=data.get("owner", ""),
            spec=JobSpec.from_json(data["spec"]), queue=data.get("queue", ""),
            attempt=int(data.get("attempt", 0)), created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]), worker=data.get("worker", ""),
            started_at=num("started_at"), finished_at=num("finished_at"),
            progress_step=int(data.get("progress_step") or 0),
            progress_total=int(data.get("progress_total") or 0),
            result_keys=json.loads(data.get("result_keys") or "[]"),
            seeds=json.loads(data.get("seeds") or "[]"),
            error=data.get("error") or None,
            cancel_requested=data.get("cancel_requested") == "1",
            compute_seconds=num("compute_seconds"),
            callback_status=data.get("callback_status") or None,
            loss=num("loss"), loss_curve=json.loads(data.get("loss_curve") or "[]"),
            result=json.loads(data.get("result") or "{}"),
            steps_since=num("steps_since"), steps_from=int(data.get("steps_from") or 0),
        )


@dataclass
class QueueFigures:
    """What /metrics shows of the queue: counters, running jobs, waiting jobs per queue/priority and model."""

    stats: dict[str, str]
    running: int
    depth: dict[tuple[str, str], int]
    model_depth: dict[tuple[str, str], int]


class EventSubscription:
    """The pattern subscription to every task's events (one per API process, see api/waiter.py)."""

    def __init__(self, client: redis.Redis):
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)

    def start(self, timeout: float) -> None:
        """Subscribe and wait (up to `timeout` s) for Redis to confirm it."""
        self._pubsub.psubscribe(keys.EVENTS("*"))
        self._pubsub.get_message(timeout=timeout)

    def next_event(self, timeout: float) -> tuple[str, str] | None:
        """(task id, event kind) of the next task with news, or None after `timeout` s without any."""
        message = self._pubsub.get_message(timeout=timeout)
        if message and message.get("type") == "pmessage":
            return message["channel"][len(keys.EVENTS.prefix()):], message["data"]
        return None

    def close(self) -> None:
        self._pubsub.close()


def idempotency_key_name(owner: str, key: str) -> str:
    """The Redis key of an owner's Idempotency-Key (hashed: a client's header may be 255 characters of anything)."""
    return keys.IDEMPOTENCY(owner, hashlib.sha256(key.encode()).hexdigest())


class TaskStore:
    """All reads and writes of task state go through here."""

    def __init__(self, client: redis.Redis, retention_seconds: int):
        self.client = client
        self.retention = int(retention_seconds)
        self._local = threading.local()
        self._create = LuaScript(client, "create")
        self._pick = LuaScript(client, "pick")
        self._finish = LuaScript(client, "finish")
        self._cancel = LuaScript(client, "cancel")
        self._requeue = LuaScript(client, "requeue")
        self._update = LuaScript(client, "update")
        self._progress = LuaScript(client, "progress")

    # --- API side -------------------------------------------------------
    def create(self, task_id: str, owner: str, spec: JobSpec, queue: str, message: BrokerMessage | None = None,
               max_pending: int = 0, max_pending_owner: int = 0) -> bool:
        """Write a new pending task, index it and (if given) enqueue its message, atomically.

        One Lua call: the hit path of every submission, so its fields travel
        as one JSON argument rather than dozens of separately packed ones.
        False (and nothing written or sent) when the task id exists already:
        client-chosen ids (SD on EKS's id_task) are idempotency keys. Raises
        QueueFull (nothing written) when `queue` already holds `max_pending`
        waiting jobs, or the owner `max_pending_owner` (0: no limit).
        """
        now = time.time()
        stamp = repr(now)
        fields = {"id": task_id, "status": "pending", "owner": owner, "spec": spec.to_json(), "queue": queue,
                  "model": spec.model, "priority": spec.priority, "attempt": "0", "created_at": stamp,
                  "updated_at": stamp, "batch": spec.batch_key(), "images": spec.num_images}
        if spec.time_limit:
            fields["time_limit"] = spec.time_limit      # the reaper's limit for this job (RunningJob.time_limit)
        if spec.max_attempts:
            fields["max_attempts"] = spec.max_attempts  # and its own attempts (RunningJob.max_attempts)
        outcome = self._evalsha_direct(
            self._create,
            [keys.TASK(task_id), keys.OWNER_TASKS(owner), message.list_key if message else "", keys.PENDING(queue),
             keys.PENDING_MODEL(queue, spec.model), keys.PENDING_OWNER(owner), keys.STATS(), keys.PENDING_INDEXES(),
             keys.EVENTS(task_id), keys.EVENT_LOG(task_id)],
            [task_id, stamp, self.retention, message.payload if message else "", orjson.dumps(fields),
             pending_score(spec.priority, now), max_pending, max_pending_owner])
        if outcome[0] == "queue_full":
            raise QueueFull(outcome[1], max_pending)
        if outcome[0] == "owner_full":
            raise QueueFull(outcome[1], max_pending_owner, per_key=True)
        return outcome[0] == "created"

    def _evalsha_direct(self, script: LuaScript, script_keys: list, args: list) -> Any:
        """EVALSHA on this thread's own connection, without redis-py's per-command layers.

        Why: this is the submission hot path, and the client's layers (pool
        checkout with a readiness poll, retry and metrics wrappers) cost more
        CPU than the round trip itself. A stale connection (Redis restarted)
        is reopened and the call retried once; a flushed script cache is
        reloaded. Retrying is safe: the create script never overwrites an
        existing task.
        """
        script.check_keys(script_keys)
        registered = script.registered
        for attempt in (1, 2):
            conn = self._thread_connection()
            try:
                conn.send_command("EVALSHA", registered.sha, len(script_keys), *script_keys, *args)
                try:
                    return conn.read_response()
                except NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", registered.script)
                    conn.read_response()
                    conn.send_command("EVALSHA", registered.sha, len(script_keys), *script_keys, *args)
                    return conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                conn.disconnect()
                if attempt == 2:
                    raise

    def _thread_connection(self) -> redis.Connection:
        """One connection per API thread, made with the pool's settings, kept across requests."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.client.connection_pool.connection_class(
                **self.client.connection_pool.connection_kwargs)
        return conn

    def get(self, task_id: str) -> Task:
        data = self.client.hgetall(keys.TASK(task_id))
        if not data:
            raise TaskNotFound(task_id)
        return Task.from_hash(data)

    def get_owned(self, task_id: str, owner: str) -> Task:
        """The task if `owner` created it; anyone else is told it does not exist."""
        task = self.get(task_id)
        if task.owner != owner:
            raise TaskNotFound(task_id)
        return task

    def exists(self, task_id: str) -> bool:
        return bool(self.client.exists(keys.TASK(task_id)))

    def owner_of(self, task_id: str) -> str | None:
        """The owner of a task, None if there is no such task (cheaper than get)."""
        return self.client.hget(keys.TASK(task_id), "owner")

    def pending_count(self, queue: str) -> int:
        """Jobs waiting in `queue` (not yet claimed by a worker)."""
        return self.client.zcard(keys.PENDING(queue))

    def oldest_pending(self, queue: str, count: int) -> list[str]:
        """The first `count` waiting jobs of `queue`, in the order workers take them."""
        return self.client.zrange(keys.PENDING(queue), 0, count - 1)

    def queue_position(self, task: Task) -> int | None:
        """1-based place among pending tasks of its queue, or None."""
        if task.status is not TaskStatus.PENDING:
            return None
        rank = self.client.zrank(keys.PENDING(task.queue), task.id)
        return None if rank is None else rank + 1

    def list_owned(self, owner: str, offset: int, limit: int,
                   status: TaskStatus | None = None) -> tuple[list[Task], int]:
        """An owner's tasks, newest first; expired ones are dropped from the index."""
        key = keys.OWNER_TASKS(owner)
        self.client.zremrangebyscore(key, "-inf", time.time() - self.retention)
        if status is None:
            ids = self.client.zrevrange(key, offset, offset + limit - 1)
            tasks = self._load_many(key, ids)
            return tasks, self.client.zcard(key)
        newest = self.client.zrevrange(key, 0, STATUS_SCAN_LIMIT - 1)
        matching = [t for t in self._load_many(key, newest) if t.status is status]
        return matching[offset:offset + limit], len(matching)

    def index_training(self, owner: str, task_id: str) -> None:
        """List a training job among its owner's trainings (they expire with their task hashes)."""
        self.client.zadd(keys.TRAININGS(owner), {task_id: time.time()})

    def list_trainings(self, owner: str, offset: int, limit: int) -> tuple[list[Task], int]:
        """An owner's training jobs, newest first; expired ones are dropped from the index."""
        return self._list_index(keys.TRAININGS(owner), offset, limit)

    def index_merge(self, owner: str, task_id: str) -> None:
        """List a model merge among its owner's merges (they expire with their task hashes)."""
        self.client.zadd(keys.MERGES(owner), {task_id: time.time()})

    def list_merges(self, owner: str, offset: int, limit: int) -> tuple[list[Task], int]:
        """An owner's model merges, newest first; expired ones are dropped from the index."""
        return self._list_index(keys.MERGES(owner), offset, limit)

    def _list_index(self, key: str, offset: int, limit: int) -> tuple[list[Task], int]:
        """A page of an owner's index of tasks (newest first) and its size, expired entries dropped first."""
        self.client.zremrangebyscore(key, "-inf", time.time() - self.retention)
        tasks = self._load_many(key, self.client.zrevrange(key, offset, offset + limit - 1))
        return tasks, self.client.zcard(key)

    def _load_many(self, index_key: str, ids: Iterable[str]) -> list[Task]:
        ids = list(ids)
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(keys.TASK(task_id))
        tasks, gone = [], []
        for task_id, data in zip(ids, pipe.execute()):
            try:
                tasks.append(Task.from_hash(data))
            except TaskNotFound:
                gone.append(task_id)
        if gone:
            self.client.zrem(index_key, *gone)
        return tasks

    def request_cancel(self, task: Task) -> CancelOutcome:
        """Cancel a waiting task now, or flag a running one to stop at its next step."""
        outcome = self._cancel(
            [keys.TASK(task.id), keys.RUNNING(), keys.PENDING(task.queue), keys.PENDING_MODEL(task.queue, task.spec.model),
             keys.PENDING_OWNER(task.owner), keys.STATS(), keys.EVENTS(task.id), keys.CALLBACK_OUTBOX(),
             keys.EVENT_LOG(task.id), keys.PREVIEW(task.id)],
            [task.id, repr(time.time()), self.retention])
        return CancelOutcome(outcome)

    def events_after(self, task_id: str, after: str | None, count: int = 200) -> list[TaskEvent]:
        """A task's recorded events after the one with id `after` (all of them when None), oldest first."""
        start = "-" if after is None else "(" + after
        return [TaskEvent(event_id, fields.pop("event", ""), fields)
                for event_id, fields in self.client.xrange(keys.EVENT_LOG(task_id), start, "+", count=count)]

    def last_event(self, task_id: str) -> TaskEvent | None:
        """A task's newest recorded event (its final one once it ended), None if it has none."""
        newest = self.client.xrevrange(keys.EVENT_LOG(task_id), "+", "-", count=1)
        return TaskEvent(newest[0][0], newest[0][1].pop("event", ""), newest[0][1]) if newest else None

    def preview(self, task_id: str) -> Preview | None:
        """A running task's newest preview, None when it has none (not asked for, none yet, or it ended)."""
        raw = self.client.get(keys.PREVIEW(task_id))
        if not raw:
            return None
        data = orjson.loads(raw)
        return Preview(int(data["step"]), int(data["total"]), data["image"], int(data["width"]), int(data["height"]))

    def watch_events(self) -> EventSubscription:
        """A new subscription to every task's status changes."""
        return EventSubscription(self.client)

    def queue_figures(self, queues: Iterable[str]) -> QueueFigures:
        """Counters and queue depths for /metrics: `queues` plus every queue that has a waiting index."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(keys.STATS())
        pipe.zcard(keys.RUNNING())
        stats, running = pipe.execute()
        queue_names, model_keys = self._waiting_indexes(set(queues))
        pipe = self.client.pipeline(transaction=False)
        ranges = priority_score_ranges()
        for queue in queue_names:
            for _, low, high in ranges:
                pipe.zcount(keys.PENDING(queue), low, high)
        for queue, model in model_keys:
            pipe.zcard(keys.PENDING_MODEL(queue, model))
        counts = iter(pipe.execute())
        depth = {(queue, priority): next(counts) for queue in queue_names for priority in PRIORITIES}
        model_depth = {(queue, model): next(counts) for queue, model in model_keys}
        return QueueFigures(stats, running, depth, model_depth)

    def _waiting_indexes(self, queues: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Queue names (given ones plus those with a pending index) and (queue, model) per-model indexes,
        from the registry the create and requeue steps write (no keyspace scan); emptied indexes pruned."""
        prefix = keys.PENDING.prefix()
        infix = keys.PENDING_MODEL.prefix("")[len(prefix):]
        names = sorted(self.client.smembers(keys.PENDING_INDEXES()))[:MAX_SCANNED_KEYS]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        gone = [name for name, alive in zip(names, pipe.execute()) if not alive]
        if gone:   # a create may re-add one at any time: it records the name again
            self.client.srem(keys.PENDING_INDEXES(), *gone)
        model_keys = []
        for name in names:
            if name in gone:
                continue
            queue, found, model = name[len(prefix):].partition(infix)
            if found:
                model_keys.append((queue, model))
            else:
                queues.add(queue)
        return sorted(queues), sorted(model_keys)

    # --- worker side ----------------------------------------------------
    def pick(self, queue: str, worker: str, held: list[str], capacity: int, affinity_wait: float | None,
             delivery: str = "", scan_limit: int = 200, max_images: int = 1) -> Picked | NoPick:
        """Take the best pending job of `queue` for this worker, or say why none.

        In priority order, then arrival: the first job that is either for a
        model this worker holds warm (`held`, least recently used first), or
        that this worker may load: no other live worker of the queue holds its
        model, or it has waited `affinity_wait` seconds for one (so two workers
        never trade models back and forth). None: affinity off (plain priority
        + arrival order). The worker's heartbeat is updated with the models it
        will hold (`capacity` at most) in the same call. `delivery` (Celery's
        message id, kept across its retries) makes a repeated call return the
        job it took the first time, so a lost reply or a retried delivery never
        leaves a job claimed by nobody. `max_images` > 1: also take waiting
        jobs of the same model that can share the picked job's pipeline call
        (the same JobSpec.batch_key), in the same order, while their images
        fit (`Picked.companions`).
        """
        wait_ms = -1 if affinity_wait is None else int(affinity_wait * 1000)
        script_keys = [keys.PENDING(queue), queue, keys.DELIVERY(delivery or uuid.uuid4().hex),
                       keys.PENDING_MODEL.prefix(queue), keys.TASK.prefix(), keys.WORKER.prefix(), keys.WORKERS(),
                       keys.PENDING_OWNER.prefix(), keys.RUNNING(), keys.EVENTS.prefix(), keys.EVENT_LOG.prefix()]
        args = [worker, repr(time.time()), json.dumps(held), wait_ms, queue, scan_limit, capacity, DELIVERY_TTL,
                SCORE_EPOCH, PRIORITY_SPAN, max_images, self.retention]
        for _ in range(8):
            task_id, detail, *rest = self._pick(script_keys, args)
            if task_id:
                companions = tuple(Claim(rest[i], int(rest[i + 1])) for i in range(1, len(rest) - 1, 2))
                return Picked(task_id, int(detail), rest[0] if rest else "", companions)
            if detail != "retry":   # 'retry': a stale index entry was dropped; look again
                return NoPick(detail)
        return NoPick.WAIT

    def report_progress(self, task_id: str, attempt: int, worker: str, step: int, total: int,
                        preview: Preview | None = None, loss: float | None = None,
                        loss_curve: list | None = None) -> Progressed | None:
        """Record a running job's progress (its newest preview; a training job's loss and loss curve); None
        (nothing written) once it ended or another attempt or worker holds it."""
        written, *eta = self._progress(
            [keys.TASK(task_id), keys.EVENTS(task_id), keys.EVENT_LOG(task_id), keys.PREVIEW(task_id)],
            [attempt, worker, step, total, repr(time.time()), self.retention,
             orjson.dumps(preview.to_dict()) if preview else "", preview.step if preview else 0,
             repr(loss) if loss is not None else "", orjson.dumps(loss_curve).decode() if loss_curve else ""])
        return Progressed(eta[0] if eta else "") if written else None

    def check_still_mine(self, task_id: str, attempt: int, worker: str) -> None:
        """Raise JobCancelled or StaleAttempt when this run must stop."""
        problem = self.still_mine([Claim(task_id, attempt)], worker)[0]
        if problem is not None:
            raise problem

    def still_mine(self, claims: list[Claim], worker: str) -> list[StaleAttempt | JobCancelled | None]:
        """Why each claimed run must stop (another attempt or worker holds it, or it was cancelled), else None.

        One round trip for all of them (the batch path and worker/watch.py ask for several at once).
        """
        pipe = self.client.pipeline(transaction=False)
        for claim in claims:
            pipe.hmget(keys.TASK(claim.task_id), "cancel_requested", "attempt", "worker")
        problems: list[StaleAttempt | JobCancelled | None] = []
        for claim, (cancel, current, holder) in zip(claims, pipe.execute()):
            if current is None or int(current) != claim.attempt or holder != worker:
                problems.append(StaleAttempt(claim.task_id))
            else:
                problems.append(JobCancelled(claim.task_id) if cancel == "1" else None)
        return problems

    def finish(self, task_id: str, attempt: int, worker: str, status: TaskStatus, **fields: Any) -> bool:
        """Move a claimed task to a terminal status; False if this delivery no longer owns it."""
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, value if isinstance(value, str) else json.dumps(value)]
        return bool(self._finish([keys.TASK(task_id), keys.RUNNING(), keys.STATS(), keys.EVENTS(task_id),
                                  keys.CALLBACK_OUTBOX(), keys.EVENT_LOG(task_id), keys.PREVIEW(task_id)],
                                 [attempt, worker, repr(time.time()), status.value, self.retention, task_id, *pairs]))

    def set_fields(self, task_id: str, **fields: str) -> None:
        """Side information that is not a transition (e.g. webhook delivery state)."""
        self._update([keys.TASK(task_id)], [item for pair in fields.items() for item in pair])

    def claim_idempotency(self, owner: str, key: str, task_id: str, fingerprint: str,
                          ttl: int = IDEMPOTENCY_SECONDS) -> tuple[str, str] | None:
        """Bind an owner's Idempotency-Key to `task_id` (and the body's fingerprint) for `ttl` seconds.

        None: this submission is the first and goes on. Else (task id, fingerprint) of the submission the
        key already belongs to: a retry gets that task back (and a different body with the same key a 422).
        """
        name = idempotency_key_name(owner, key)
        if self.client.set(name, f"{task_id} {fingerprint}", nx=True, ex=ttl):
            return None
        first, _, seen = (self.client.get(name) or "").partition(" ")
        return (first, seen) if first else None

    def release_idempotency(self, owner: str, key: str) -> None:
        """The submission that claimed the key was refused: the key is free for its retry."""
        self.client.delete(idempotency_key_name(owner, key))

    def callback_handed_over(self, task_id: str) -> None:
        """Celery holds the task's webhook now: out of the outbox."""
        self.client.zrem(keys.CALLBACK_OUTBOX(), task_id)

    def owed_callbacks(self, ended_before: float, limit: int = 100) -> list[str]:
        """Tasks that ended before `ended_before` and whose webhook was never handed to Celery."""
        return self.client.zrangebyscore(keys.CALLBACK_OUTBOX(), "-inf", repr(ended_before), start=0, num=limit)

    def reserve_numbers(self, folder: str, count: int) -> int:
        """The first of `count` consecutive numbers for files in `folder` (A1111's NNNNN), unique across hosts."""
        return self.client.incrby(keys.SEQUENCE(folder), count) - count

    # --- reaper ---------------------------------------------------------
    _RUNNING_FIELDS = ("status", "worker", "attempt", "queue", "model", "owner", "priority", "started_at",
                       "time_limit", "max_attempts")

    def running(self, task_ids: list[str] | None = None) -> list[RunningJob]:
        """Every processing task (or those of `task_ids` that are); entries of tasks that are no longer
        processing are dropped from the running index."""
        ids = self.client.zrange(keys.RUNNING(), 0, -1) if task_ids is None else task_ids
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(keys.TASK(task_id), *self._RUNNING_FIELDS)
        out, gone = [], []
        for task_id, (status, worker, attempt, queue, model, owner, priority, started, limit, attempts) in zip(
                ids, pipe.execute()):
            if status != TaskStatus.PROCESSING.value:
                gone.append(task_id)
                continue
            out.append(RunningJob(task_id, worker or "", int(attempt or 0), queue or "", model, owner, priority or "",
                                  float(started or 0), float(limit or 0), int(attempts or 0)))
        if gone:
            self.client.zrem(keys.RUNNING(), *gone)
        return out

    def requeue(self, job: RunningJob, message: BrokerMessage, max_attempts: int, give_up: str = "") -> Requeue:
        """Take a job from its worker (dead, hung, or no longer running it) and put `message` (the next attempt)
        first in its queue.

        Failed instead when it has killed `max_attempts` workers, or with
        `give_up` as its error when set (it ran past its time limit); cancelled
        if the client cancelled it while it ran; nothing if another reaper got
        there first or the job ended meanwhile.
        """
        outcome, *attempt = self._requeue(
            [keys.TASK(job.task_id), keys.RUNNING(), message.list_key, keys.PENDING(job.queue),
             "" if job.model is None else keys.PENDING_MODEL(job.queue, job.model),
             "" if job.owner is None else keys.PENDING_OWNER(job.owner), keys.STATS(), keys.EVENTS(job.task_id),
             keys.CALLBACK_OUTBOX(), keys.PENDING_INDEXES(), keys.EVENT_LOG(job.task_id), keys.PREVIEW(job.task_id)],
            [job.task_id, job.worker, job.attempt, repr(time.time()), max_attempts, self.retention, message.payload,
             front_score(job.priority), give_up])
        return Requeue(RequeueOutcome(outcome), int(attempt[0]) if attempt else 0)

    def take_reaper_turn(self, me: str, seconds: float) -> bool:
        """True if this worker runs the reaper pass now (one reaper at a time, for `seconds`)."""
        return bool(self.client.set(keys.REAPER_LOCK(), me, nx=True, px=int(seconds * 1000)))

    def queued_deliveries(self, queue: str) -> int:
        """Celery messages waiting on `queue`'s broker list."""
        return self.client.llen(queue)

    def record_deficit(self, queue: str, missing: int) -> int:
        """Remember how many deliveries `queue` lacks now; returns what the previous pass saw."""
        return int(self.client.set(keys.DEFICIT(queue), missing, ex=DEFICIT_TTL, get=True) or 0)

    def push_delivery(self, message: BrokerMessage) -> None:
        """Add a Celery message at the back of its queue (consumers take from the other end)."""
        self.client.lpush(message.list_key, message.payload)
