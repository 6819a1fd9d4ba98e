"""Task state: one Redis hash per task, moved forward by atomic Lua scripts.

Why Lua: a task is touched by the API (create, cancel), by whichever worker
holds the current delivery (claim, progress, finish) and by the reaper that
rescues jobs of dead workers. Each transition checks and writes in one
script, so a completed task never returns to processing and a stale
delivery (an older `attempt`) can never overwrite the result of a newer one.

Keys (prefix `sdq:`):
  task:{id}          hash: status, owner, spec, attempt, worker, timestamps,
                     progress, result keys, seeds, error, cancel flag
  pending:{queue}    zset: tasks waiting in a queue (pool), in the order workers take them:
                     score = priority rank * 1e15 + µs since 2020 (see pending_score)
  pending:{queue}:m:{model}  the same, per model (a worker's "own" jobs: model affinity)
  pending-owner:{owner}      an API key's waiting tasks (per-key backpressure)
  running            zset: tasks being processed (score: claim time)
  stats:jobs         hash: counters submitted, completed, failed, cancelled, requeued
  owner:{owner}      zset: an owner's tasks (score: creation time)
  worker:{id}        heartbeat key of a live worker process (see workers.py)
Channel `sdq:events:{id}` carries each new status, for waiters.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable

import orjson
import redis
from redis.commands.core import Script
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from common.errors import JobCancelled, QueueFull, StaleAttempt, TaskNotFound
from common.jobspec import JobSpec
from common.queue import BrokerMessage

PREFIX = "sdq:"
REDIS_SOCKET_TIMEOUT = 10.0   # longer than any command here takes; a dead peer cannot hang a thread
REDIS_RETRIES = 6             # ~5 s of exponential backoff before an error reaches the caller
WORKER_KEY_PREFIX = PREFIX + "worker:"


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


TERMINAL = tuple(s.value for s in TaskStatus if s.terminal)


def task_key(task_id: str) -> str:
    return f"{PREFIX}task:{task_id}"


EVENTS_PREFIX = f"{PREFIX}events:"
EVENTS_PATTERN = EVENTS_PREFIX + "*"


def task_id_of_channel(channel: str) -> str:
    return channel[len(EVENTS_PREFIX):]


def events_channel(task_id: str) -> str:
    return f"{PREFIX}events:{task_id}"


def pending_key(queue: str) -> str:
    return f"{PREFIX}pending:{queue}"


RUNNING_KEY = PREFIX + "running"
STATS_KEY = PREFIX + "stats:jobs"
DELIVERY_TTL = 24 * 3600   # how long a delivery remembers the job it took (beyond any job time limit)


def pending_owner_key(owner: str) -> str:
    return f"{PREFIX}pending-owner:{owner}"


def pending_model_key(queue: str, model: str) -> str:
    return f"{pending_key(queue)}:m:{model}"


def owner_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}"


def redis_client(url: str) -> redis.Redis:
    """A client that rides out short Redis blips and never hangs forever.

    Every script here is safe to retry after a lost reply (create refuses to
    overwrite, claim accepts its own worker, finish accepts its own result).
    """
    return redis.Redis.from_url(
        url, decode_responses=True, socket_timeout=REDIS_SOCKET_TIMEOUT, socket_connect_timeout=5,
        health_check_interval=30, retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), REDIS_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


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
        )


# Pending work is ordered by one score: priority class first, then enqueue time.
PRIORITIES = ("high", "normal", "low")
SCORE_EPOCH = 1577836800   # 2020-01-01: enqueue times are µs since then, < PRIORITY_SPAN until 2051
PRIORITY_SPAN = 10 ** 15   # score = rank * PRIORITY_SPAN + enqueue µs; at most 3e15, exact in a double


def pending_score(priority: str, enqueued_at: float) -> int:
    return PRIORITIES.index(priority) * PRIORITY_SPAN + int((enqueued_at - SCORE_EPOCH) * 1e6)


def priority_score_ranges() -> list[tuple[str, str, str]]:
    """(priority, min, max) ZCOUNT bounds of each class in a pending:{queue} zset; the outer classes are open-ended."""
    last = len(PRIORITIES) - 1
    return [(p, "-inf" if rank == 0 else str(rank * PRIORITY_SPAN),
             "+inf" if rank == last else f"({(rank + 1) * PRIORITY_SPAN}") for rank, p in enumerate(PRIORITIES)]


# Taking a task off every pending index and onto `running`, shared by claim and pick.
_TAKE = """
local function take(key, id, worker, now)
  local model, owner, queue = unpack(redis.call('HMGET', key, 'model', 'owner', 'queue'))
  redis.call('HSET', key, 'status', 'processing', 'worker', worker, 'started_at', now, 'updated_at', now,
             'progress_step', 0)
  unindex(id, queue, model, owner)
  redis.call('ZADD', 'sdq:running', now, id)
  redis.call('PUBLISH', 'sdq:events:' .. id, 'processing')
