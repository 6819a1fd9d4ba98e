-- lib: functions shared by the scripts that `-- include: lib`.
-- Every function receives the keys it touches as arguments; the scripts get them through KEYS.

-- '' stands for "no such key" (KEYS cannot carry nil).
local function opt(key)
  if key == '' or key == false then return nil end
  return key
end

-- Drop a task from the waiting indexes it is in (nil keys are skipped).
local function unindex(id, pending, pending_model, pending_owner)
  if pending then
    redis.call('ZREM', pending, id)
    if pending_model then redis.call('ZREM', pending_model, id) end
  end
  if pending_owner then redis.call('ZREM', pending_owner, id) end
end

-- Put a task in the waiting indexes: by score in its queue and model, by time in its owner's; the queue and
-- model index names are recorded in `registry`.
local function index(id, score, now, retention, pending, pending_model, pending_owner, registry)
  redis.call('ZADD', pending, score, id)
  if pending_model then redis.call('ZADD', pending_model, score, id) end
  redis.call('SADD', registry, pending)      -- /metrics reads the index names here, never by SCAN
  if pending_model then redis.call('SADD', registry, pending_model) end
  if pending_owner then   -- scored by time, so entries of tasks that expired while waiting can be pruned
    redis.call('ZADD', pending_owner, now, id)
    redis.call('EXPIRE', pending_owner, retention)
  end
end

-- Record an event in a task's event log (what SSE streams read and resume from, by its ids) and announce
-- it on the task's channel (the API's waiters and streams listen). `...`: the event's field/value pairs.
local function announce(events, log, retention, kind, ...)
  redis.call('XADD', log, 'MAXLEN', '~', 200, '*', 'event', kind, ...)
  redis.call('EXPIRE', log, retention)
  redis.call('PUBLISH', events, kind)
end

-- Take a waiting task: processing for `worker`, off every waiting index, onto `running`, announced.
local function take(task, id, worker, now, retention, running, events, log, pending, pending_model, pending_owner)
  redis.call('HSET', task, 'status', 'processing', 'worker', worker, 'started_at', now, 'updated_at', now,
             'progress_step', 0)
  redis.call('HDEL', task, 'steps_since', 'steps_from')   -- the ETA of this attempt starts at its first step
  unindex(id, pending, pending_model, pending_owner)
  redis.call('ZADD', running, now, id)
  local attempt, model = unpack(redis.call('HMGET', task, 'attempt', 'model'))
  announce(events, log, retention, 'started', 'worker', worker, 'attempt', attempt or '0', 'model', model or '',
           'at', now)
  redis.call('HINCRBY', task, 'runs', 1)
end

-- A task a worker may take: waiting, or requeued (processing with no worker) after its worker died.
local function takeable(status, worker)
  return status == 'pending' or (status == 'processing' and (not worker or worker == ''))
end

-- The terminal step, written once: status and times, retention, off `running`, counted, announced. The
-- event log keeps only this final event (a stream that resumes later is sent the end), the preview goes.
local function conclude(task, id, status, now, retention, running, stats, events, outbox, log, preview)
  redis.call('HSET', task, 'status', status, 'updated_at', now, 'finished_at', now)
  redis.call('EXPIRE', task, retention)
  redis.call('ZREM', running, id)
  redis.call('HINCRBY', stats, status, 1)
  announce(events, log, retention, status, 'at', now)
  redis.call('XTRIM', log, 'MAXLEN', 1)
  redis.call('DEL', preview)
  -- The webhook is owed in the same step as the ending: a lost enqueue afterwards is resent from the outbox.
  local ok, spec = pcall(cjson.decode, redis.call('HGET', task, 'spec') or '{}')
  if ok and type(spec) == 'table' and type(spec['callback_url']) == 'string' and spec['callback_url'] ~= '' then
    redis.call('ZADD', outbox, now, id)
    redis.call('HSET', task, 'callback_status', 'queued')
  end
end
