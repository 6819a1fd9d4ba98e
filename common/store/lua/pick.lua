-- pick: the scheduler. A worker that received a delivery takes the best waiting job *for it*.
-- KEYS: pending, broker_list, delivery, pending_model_prefix, task_prefix, worker_prefix, workers,
--       pending_owner_prefix, running, events_prefix, log_prefix
-- A *_prefix is a key without its last part: the script appends the task id, model, owner or worker id
-- that it reads in Redis (what it will take is not known before it runs).
-- ARGV: worker, now (s), models it holds, least recently used first (JSON list), affinity wait (ms; -1: off),
--       queue, scan limit, models it can hold, delivery ttl (s), score epoch (s), priority span,
--       images one pipeline call may hold (worker.max_batch; 1: no batching), retention (s)
-- Returns {id, attempt, model, companion id, its attempt, ...}, or {'', why}: 'empty' (nothing waits, or
-- enough other deliveries are queued for what waits: this one is surplus), 'wait' (only jobs for models
-- other live workers hold, not waited long enough yet), 'retry' (dropped a stale entry).
-- Companions: waiting jobs of the same model with the same batch key (common/jobspec.py), taken in the
-- order workers take jobs while their images fit beside the first job's, to run in one pipeline call.
-- The same delivery asking again (a lost reply, a Celery retry) gets the jobs it took before.
-- include: lib
local pending, broker_list, delivery, pending_model_prefix, task_prefix, worker_prefix, workers, pending_owner_prefix,
      running, events_prefix, log_prefix = unpack(KEYS)
local me, now, queue, wait = ARGV[1], ARGV[2], ARGV[5], tonumber(ARGV[4])
local epoch, span = tonumber(ARGV[9]), tonumber(ARGV[10])
local before = redis.call('GET', delivery)
if before then
  local out = {}
  for id in string.gmatch(before, '%S+') do
    local st, worker, attempt, model = unpack(redis.call('HMGET', task_prefix .. id, 'status', 'worker', 'attempt', 'model'))
    if st == 'processing' and worker == me then   -- every job it took that is still mine; the first leads
      if #out == 0 then out = {id, attempt, model or ''} else out[#out + 1] = id; out[#out + 1] = attempt end
    end
  end
  if #out > 0 then return out end
end
local held = cjson.decode(ARGV[3])
local now_us = (tonumber(now) - epoch) * 1e6
-- My best own job: the head of the per-model queues of the models I hold warm.
local best, best_score = nil, nil
if wait >= 0 then
  for _, m in ipairs(held) do
    local head = redis.call('ZRANGE', pending_model_prefix .. m, 0, 0, 'WITHSCORES')
    if head[1] and (not best or tonumber(head[2]) < best_score) then best, best_score = head[1], tonumber(head[2]) end
  end
end
-- Jobs ahead of it (better priority class, or older): the first one I may take wins. A job is mine to
-- take when no other live worker of this queue holds its model, or when it has waited `wait` ms for one.
local bound = '+inf'
if best then bound = '(' .. string.format('%.0f', best_score) end
local entries = redis.call('ZRANGEBYSCORE', pending, '-inf', bound, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[6]))
local pick = nil
if #entries > 0 then
  local holders = {}
  if wait > 0 then
    for _, wid in ipairs(redis.call('ZRANGE', workers, 0, -1)) do
      local raw = wid ~= me and redis.call('GET', worker_prefix .. wid)
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
    local model = redis.call('HGET', task_prefix .. entries[i], 'model')
    local waited_ms = (now_us - (tonumber(entries[i + 1]) % span)) / 1000
    if not model or not holders[model] or waited_ms >= wait then pick = entries[i]; break end
  end
end
pick = pick or best
if not pick then
  local waiting = redis.call('ZCARD', pending)
  if waiting > 0 and redis.call('LLEN', broker_list) < waiting then return {'', 'wait'} end
  return {'', 'empty'}
end
local task = task_prefix .. pick
local st, worker, attempt, model, owner = unpack(redis.call('HMGET', task, 'status', 'worker', 'attempt', 'model', 'owner'))
local model_key = model and (pending_model_prefix .. model) or nil
local owner_key = owner and (pending_owner_prefix .. owner) or nil
if not takeable(st, worker) then
  -- expired or already taken: a stale entry, dropped from every index it may be in
  unindex(pick, pending, model_key, owner_key)
  for _, m in ipairs(held) do redis.call('ZREM', pending_model_prefix .. m, pick) end
  return {'', 'retry'}
end
take(task, pick, me, now, ARGV[12], running, events_prefix .. pick, log_prefix .. pick, pending, model_key, owner_key)
local taken, ids = {pick, attempt, model or ''}, {pick}
-- Companions for one pipeline call, from the same model's index, in the order workers take jobs.
local key, images = unpack(redis.call('HMGET', task, 'batch', 'images'))
local room = tonumber(ARGV[11]) - (tonumber(images) or 1)
if room > 0 and key and key ~= '' and model_key then
  for _, id in ipairs(redis.call('ZRANGE', model_key, 0, tonumber(ARGV[6]) - 1)) do
    local other = task_prefix .. id
    local ost, oworker, oattempt, obatch, oimages, oowner = unpack(redis.call('HMGET', other, 'status', 'worker',
      'attempt', 'batch', 'images', 'owner'))
    local n = tonumber(oimages) or 1
    if obatch == key and n <= room and takeable(ost, oworker) then
      take(other, id, me, now, ARGV[12], running, events_prefix .. id, log_prefix .. id, pending, model_key, oowner and (pending_owner_prefix .. oowner) or nil)
      taken[#taken + 1] = id; taken[#taken + 1] = oattempt; ids[#ids + 1] = id
      room = room - n
      if room <= 0 then break end
    end
  end
end
redis.call('SET', delivery, table.concat(ids, ' '), 'EX', ARGV[8])
-- Say at once which models I will hold, so no other worker picks my next jobs before my heartbeat does.
local raw = model and redis.call('GET', worker_prefix .. me)
if raw then
  local ok, info = pcall(cjson.decode, raw)
  if ok and type(info) == 'table' then
    local models = {}
    for _, m in ipairs(held) do if m ~= model then models[#models + 1] = m end end
    models[#models + 1] = model
    while #models > tonumber(ARGV[7]) do table.remove(models, 1) end
    info.models = models
    redis.call('SET', worker_prefix .. me, cjson.encode(info), 'KEEPTTL')
  end
end
return taken
