-- create: write a new pending task, index it and enqueue its Celery message, in one atomic call.
-- KEYS: task, owner_tasks, broker_list, pending, pending_model, pending_owner, stats, registry, events, log
-- ARGV: id, now, retention, message (or ''), fields (JSON), score, max pending in queue (0: none),
--       max pending of the owner (0: none)
-- Returns {'created'}, {'exists'}, {'queue_full', waiting} or {'owner_full', waiting}.
-- include: lib
local task, owner_tasks, broker_list, pending, pending_model, pending_owner, stats, registry, events, log = unpack(KEYS)
local id, now, retention = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', task) == 1 then return {'exists'} end
local waiting = redis.call('ZCARD', pending)
if tonumber(ARGV[7]) > 0 and waiting >= tonumber(ARGV[7]) then return {'queue_full', waiting} end
redis.call('ZREMRANGEBYSCORE', pending_owner, '-inf', tonumber(now) - tonumber(retention))
local mine = redis.call('ZCARD', pending_owner)
if tonumber(ARGV[8]) > 0 and mine >= tonumber(ARGV[8]) then return {'owner_full', mine} end
local flat = {}
for k, v in pairs(cjson.decode(ARGV[5])) do flat[#flat + 1] = k; flat[#flat + 1] = v end
redis.call('HSET', task, unpack(flat))
redis.call('EXPIRE', task, retention)
index(id, ARGV[6], now, retention, pending, pending_model, pending_owner, registry)
redis.call('ZADD', owner_tasks, now, id)
redis.call('EXPIRE', owner_tasks, retention)
redis.call('HINCRBY', stats, 'submitted', 1)
announce(events, log, retention, 'queued', 'attempt', '0', 'at', now)
if ARGV[4] ~= '' then redis.call('LPUSH', broker_list, ARGV[4]) end
return {'created'}