end
"""

_UNINDEX = """
local function unindex(id, queue, model, owner)
  if queue then
    redis.call('ZREM', 'sdq:pending:' .. queue, id)
    if model then redis.call('ZREM', 'sdq:pending:' .. queue .. ':m:' .. model, id) end
  end
  if owner then redis.call('ZREM', 'sdq:pending-owner:' .. owner, id) end
end
local function index(id, queue, model, owner, score, now, retention)
  redis.call('ZADD', 'sdq:pending:' .. queue, score, id)
  if model then redis.call('ZADD', 'sdq:pending:' .. queue .. ':m:' .. model, score, id) end
  if owner then   -- scored by time, so entries of tasks that expired while waiting can be pruned
    redis.call('ZADD', 'sdq:pending-owner:' .. owner, now, id)
    redis.call('EXPIRE', 'sdq:pending-owner:' .. owner, retention)
  end
end
"""

# KEYS: task, owner index, broker list (or '').
# ARGV: id, now, retention, message (or ''), fields as JSON, score, max pending in queue, max pending of owner
# Returns {1} written, {0} exists, {-1, n} queue full, {-2, n} owner over its limit.
_CREATE = _UNINDEX + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local fields = cjson.decode(ARGV[5])
local waiting = redis.call('ZCARD', 'sdq:pending:' .. fields.queue)
if tonumber(ARGV[7]) > 0 and waiting >= tonumber(ARGV[7]) then return {-1, waiting} end
redis.call('ZREMRANGEBYSCORE', 'sdq:pending-owner:' .. fields.owner, '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
local mine = redis.call('ZCARD', 'sdq:pending-owner:' .. fields.owner)
if tonumber(ARGV[8]) > 0 and mine >= tonumber(ARGV[8]) then return {-2, mine} end
local flat = {}
for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = v end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('EXPIRE', KEYS[1], ARGV[3])
index(ARGV[1], fields.queue, fields.model, fields.owner, ARGV[6], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HINCRBY', 'sdq:stats:jobs', 'submitted', 1)
if ARGV[4] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[4]) end
return {1}
"""

# KEYS: task.  ARGV: attempt, worker, now, worker-key prefix
_CLAIM = _UNINDEX + _TAKE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'completed' or st == 'failed' or st == 'cancelled' then return 'terminal' end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 'stale' end
if st == 'processing' then
  local w = redis.call('HGET', KEYS[1], 'worker')
  if w and w ~= '' and w ~= ARGV[2] and redis.call('EXISTS', ARGV[4] .. w) == 1 then return 'busy' end
end
take(KEYS[1], redis.call('HGET', KEYS[1], 'id'), ARGV[2], ARGV[3])
return 'ok'
"""

# The scheduler: a worker that received a delivery takes the best pending job *for it*.
# KEYS: pending:{queue}, the queue's broker list, delivery:{token}.  ARGV: worker, now (s), models it holds,
# least recently used first (JSON list), affinity wait (ms; -1: affinity off), queue, scan limit, models it
# can hold, delivery token ttl (s).
# Returns {id, attempt, model}, or {'', why}: 'empty' (nothing waits, or enough other deliveries are queued
# for what waits: this one is surplus), 'wait' (only jobs for models other live workers hold, not waited
# long enough yet), 'retry' (dropped a stale entry).
# The same delivery (token) asking again (a lost reply, a Celery retry) gets the job it took before.
_PICK = _UNINDEX + _TAKE + """
local me, queue, wait = ARGV[1], ARGV[5], tonumber(ARGV[4])
local before = redis.call('GET', KEYS[3])
if before then
  local st, worker, attempt, model = unpack(redis.call('HMGET', 'sdq:task:' .. before, 'status', 'worker', 'attempt', 'model'))
  if st == 'processing' and worker == me then return {before, attempt, model or ''} end
end
local held = cjson.decode(ARGV[3])
local now_us = (tonumber(ARGV[2]) - 1577836800) * 1e6
-- My best own job: the head of the per-model queues of the models I hold warm.
local best, best_score = nil, nil
if wait >= 0 then
  for _, m in ipairs(held) do
    local head = redis.call('ZRANGE', KEYS[1] .. ':m:' .. m, 0, 0, 'WITHSCORES')
    if head[1] and (not best or tonumber(head[2]) < best_score) then best, best_score = head[1], tonumber(head[2]) end
  end
end
-- Jobs ahead of it (better priority class, or older): the first one I may take wins. A job is mine to
-- take when no other live worker of this queue holds its model, or when it has waited `wait` ms for one.
local bound = '+inf'
if best then bound = '(' .. string.format('%.0f', best_score) end
local entries = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', bound, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[6]))
local pick = nil
if #entries > 0 then
  local holders = {}
  if wait > 0 then
    for _, wid in ipairs(redis.call('ZRANGE', 'sdq:workers', 0, -1)) do
      local raw = wid ~= me and redis.call('GET', 'sdq:worker:' .. wid)
      if raw then
        local ok, info = pcall(cjson.decode, raw)
        if ok and type(info) == 'table' and type(info.queues) == 'table' and type(info.models) == 'table' then
          for _, q in ipairs(info.queues) do
            if q == queue then for _, m in ipairs(info.models) do holders[m] = true end end
          end
        end
      end
    end
  end
  for i = 1, #entries, 2 do
    local model = redis.call('HGET', 'sdq:task:' .. entries[i], 'model')
    local waited_ms = (now_us - (tonumber(entries[i + 1]) % 1e15)) / 1000
    if not model or not holders[model] or waited_ms >= wait then pick = entries[i]; break end
  end
end
pick = pick or best
if not pick then
  local waiting = redis.call('ZCARD', KEYS[1])
  if waiting > 0 and redis.call('LLEN', KEYS[2]) < waiting then return {'', 'wait'} end
  return {'', 'empty'}
end
local key = 'sdq:task:' .. pick
local st, worker, attempt, model, owner = unpack(redis.call('HMGET', key, 'status', 'worker', 'attempt', 'model', 'owner'))
if st ~= 'pending' and not (st == 'processing' and (not worker or worker == '')) then
  -- expired or already taken: a stale entry, dropped from every index it may be in
  unindex(pick, queue, model or nil, owner or nil)
  for _, m in ipairs(held) do redis.call('ZREM', KEYS[1] .. ':m:' .. m, pick) end
  return {'', 'retry'}
end
take(key, pick, me, ARGV[2])
redis.call('HINCRBY', key, 'runs', 1)
redis.call('SET', KEYS[3], pick, 'EX', ARGV[8])
-- Say at once which models I will hold, so no other worker picks my next jobs before my heartbeat does.
local raw = model and redis.call('GET', 'sdq:worker:' .. me)
if raw then
  local ok, info = pcall(cjson.decode, raw)
  if ok and type(info) == 'table' then
    local models = {}
    for _, m in ipairs(held) do if m ~= model then models[#models + 1] = m end end
    models[#models + 1] = model
    while #models > tonumber(ARGV[7]) do table.remove(models, 1) end
    info.models = models
    redis.call('SET', 'sdq:worker:' .. me, cjson.encode(info), 'KEEPTTL')
  end
end
return {pick, attempt, model or ''}
"""

# KEYS: task, running.  ARGV: attempt, worker, now, status, retention, field/value pairs...
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then return 0 end
if st == ARGV[4] then return 1 end  -- a retry after a lost reply: already done
if st ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'updated_at', ARGV[3], 'finished_at', ARGV[3])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', KEYS[2], id)
redis.call('HINCRBY', 'sdq:stats:jobs', ARGV[4], 1)
redis.call('PUBLISH', 'sdq:events:' .. id, ARGV[4])
return 1
"""

# KEYS: task.  ARGV: now, retention
_CANCEL = _UNINDEX + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
local holder = redis.call('HGET', KEYS[1], 'worker')
if st == 'pending' or (st == 'processing' and (not holder or holder == '')) then   -- waiting, or requeued
  local id, queue, model, owner = unpack(redis.call('HMGET', KEYS[1], 'id', 'queue', 'model', 'owner'))
  redis.call('ZREM', 'sdq:running', id)
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'updated_at', ARGV[1], 'finished_at', ARGV[1],
             'error', 'cancelled by client')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  unindex(id, queue, model or nil, owner or nil)
  redis.call('HINCRBY', 'sdq:stats:jobs', 'cancelled', 1)
  redis.call('PUBLISH', 'sdq:events:' .. id, 'cancelled')
  return 'cancelled'
end
if st == 'processing' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
  return 'cancelling'
end
return st
"""

# KEYS: task, running, broker list.  ARGV: dead worker, attempt, now, max attempts, retention, message
_REQUEUE = _UNINDEX + """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return -1 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return -1 end
local id, queue, model, owner, priority = unpack(redis.call('HMGET', KEYS[1], 'id', 'queue', 'model', 'owner', 'priority'))
redis.call('ZREM', KEYS[2], id)
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then   -- the client cancelled it while it ran
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'updated_at', ARGV[3], 'finished_at', ARGV[3],
             'error', 'cancelled by client')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('HINCRBY', 'sdq:stats:jobs', 'cancelled', 1)
  redis.call('PUBLISH', 'sdq:events:' .. id, 'cancelled')
  return -2
end
if tonumber(ARGV[2]) + 1 >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'updated_at', ARGV[3], 'finished_at', ARGV[3],
             'error', 'the worker running this job died ' .. ARGV[4] .. ' times; giving up')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('HINCRBY', 'sdq:stats:jobs', 'failed', 1)
  redis.call('PUBLISH', 'sdq:events:' .. id, 'failed')
  return 0
end
local nxt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'worker', '', 'requeued_at', ARGV[3], 'updated_at', ARGV[3])
-- First in its priority class: the rescued job runs next.
local rank = ({high = 0, normal = 1, low = 2})[priority or 'normal'] or 1
index(id, queue, model or nil, owner or nil, string.format('%.0f', rank * 1e15), ARGV[3], ARGV[5])
redis.call('HINCRBY', 'sdq:stats:jobs', 'requeued', 1)
redis.call('RPUSH', KEYS[3], ARGV[6])  -- consumers BRPOP: a delivery for it comes next
return nxt
"""


# KEYS: task.  ARGV: field/value pairs.  Writes only if the task still exists.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# Listing with a status filter scans at most this many of an owner's newest tasks.
STATUS_SCAN_LIMIT = 2000


class TaskStore:
    """All reads and writes of task state go through here."""

    def __init__(self, client: redis.Redis, retention_seconds: int):
        self.redis = client
        self.retention = int(retention_seconds)
        self._create = client.register_script(_CREATE)
        self._local = threading.local()
        self._claim = client.register_script(_CLAIM)
        self._pick = client.register_script(_PICK)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._requeue = client.register_script(_REQUEUE)
        self._update = client.register_script(_UPDATE)

    @classmethod
    def from_url(cls, url: str, retention_seconds: int) -> "TaskStore":
        return cls(redis_client(url), retention_seconds)

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
                  "updated_at": stamp}
        outcome = self._evalsha_direct(
            self._create, [task_key(task_id), owner_key(owner), message.list_key if message else ""],
            [task_id, stamp, self.retention, message.payload if message else "", orjson.dumps(fields),
             pending_score(spec.priority, now), max_pending, max_pending_owner])
        if outcome[0] == -1:
            raise QueueFull(outcome[1], max_pending)
        if outcome[0] == -2:
            raise QueueFull(outcome[1], max_pending_owner, per_key=True)
        return outcome[0] == 1

    def _evalsha_direct(self, script: Script, keys: list, args: list) -> Any:
        """EVALSHA on this thread's own connection, without redis-py's per-command layers.

        Why: this is the submission hot path, and the client's layers (pool
        checkout with a readiness poll, retry and metrics wrappers) cost more
        CPU than the round trip itself. A stale connection (Redis restarted)
        is reopened and the call retried once; a flushed script cache is
        reloaded. Retrying is safe: the create script never overwrites an
        existing task.
        """
        for attempt in (1, 2):
            conn = self._thread_connection()
            try:
                conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                try:
                    return conn.read_response()
                except NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", script.script)
                    conn.read_response()
                    conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    return conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                conn.disconnect()
                if attempt == 2:
                    raise

    def _thread_connection(self) -> redis.Connection:
        """One connection per API thread, made with the pool's settings, kept across requests."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.redis.connection_pool.connection_class(
                **self.redis.connection_pool.connection_kwargs)
        return conn

    def get(self, task_id: str) -> Task:
        data = self.redis.hgetall(task_key(task_id))
        if not data:
            raise TaskNotFound(task_id)
        return Task.from_hash(data)

    def get_owned(self, task_id: str, owner: str) -> Task:
        """The task if `owner` created it; anyone else is told it does not exist."""
        task = self.get(task_id)
        if task.owner != owner:
            raise TaskNotFound(task_id)
        return task

    def pending_count(self, queue: str) -> int:
        """Jobs waiting in `queue` (not yet claimed by a worker)."""
        return self.redis.zcard(pending_key(queue))

    def oldest_pending(self, queue: str, count: int) -> list[str]:
        """The first `count` waiting jobs of `queue`, in the order workers take them."""
        return self.redis.zrange(pending_key(queue), 0, count - 1)

    def pending_by_priority(self, queue: str) -> dict[str, int]:
        """Waiting jobs of `queue` per priority class (one ZCOUNT each)."""
        pipe = self.redis.pipeline(transaction=False)
        for _, low, high in priority_score_ranges():
            pipe.zcount(pending_key(queue), low, high)
        return dict(zip(PRIORITIES, pipe.execute()))

    def queue_position(self, task: Task) -> int | None:
        """1-based place among pending tasks of its queue, or None."""
        if task.status is not TaskStatus.PENDING:
            return None
        rank = self.redis.zrank(pending_key(task.queue), task.id)
        return None if rank is None else rank + 1

    def list_owned(self, owner: str, offset: int, limit: int,
                   status: TaskStatus | None = None) -> tuple[list[Task], int]:
        """An owner's tasks, newest first; expired ones are dropped from the index."""
        key = owner_key(owner)
        self.redis.zremrangebyscore(key, "-inf", time.time() - self.retention)
        if status is None:
            ids = self.redis.zrevrange(key, offset, offset + limit - 1)
            tasks = self._load_many(key, ids)
            return tasks, self.redis.zcard(key)
        newest = self.redis.zrevrange(key, 0, STATUS_SCAN_LIMIT - 1)
        matching = [t for t in self._load_many(key, newest) if t.status is status]
        return matching[offset:offset + limit], len(matching)

    def _load_many(self, index_key: str, ids: Iterable[str]) -> list[Task]:
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(task_key(task_id))
        tasks, gone = [], []
        for task_id, data in zip(ids, pipe.execute()):
            try:
                tasks.append(Task.from_hash(data))
            except TaskNotFound:
                gone.append(task_id)
        if gone:
            self.redis.zrem(index_key, *gone)
        return tasks

    def request_cancel(self, task_id: str) -> str:
        """'cancelled' (was pending), 'cancelling' (running: stops at next step) or the final status."""
        return self._cancel(keys=[task_key(task_id)], args=[repr(time.time()), self.retention])

    # --- worker side ----------------------------------------------------
    def claim(self, task_id: str, attempt: int, worker: str) -> str:
        """Take this very job: 'ok', or why not ('terminal', 'stale', 'busy', 'missing')."""
        return self._claim(keys=[task_key(task_id)], args=[attempt, worker, repr(time.time()), WORKER_KEY_PREFIX])

    def pick(self, queue: str, worker: str, held: list[str], capacity: int, affinity_wait: float | None,
             delivery: str = "", scan_limit: int = 200) -> tuple[str, int, str] | str:
        """Take the best pending job of `queue` for this worker: (task id, attempt), or why none.

        In priority order, then arrival: the first job that is either for a
        model this worker holds warm (`held`, least recently used first), or
        that this worker may load: no other live worker of the queue holds its
        model, or it has waited `affinity_wait` seconds for one (so two workers
        never trade models back and forth). None: affinity off (plain priority
        + arrival order). The worker's heartbeat is updated with the models it
        will hold (`capacity` at most) in the same call. `delivery` (Celery's
        message id, kept across its retries) makes a repeated call return the
        job it took the first time, so a lost reply or a retried delivery never
        leaves a job claimed by nobody. Returns (task id, attempt, model).
        Returns 'empty' (nothing pending), 'wait' (only others' jobs, for now)
        or 'retry' (a stale index entry was dropped).
        """
        wait_ms = -1 if affinity_wait is None else int(affinity_wait * 1000)
        token = f"{PREFIX}delivery:{delivery or uuid.uuid4().hex}"
        for _ in range(8):
            task_id, detail, *model = self._pick(
                keys=[pending_key(queue), queue, token],
                args=[worker, repr(time.time()), json.dumps(held), wait_ms, queue, scan_limit, capacity,
                      DELIVERY_TTL])
            if task_id:
                return task_id, int(detail), model[0] if model else ""
            if detail != "retry":
                return detail
        return "wait"

    def report_progress(self, task_id: str, step: int, total: int) -> None:
        self._update(keys=[task_key(task_id)],
                     args=["progress_step", step, "progress_total", total, "updated_at", repr(time.time())])

    def check_still_mine(self, task_id: str, attempt: int, worker: str) -> None:
        """Raise JobCancelled or StaleAttempt when this run must stop."""
        cancel, current, holder = self.redis.hmget(task_key(task_id), "cancel_requested", "attempt", "worker")
        if current is None or int(current) != attempt or holder != worker:
            raise StaleAttempt(task_id)
        if cancel == "1":
            raise JobCancelled(task_id)

    def finish(self, task_id: str, attempt: int, worker: str, status: TaskStatus, **fields: Any) -> bool:
        """Move a claimed task to a terminal status; False if this delivery no longer owns it."""
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, value if isinstance(value, str) else json.dumps(value)]
        return bool(self._finish(keys=[task_key(task_id), RUNNING_KEY],
                                 args=[attempt, worker, repr(time.time()), status.value, self.retention, *pairs]))

    def set_fields(self, task_id: str, **fields: str) -> None:
        """Side information that is not a transition (e.g. webhook delivery state)."""
        self._update(keys=[task_key(task_id)], args=[item for pair in fields.items() for item in pair])

    # --- reaper ---------------------------------------------------------
    def running(self) -> list[tuple[str, str, int, str]]:
        """(task id, worker, attempt, queue) of every processing task."""
        ids = self.redis.zrange(RUNNING_KEY, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(task_key(task_id), "status", "worker", "attempt", "queue")
        out, gone = [], []
        for task_id, (status, worker, attempt, queue) in zip(ids, pipe.execute()):
            if status != TaskStatus.PROCESSING.value:
                gone.append(task_id)
                continue
            out.append((task_id, worker or "", int(attempt or 0), queue or ""))
        if gone:
            self.redis.zrem(RUNNING_KEY, *gone)
        return out

    def requeue(self, task_id: str, dead_worker: str, attempt: int, message: BrokerMessage,
                max_attempts: int) -> int | str | None:
        """Take a job from a dead worker and put `message` (the next attempt) first in its queue.

        Returns the new attempt, 0 if the job was failed for having killed
        `max_attempts` workers, "cancelled" if the client had cancelled it
        while it ran, or None if another reaper got there first.
        """
        nxt = self._requeue(keys=[task_key(task_id), RUNNING_KEY, message.list_key],
                            args=[dead_worker, attempt, repr(time.time()), max_attempts, self.retention,
                                  message.payload])
        nxt = int(nxt)
        return "cancelled" if nxt == -2 else None if nxt < 0 else nxt
